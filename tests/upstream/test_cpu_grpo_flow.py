"""MindSpeed-RL's own GRPO flow on the CPU backend, on both ways in:

- ``package``: ``python -m mindspeed_rl_r3.train --cpu-backend --config-name cpu_tiny_grpo``;
- ``upstream``: ``mindspeed-rl-r3 apply`` on this environment, then MindSpeed-RL's own ``cli/train_grpo.py
  --config-path <configs> --config-name cpu_tiny_grpo`` with ``MINDSPEED_RL_R3_CPU_BACKEND=1``.

Each runs the real ``train`` task (``RayGRPOTrainer``, ``TransferDock``, ``IntegratedWorker`` with MindSpeed-LLM's
model and LoRA, the weight sync into the real vLLM 0.11 engine, capture, AQN after each sync) for two iterations and
saves its checkpoint, once with R3 and once with ``r3.mode=observe`` (the same capture and telemetry, native routing)
on the same seed. MindSpeed-RL's own metric line carries the package's metrics, and its TensorBoard writer (the
config's ``use_tensorboard``) the full-precision values the comparison reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_rl_r3.integration.env import ENV_CPU_BACKEND, ENV_SECTIONS
from mindspeed_rl_r3.patches.cpu_backend import ENV_UPSTREAM, upstream_root
from mindspeed_rl_r3.shipped_configs import shipped_configs_dir

PACKAGE_METRICS = (
    "r3/update/set_agreement",
    "r3/update/mean_overlap",
    "r3/update/fallback_fraction",
    "r3/update/routing_mismatch",
    "mismatch/update/k3_kl",
    "mismatch/update/mean_abs_dlogp",
    "aqn/sigma",
    "aqn/stage",
)
MODES = ("R3", "observe")
PATHS = ("package", "upstream")


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


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    """``{metric: [value per iteration]}`` from the TensorBoard file MindSpeed-RL's trainer wrote under ``runs/``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.glob("runs/*/events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    return {tag.removeprefix("train/"): [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE, its tokenizer, the workers' runtime env and GSM8K-format data (MindSpeed-RL's own
    preprocessing)."""
    root = tmp_path_factory.mktemp("cpu_tiny")
    built = subprocess.run(
        [sys.executable, "-m", "mindspeed_rl_r3.patches.cpu_tiny_assets", str(root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def applied():
    """``mindspeed-rl-r3 apply`` on this environment, as a user runs it; undone after the module."""
    cli = [str(Path(sys.executable).with_name("mindspeed-rl-r3")), "apply", "--json"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["action"] in ("installed", "unchanged"), report
    yield report
    if report["action"] == "installed":  # leave an installation applied before this test as it was
        subprocess.run([*cli[:2], "--undo"], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def flows(tiny_assets, tmp_path_factory, request):
    """Runs each ``(path, mode)`` once, on demand: ``{(path, mode): (output, run folder)}``."""
    done: dict[tuple[str, str], tuple[str, Path]] = {}

    def run(path: str, mode: str) -> tuple[str, Path]:
        if (path, mode) in done:
            return done[path, mode]
        cwd = tmp_path_factory.mktemp(f"{path}_{mode}")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV_SECTIONS)}
        env.update(MINDSPEED_RL_R3_CPU_TINY=str(tiny_assets), HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")
        overrides = [f"r3.mode={mode}", f"actor_config.save={cwd / 'ckpt'}"]
        if path == "package":
            command = [sys.executable, "-m", "mindspeed_rl_r3.train", "--cpu-backend"]
        else:
            request.getfixturevalue("applied")
            root = upstream_root()
            env.update({ENV_CPU_BACKEND: "1", ENV_UPSTREAM: str(root)})
            command = [sys.executable, str(root / "MindSpeed-RL" / "cli" / "train_grpo.py")]
            command += ["--config-path", str(shipped_configs_dir())]
        command += ["--config-name", "cpu_tiny_grpo", *overrides]
        finished = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        output = finished.stdout + finished.stderr
        assert finished.returncode == 0, output[-6000:]
        done[path, mode] = output, cwd
        return done[path, mode]

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
def test_mindspeed_rls_grpo_flow_runs_two_iterations_with_the_package(flows, path, mode):
    output, cwd = flows(path, mode)
    metrics = iteration_metrics(output)
    assert sorted(metrics) == [1, 2], output[-4000:]
    for number, values in metrics.items():
        missing = [k for k in PACKAGE_METRICS if k not in values]
        assert not missing, (number, missing)
        # the live router's choice overlaps the rollout's far above chance (top-2 of 8: 0.25), and only rows the
        # rollout never computed (each sample's last token) fall back to native routing
        assert values["r3/update/mean_overlap"] > 0.8 and values["r3/update/fallback_fraction"] < 0.1, values
    assert metrics[1]["aqn/sigma"] == 0.0 and metrics[2]["aqn/sigma"] > 0.0  # stage 0 clean, then noise
    assert (cwd / "ckpt" / "iter_0000002").is_dir()  # MindSpeed-RL saved after the last iteration
    scalars = tensorboard_scalars(cwd)
    for key in PACKAGE_METRICS:  # the same numbers in MindSpeed-RL's TensorBoard, unrounded
        assert scalars[key] == pytest.approx([metrics[1][key], metrics[2][key]], abs=5e-5), key


@pytest.mark.parametrize("path", PATHS)
def test_r3_removes_the_routing_mismatch_and_at_least_half_the_k3_kl(flows, path):
    r3, observe = (tensorboard_scalars(flows(path, mode)[1]) for mode in MODES)
    for key in ("response_length/mean", "prompt_length/mean", "r3/update/fallback_fraction"):
        assert r3[key] == observe[key], key  # the same seed: the same samples in both arms
    assert r3["r3/update/routing_mismatch"] == [0.0, 0.0]  # every replayed row dispatched to the rollout's experts
    assert all(value > 0.0 for value in observe["r3/update/routing_mismatch"])
    for with_r3, without in zip(r3["mismatch/update/k3_kl"], observe["mismatch/update/k3_kl"], strict=True):
        assert with_r3 <= 0.5 * without, (r3["mismatch/update/k3_kl"], observe["mismatch/update/k3_kl"])


@pytest.mark.parametrize("mode", MODES)
def test_both_ways_in_run_the_same_flow(flows, mode):
    """The package's entry and MindSpeed-RL's own script after ``apply``: the same job, the same numbers."""
    package, upstream = (tensorboard_scalars(flows(path, mode)[1]) for path in PATHS)
    for key in PACKAGE_METRICS:
        assert package[key] == upstream[key], key
