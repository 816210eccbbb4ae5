import importlib.util
import os

import pytest

from mindspeed_rl_r3.patches import cpu_backend

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# tests/upstream imports the real MindSpeed-RL, which needs the real vLLM 0.11.0: it runs in the upstream test
# environment (ci/upstream/install.sh; ci/test.sh runs it there), and is not collected anywhere else.
if importlib.util.find_spec("vllm") is None:
    collect_ignore = ["upstream"]


def pytest_sessionfinish(session, exitstatus):
    """No upstream-backed test may skip while the pinned upstream tree is present (CI always has it)."""
    if cpu_backend.upstream_root() is None:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [
        report.nodeid
        for report in (reporter.stats.get("skipped", []) if reporter else [])
        if "upstream" in getattr(report, "keywords", {})
    ]
    if skipped:
        reporter.write_line(
            f"upstream guard: {len(skipped)} upstream-backed test(s) skipped although "
            f"{cpu_backend.upstream_root()} exists: " + ", ".join(skipped[:10]),
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
