"""The package's training entry with the real MindSpeed-RL: every shipped config composes, passes MindSpeed-RL's own
``parse_training_config`` / ``validate_rl_args``, and reaches its real remote ``train`` task on a real Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_rl_r3 import train
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
