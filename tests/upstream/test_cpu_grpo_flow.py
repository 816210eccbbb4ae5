"""MindSpeed-RL's own GRPO flow on the CPU backend: ``python -m mindspeed_rl_r3.train --cpu-backend --config-name
cpu_tiny_grpo`` runs the real ``cli.train_grpo`` ``train`` task (``RayGRPOTrainer``, ``TransferDock``,
``IntegratedWorker`` with MindSpeed-LLM's model and LoRA, the weight sync into the real vLLM 0.11 engine, capture,
replay, AQN after each sync) for two iterations and saves its checkpoint; MindSpeed-RL's own metric line carries the
package's metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_rl_r3.integration.env import ENV_SECTIONS

PACKAGE_METRICS = (
    "r3/update/set_agreement",
    "r3/update/mean_overlap",
    "r3/update/fallback_fraction",
    "mismatch/update/k3_kl",
    "mismatch/update/mean_abs_dlogp",
    "aqn/sigma",
    "aqn/stage",
)


def iteration_metrics(output: str) -> dict[int, dict[str, float]]:
    """``{iteration: {metric: value}}`` from MindSpeed-RL's ``iteration: N / M | key : value | ...`` log lines."""
    found: dict[int, dict[str, float]] = {}
    for line in output.splitlines():
        _, marker, rest = line.partition("] iteration: ")
        if not marker:
            continue
        fields = rest.split(" | ")
        number = int(fields[0].split("/")[0])
        metrics = {}
        for field in fields[1:]:
            key, _, value = field.partition(" : ")
            metrics[key.strip()] = float(value)
        found[number] = metrics
    return found


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE, its tokenizer and GSM8K-format data, tokenized by MindSpeed-RL's own preprocessing."""
    root = tmp_path_factory.mktemp("cpu_tiny")
    built = subprocess.run(
        [sys.executable, "-m", "mindspeed_rl_r3.patches.cpu_tiny_assets", str(root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    return root


def test_mindspeed_rls_grpo_flow_runs_two_iterations_with_r3_aqn_and_lora(tiny_assets, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV_SECTIONS)}
    env.update(MINDSPEED_RL_R3_CPU_TINY=str(tiny_assets), HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")
    command = [sys.executable, "-m", "mindspeed_rl_r3.train", "--cpu-backend", "--config-name", "cpu_tiny_grpo"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    metrics = iteration_metrics(output)
    assert sorted(metrics) == [1, 2], output[-4000:]
    for number, values in metrics.items():
        missing = [k for k in PACKAGE_METRICS if k not in values]
        assert not missing, (number, missing)
        # replayed rows: the live router's choice overlaps the rollout's far above chance (top-2 of 8: 0.25), and
        # only rows the rollout never computed (each sample's last token) fall back to native routing
        assert values["r3/update/mean_overlap"] > 0.8 and values["r3/update/fallback_fraction"] < 0.1, values
    assert metrics[1]["aqn/sigma"] == 0.0 and metrics[2]["aqn/sigma"] > 0.0  # stage 0 clean, then noise
    assert (tiny_assets / "ckpt" / "iter_0000002").is_dir()  # MindSpeed-RL saved after the last iteration
