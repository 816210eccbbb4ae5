"""The package's training entry with the real MindSpeed-RL: every shipped config composes, passes MindSpeed-RL's own
``parse_training_config`` / ``validate_rl_args``, and reaches its real remote ``train`` task on a real Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mindspeed_rl_r3 import train
from mindspeed_rl_r3.config import load_sections
from mindspeed_rl_r3.config_rules import refusals
from mindspeed_rl_r3.integration.env import ENV_SECTIONS

SHIPPED = sorted(p.stem for p in train.REPO_CONFIGS.glob("grpo_*.yaml"))


@pytest.fixture
def no_published_sections(monkeypatch):
    monkeypatch.setenv(ENV_SECTIONS, "")  # recorded, so what prepare_job publishes is removed after the test
    monkeypatch.delenv(ENV_SECTIONS)


def test_configs_are_shipped():
    assert len(SHIPPED) == 3, SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_passes_mindspeed_rls_own_validation(name, no_published_sections, ray_cluster):
    from cli.train_grpo import parse_training_config

    msrl, runtime_env = train.prepare_job(name)
    assert not set(msrl) & {"r3", "aqn", "lora_extras"}
    assert json.loads(os.environ[ENV_SECTIONS])["r3"]["mode"] == "R3"
    parsed = parse_training_config(train.upstream_config(msrl))  # what the remote task runs first
    rl, actor = parsed["rl_config"], parsed["actor_config"]
    assert rl.actor_resource.num_npus == msrl["rl_config"]["actor_resource"]["num_npus"]
    assert actor.tensor_model_parallel_size == msrl["actor_config"]["tensor_model_parallel_size"]
    assert runtime_env["env_vars"]["HCCL_BUFFSIZE"] == str(rl.hccl_buffersize)
    # the worker-init check on the dispatch sizes validate_rl_args derived (whole GRPO groups for group dedupe)
    sections = load_sections(json.loads(os.environ[ENV_SECTIONS]))
    assert rl.actor_update_dispatch_size and refusals(rl, actor, parsed["generate_config"], sections) == []


def test_a_plain_dict_is_what_broke_mindspeed_rls_validation(no_published_sections, ray_cluster):
    """The defect the entry fixed: MindSpeed-RL reads resource sections by attribute."""
    from cli.train_grpo import parse_training_config

    msrl, _ = train.prepare_job(SHIPPED[0])
    with pytest.raises(AttributeError, match="num_npus"):
        parse_training_config(dict(msrl))


def _entry(name: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV_SECTIONS)}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_DEDUP_LOGS="0")
    command = [sys.executable, "-m", "mindspeed_rl_r3.train", "--cpu-backend", "--config-name", name, *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_entry_reaches_mindspeed_rls_train_task(name, tmp_path):
    """``python -m mindspeed_rl_r3.train`` starts Ray and runs the real ``cli.train_grpo.train`` task, which parses
    and validates the config, then stops at the first thing a CPU machine lacks: the model's tokenizer."""
    missing = tmp_path / "no-such-model"
    done = _entry(name, tmp_path, f"megatron_training.tokenizer_name_or_path={missing}")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "get_tokenizer" in output and str(missing) in output, output[-4000:]
    assert "validate_rl_args" not in output and "AttributeError" not in output, output[-4000:]


def test_the_entry_names_a_bad_config_in_one_line(tmp_path):
    done = _entry(SHIPPED[0], tmp_path, "r3.mode=bogus")
    assert done.returncode == 2
    assert "r3.mode" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


JOB = """\
defaults:
  - _self_
megatron_training: {stage: ray_grpo, global_batch_size: 4, num_experts: 8, moe_router_topk: 2}
actor_config: {tensor_model_parallel_size: 1, moe_tp_extend_ep: true}
rl_config: {runtime_env_path: envs/runtime_env.yaml, n_samples_per_prompt: 2, guarantee_order: true}
generate_config: {enable_expert_parallel: true, infer_expert_parallel_size: 4}
r3: {mode: R3}
aqn: {enabled: true, num_stages: 5}
"""


