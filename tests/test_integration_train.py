"""``python -m mindspeed_rl_r3.train``: the config is composed and split, the Ray job's runtime_env is MindSpeed-RL's
plus the sections and the setup hook, and MindSpeed-RL's own ``cli.train_grpo.train`` task runs (faked here)."""

import json
import sys
from types import ModuleType, SimpleNamespace

import pytest

from mindspeed_rl_r3 import train
from mindspeed_rl_r3.integration.env import ENV_SECTIONS
from tests.integration_support import fakes  # noqa: F401  (fixture)

CONFIG = """\
defaults:
  - _self_
megatron_training: {stage: ray_grpo, global_batch_size: 4}
actor_config: {tensor_model_parallel_size: 1}
rl_config: {runtime_env_path: envs/runtime_env.yaml, n_samples_per_prompt: 2}
generate_config: {enable_expert_parallel: true, infer_expert_parallel_size: 4}
r3: {mode: R3, group_dedupe: false}
aqn: {enabled: true, num_stages: 5}
"""


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    pytest.importorskip("hydra")
    monkeypatch.setenv(ENV_SECTIONS, "")  # recorded, so what prepare_job publishes is removed after the test
    monkeypatch.delenv(ENV_SECTIONS)
    (tmp_path / "configs").mkdir()
    (tmp_path / "envs").mkdir()
    (tmp_path / "configs" / "job.yaml").write_text(CONFIG)
    (tmp_path / "envs" / "runtime_env.yaml").write_text("env_vars: {VLLM_USE_V1: '1', VLLM_DP_SIZE: '8'}\n")
    return tmp_path / "configs"


def test_prepare_job_splits_sections_and_builds_the_runtime_env(fakes, config_dir, monkeypatch):  # noqa: F811
    msrl, runtime_env = train.prepare_job("job", str(config_dir), ["rl_config.n_samples_per_prompt=4"])
    assert set(msrl) == {"megatron_training", "actor_config", "rl_config", "generate_config"}
    assert msrl["rl_config"]["n_samples_per_prompt"] == 4
    env = runtime_env["env_vars"]
    assert env["VLLM_DP_SIZE"] == "4" and env["IS_MULTIMODAL"] == "False" and env["HCCL_BUFFSIZE"] == "256"
    assert env["VLLM_USE_V1"] == "1"
    assert json.loads(env[ENV_SECTIONS]) == {
        "r3": {"mode": "R3", "group_dedupe": False},
        "aqn": {"enabled": True, "num_stages": 5},
    }
    assert runtime_env["worker_process_setup_hook"] == "mindspeed_rl_r3.autopatch.install"


def test_run_job_starts_ray_and_runs_mindspeed_rls_train_task(fakes, config_dir, monkeypatch):  # noqa: F811
    import ray

    calls = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(ray, "get", lambda value: value)
    cli, entry = ModuleType("cli"), ModuleType("cli.train_grpo")
    entry.train = SimpleNamespace(remote=lambda config: calls.setdefault("train", config) and "done")
    monkeypatch.setitem(sys.modules, "cli", cli)
    monkeypatch.setitem(sys.modules, "cli.train_grpo", entry)
    monkeypatch.setattr("mindspeed_rl_r3.autopatch.install", lambda: calls.setdefault("hook", True))
    assert train.main(["--config-name", "job", "--config-path", str(config_dir)]) == 0
    assert calls["hook"] and "r3" not in calls["train"] and calls["train"]["rl_config"]["n_samples_per_prompt"] == 2
    assert calls["init"]["runtime_env"]["worker_process_setup_hook"] == "mindspeed_rl_r3.autopatch.install"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("r3.mode=R4", "r3: "),
        ("+rl_config.no_such_key=1", "no_such_key"),
        ("+aqn.sigma=0.1", "unknown aqn keys"),
    ],
)
def test_bad_configs_exit_2_before_anything_starts(fakes, config_dir, capsys, override, message):  # noqa: F811
    assert train.main(["--config-name", "job", "--config-path", str(config_dir), override]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_names_the_directory(config_dir, capsys):
    assert train.main(["--config-name", "nope", "--config-path", str(config_dir)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "['job']" in err
