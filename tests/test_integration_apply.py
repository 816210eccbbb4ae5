"""``mindspeed-rl-r3 apply`` on a fake installation (a temporary site directory), checked in fresh interpreters; the
driver-side capture of a hydra script's sections."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mindspeed_rl_r3.apply import MARKER, PTH_NAME, apply_to_installation, run_apply, undo
from tests.integration_support import FAKES, R3_SECTIONS

REPO = str(Path(__file__).resolve().parent.parent)
PROBE = textwrap.dedent(
    """
    import json, site, sys
    site.addsitedir(sys.argv[1])  # what Python does with the site-packages it starts with
    before = "torch" in sys.modules
    hooked = any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path)
    from mindspeed_rl.workers import actor_hybrid_worker as m
    patched = getattr(m.ActorHybridWorkerBase.generate_sequences, "__r3_mindspeed_rl_worker__", False)
    print(json.dumps({"torch_at_start": before, "hooked": hooked, "patched": patched}))
    """
)


def _probe(site_dir, sections=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINDSPEED_RL_R3")}
    env["PYTHONPATH"] = os.pathsep.join([FAKES, REPO])
    if sections is not None:
        env["MINDSPEED_RL_R3_SECTIONS"] = json.dumps(sections)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(site_dir)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_apply_is_idempotent_reversible_and_reports(tmp_path):
    report = apply_to_installation(tmp_path)
    pth = tmp_path / PTH_NAME
    assert report.action == "installed" and report.changed and pth.read_text().startswith(MARKER)
    assert report.lines[-1].startswith("import ") and REPO in report.lines
    assert apply_to_installation(tmp_path).action == "unchanged"
    pth.write_text(pth.read_text().replace("0.1.0", "0.0.9"))
    assert apply_to_installation(tmp_path).action == "updated"
    removed = undo(tmp_path)
    assert removed.action == "removed" and not pth.exists()
    assert undo(tmp_path).action == "absent" and not undo(tmp_path).changed


def test_foreign_files_are_left_alone_and_exit_codes(tmp_path, capsys):
    (tmp_path / PTH_NAME).write_text("import something_else\n")
    assert apply_to_installation(tmp_path).action == "refused"
    assert undo(tmp_path).action == "refused" and (tmp_path / PTH_NAME).read_text() == "import something_else\n"
    assert run_apply(site_dir=str(tmp_path)) == 1
    (tmp_path / PTH_NAME).unlink()
    assert run_apply(site_dir=str(tmp_path), as_json=True) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["action"] == "installed"
    assert run_apply(undo_hook=True, site_dir=str(tmp_path)) == 0
    assert run_apply(site_dir=str(tmp_path / "missing")) == 2


def test_applied_installation_patches_mindspeed_rl_only_for_jobs_with_sections(tmp_path):
    assert _probe(tmp_path, R3_SECTIONS)["patched"] is False  # not applied yet
    apply_to_installation(tmp_path)
    with_sections = _probe(tmp_path, R3_SECTIONS)
    assert with_sections == {"torch_at_start": False, "hooked": True, "patched": True}
    assert _probe(tmp_path)["patched"] is False  # plain MindSpeed-RL job: unchanged
    undo(tmp_path)
    assert _probe(tmp_path, R3_SECTIONS) == {"torch_at_start": False, "hooked": False, "patched": False}


DRIVER = textwrap.dedent(
    """
    import json, os, site
    site.addsitedir(os.environ["PROBE_SITE"])  # not argv: hydra reads argv as overrides
    import hydra, ray
    calls = []
    ray.init = lambda *args, **kwargs: calls.append(kwargs.get("runtime_env"))  # stands for a Ray cluster
    from mindspeed_rl.trainer import grpo_trainer_hybrid  # MindSpeed-RL's cli/train_grpo.py imports it first

    @hydra.main(config_path=os.environ["PROBE_CONFIGS"], config_name="job", version_base=None)
    def main(config):
        ray.init(runtime_env={"env_vars": {"VLLM_USE_V1": "1"}})
        print(json.dumps(calls[0]))

    main()
    """
)


@pytest.mark.parametrize("with_sections", [True, False])
def test_driver_publishes_the_config_sections_to_the_ray_job(tmp_path, with_sections):
    pytest.importorskip("hydra")
    site_dir, config_dir = tmp_path / "site", tmp_path / "configs"
    site_dir.mkdir()
    config_dir.mkdir()
    apply_to_installation(site_dir)
    config = "rl_config: {n_samples_per_prompt: 8}\n" + (
        "r3: {mode: R3}\naqn: {enabled: true}\n" if with_sections else ""
    )
    (config_dir / "job.yaml").write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINDSPEED_RL_R3")}
    env["PYTHONPATH"] = os.pathsep.join([FAKES, REPO])
    env["PROBE_SITE"], env["PROBE_CONFIGS"] = str(site_dir), str(config_dir)
    out = subprocess.run(
        [sys.executable, "-c", DRIVER],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    runtime_env = json.loads(out.stdout.strip().splitlines()[-1])
    if with_sections:
        assert json.loads(runtime_env["env_vars"]["MINDSPEED_RL_R3_SECTIONS"]) == {
            "r3": {"mode": "R3"},
            "aqn": {"enabled": True},
        }
        assert runtime_env["worker_process_setup_hook"] == "mindspeed_rl_r3.autopatch.install"
        assert runtime_env["env_vars"]["VLLM_USE_V1"] == "1"
    else:
        assert runtime_env == {"env_vars": {"VLLM_USE_V1": "1"}}