@pytest.fixture
def job_dir(tmp_path, no_published_sections):
    """A small config beside its runtime_env file, as a user's own config directory would hold them."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "envs").mkdir()
    (tmp_path / "configs" / "job.yaml").write_text(JOB)
    (tmp_path / "envs" / "runtime_env.yaml").write_text("env_vars: {VLLM_USE_V1: '1', VLLM_DP_SIZE: '8'}\n")
    return tmp_path / "configs"


@pytest.mark.parametrize("cpu_job", [False, True])
def test_prepare_job_splits_sections_and_builds_mindspeed_rls_runtime_env(job_dir, monkeypatch, cpu_job):
    from mindspeed_rl_r3.patches import cpu_backend

    monkeypatch.setattr(cpu_backend, "_runs_jobs", cpu_job)  # --cpu-backend; this session only imports upstream
    msrl, runtime_env = train.prepare_job("job", str(job_dir), ["rl_config.n_samples_per_prompt=4"])
    assert set(msrl) == {"megatron_training", "actor_config", "rl_config", "generate_config"}
    assert msrl["rl_config"]["n_samples_per_prompt"] == 4
    env = runtime_env["env_vars"]
    assert env["VLLM_DP_SIZE"] == "4" and env["IS_MULTIMODAL"] == "False" and env["HCCL_BUFFSIZE"] == "256"
    assert env["VLLM_USE_V1"] == "1"
    assert json.loads(env[ENV_SECTIONS]) == {"r3": {"mode": "R3"}, "aqn": {"enabled": True, "num_stages": 5}}
    # a CPU job's workers get the backend (whose setup installs the import hook) before they import MindSpeed-RL
    hook = f"{cpu_backend.__name__}.ray_worker_setup" if cpu_job else "mindspeed_rl_r3.autopatch.install"
    assert runtime_env["worker_process_setup_hook"] == hook


def test_run_job_hands_mindspeed_rls_train_task_a_dictconfig(job_dir, monkeypatch):
    import cli.train_grpo
    import ray
    from omegaconf import DictConfig

    calls = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(ray, "get", lambda value: value)
    task = SimpleNamespace(remote=lambda config: calls.setdefault("train", config))
    monkeypatch.setattr(cli.train_grpo, "train", task)
    monkeypatch.setattr("mindspeed_rl_r3.autopatch.install", lambda: calls.setdefault("hook", True))
    assert train.main(["--config-name", "job", "--config-path", str(job_dir)]) == 0
    config = calls["train"]
    assert calls["hook"] and isinstance(config, DictConfig) and "r3" not in config
    assert config.rl_config.n_samples_per_prompt == 2  # attribute access, as validate_rl_args reads it
    assert calls["init"]["runtime_env"]["env_vars"][ENV_SECTIONS]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("r3.mode=R4", "r3.mode must be one of"),
        ("+rl_config.no_such_key=1", "no_such_key"),
        ("+aqn.sigma=0.1", "unknown aqn keys"),
        ("rl_config.guarantee_order=false", "r3.group_dedupe: false"),
    ],
)
def test_bad_configs_exit_2_before_anything_starts(job_dir, capsys, override, message):
    assert train.main(["--config-name", "job", "--config-path", str(job_dir), override]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_names_the_directory(job_dir, capsys):
    assert train.main(["--config-name", "nope", "--config-path", str(job_dir)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "['job']" in err


ACTOR_METHODS_PROBE = """
import json, sys
from mindspeed_rl_r3 import train
train.use_cpu_backend()
train.prepare_job(sys.argv[1])
train._import_upstream_entry()
stale, checked = [], 0
for name, module in sorted(sys.modules.items()):
    if not name.startswith("mindspeed_rl.workers."):
        continue
    for actor in [a for a in vars(module).values() if hasattr(a, "__ray_metadata__")]:
        meta = actor.__ray_metadata__
        for attr, copied in meta.modified_class.__dict__.items():
            current = getattr(meta.modified_class.__ray_actor_class__, attr, None)
            marks = {k for k in getattr(current, "__dict__", {}) if k.startswith("__r3_")}
            if marks:
                checked += 1
                if not marks <= set(getattr(copied, "__dict__", {})):
                    stale.append(f"{meta.class_name}.{attr}")
print(json.dumps({"stale": stale, "checked": checked}))
"""


def test_the_actor_classes_ray_builds_carry_the_patched_methods(tmp_path):
    """Ray's ``@ray.remote`` copies every method of a worker class, inherited ones included, into the actor class when
    the worker module is imported. The entry must install the patches before anything imports MindSpeed-RL (its
    config check does), or the actors dispatch without the package's columns (found running cpu_tiny_grpo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV_SECTIONS)}
    done = subprocess.run(
        [sys.executable, "-c", ACTOR_METHODS_PROBE, SHIPPED[0]], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stale"] == [] and result["checked"] >= 5, result
