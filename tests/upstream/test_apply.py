"""``mindspeed-rl-r3 apply`` with the real MindSpeed-RL: fresh interpreters of a temporary site directory import the
real modules (on the CPU backend, standing in for an NPU machine's ``torch_npu``) and are patched only for jobs with
sections; a hydra driver publishes its config's sections to the Ray job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mindspeed_rl_r3.apply import apply_to_installation, undo
from tests.upstream.support import R3_SECTIONS

REPO = str(Path(__file__).resolve().parents[2])
# What an NPU machine has installed: torch_npu & co. (here the CPU backend) and MindSpeed-RL on sys.path.
NPU_MACHINE = (
    "from mindspeed_rl_r3.patches import cpu_backend; "
    "cpu_backend.install(); cpu_backend.use_upstream(cpu_backend.upstream_root())"
)
PROBE = textwrap.dedent(
    f"""
    import json, site, sys
    site.addsitedir(sys.argv[1])  # what Python does with the site-packages it starts with
    before = "torch" in sys.modules
    hooked = any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path)
    patched = None
    if sys.argv[2] == "import":
        {NPU_MACHINE}
        from mindspeed_rl.workers import actor_hybrid_worker as m
        patched = getattr(m.ActorHybridWorkerBase.generate_sequences, "__r3_mindspeed_rl_worker__", False)
    print(json.dumps({{"torch_at_start": before, "hooked": hooked, "patched": patched}}))
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINDSPEED_RL_R3") and k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": REPO, **extra}


def _probe(site_dir: Path, sections: dict | None = None, *, load: bool = True) -> dict:
    env = _env() if sections is None else _env(MINDSPEED_RL_R3_SECTIONS=json.dumps(sections))
    command = [sys.executable, "-c", PROBE, str(site_dir), "import" if load else "-"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_applied_installation_patches_mindspeed_rl_only_for_jobs_with_sections(tmp_path):
    assert _probe(tmp_path, R3_SECTIONS, load=False)["hooked"] is False  # not applied yet: nothing can patch
    apply_to_installation(tmp_path)
    assert _probe(tmp_path, R3_SECTIONS) == {"torch_at_start": False, "hooked": True, "patched": True}
    undo(tmp_path)
    assert _probe(tmp_path, R3_SECTIONS, load=False) == {"torch_at_start": False, "hooked": False, "patched": None}


DRIVER = textwrap.dedent(
    f"""
    import json, os, site
    site.addsitedir(os.environ["PROBE_SITE"])  # not argv: hydra reads argv as overrides
    {NPU_MACHINE}
    import hydra, ray
    calls = []
    ray.init = lambda *args, **kwargs: calls.append(kwargs.get("runtime_env"))  # stands for a Ray cluster
    from mindspeed_rl.trainer import grpo_trainer_hybrid  # MindSpeed-RL's cli/train_grpo.py imports it first
    patched = getattr(grpo_trainer_hybrid.metrics_post_processing, "__r3_mindspeed_rl_trainer__", False)

    @hydra.main(config_path=os.environ["PROBE_CONFIGS"], config_name="job", version_base=None)
    def main(config):
        ray.init(runtime_env={{"env_vars": {{"VLLM_USE_V1": "1"}}}})
        print(json.dumps({{"runtime_env": calls[0], "patched_at_import": patched}}))

    main()
    """
)


@pytest.mark.parametrize("with_sections", [True, False])
def test_driver_publishes_the_config_sections_to_the_ray_job(tmp_path, with_sections):
    site_dir, config_dir = tmp_path / "site", tmp_path / "configs"
    site_dir.mkdir()
    config_dir.mkdir()
    apply_to_installation(site_dir)
    config = "rl_config: {n_samples_per_prompt: 8}\n" + (
        "r3: {mode: R3}\naqn: {enabled: true}\n" if with_sections else ""
    )
    (config_dir / "job.yaml").write_text(config)
    env = _env(PROBE_SITE=str(site_dir), PROBE_CONFIGS=str(config_dir))
    out = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    runtime_env = seen["runtime_env"]
    assert seen["patched_at_import"] is False  # the driver imports MindSpeed-RL before it knows the sections
    if with_sections:
        assert json.loads(runtime_env["env_vars"]["MINDSPEED_RL_R3_SECTIONS"]) == {
            "r3": {"mode": "R3"},
            "aqn": {"enabled": True},
        }
        assert runtime_env["worker_process_setup_hook"] == "mindspeed_rl_r3.autopatch.install"
        assert runtime_env["env_vars"]["VLLM_USE_V1"] == "1"
    else:
        assert runtime_env == {"env_vars": {"VLLM_USE_V1": "1"}}
