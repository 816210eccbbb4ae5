"""examples/qwen3_30b_lora_r3_aqn.sh run through bash, with stub ``ray`` / ``npu-smi`` / python on PATH: checks come
before anything starts, a dry run starts nothing, and the launcher stops only the Ray head it started."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "qwen3_30b_lora_r3_aqn.sh"
MAIN = "grpo_qwen3_30b_a3b_lora_r3_aqn"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# Each stub appends one line per call to $STUB_LOG. The head stub blocks like `ray start --head --block` until
# SIGTERM (and gives up by itself after 60 s, so a failing test cannot leave it behind).
RAY_STUB = """#!/usr/bin/env bash
echo "ray $*" >> "$STUB_LOG"
case "$1 $2" in
  "start --head")
    [[ -z ${STUB_HEAD_FAILS:-} ]] || exit 1
    touch "$STUB_LOG.head"
    trap 'rm -f "$STUB_LOG.head"; echo "ray head stopped by TERM" >> "$STUB_LOG"; exit 0' TERM
    for _ in $(seq 600); do sleep 0.1; done
    rm -f "$STUB_LOG.head"
    exit 1 ;;
  "status "* | "status") [[ ! -f $STUB_LOG.head ]] || echo " 0.0/16.0 NPU" ;;
esac
"""
NPU_SMI_STUB = """#!/usr/bin/env bash
echo "npu-smi $*" >> "$STUB_LOG"
printf '\tTotal Count                    : %s\n\n\tNPU ID : 0\n' "${STUB_NODE_NPUS:-16}"
"""
# `plan` runs for real (this interpreter, the repository on PYTHONPATH); the training entry is a stub.
PYTHON_STUB = f"""#!/usr/bin/env bash
echo "python $*" >> "$STUB_LOG"
if [[ "$1 $2" == "-m mindspeed_rl_r3.train" ]]; then echo "training ran"; exit "${{STUB_TRAIN_EXIT:-0}}"; fi
exec {sys.executable} "$@"
"""


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    """A MindSpeed-RL checkout, a HF model dir and preprocessed data, as the launcher expects them, and the stubs."""
    (tmp_path / "MindSpeed-RL" / "mindspeed_rl").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    for field in ("input_ids", "attention_mask", "labels"):
        for ext in ("bin", "idx"):
            (tmp_path / "data" / f"gsm8k_packed_{field}_document.{ext}").write_bytes(b"")
    (tmp_path / "ckpt").mkdir()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("ray", RAY_STUB), ("npu-smi", NPU_SMI_STUB), ("python-stub", PYTHON_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return {
        "MINDSPEED_RL_DIR": str(tmp_path / "MindSpeed-RL"),
        "MODEL_PATH": str(tmp_path / "model"),
        "DATA_PATH": str(tmp_path / "data" / "gsm8k"),
        "LOG_DIR": str(tmp_path / "logs"),
        "NODE_IP": "10.0.0.5",
        "PYTHON": str(stubs / "python-stub"),
        "PATH": f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "STUB_LOG": str(tmp_path / "calls.log"),
        "RAY_PORT": str(free_port()),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    # A clean environment: only what the test sets, so the caller's NNODES etc. cannot leak in.
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=base | env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def calls(env: dict[str, str]) -> list[str]:
    log = Path(env["STUB_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_dry_run_head_single_node(paths):
    result = launch(["--dry-run", "--", "rl_config.n_samples_per_prompt=4"], paths)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert all(line.startswith(("[dry-run]", "[plan]")) for line in out.splitlines()), out
    assert "head node 0 of 1, 16 NPUs per node, 16 NPUs in total" in out
    assert "ray stop" not in out and "pkill" not in out
    assert f"ray start --head --block --port {paths['RAY_PORT']}" in out and "NPU" in out and "16" in out
    assert "--node-ip-address=10.0.0.5" in out
    assert "wait until 'ray status' shows 16 NPU" in out
    assert "[plan] plan ok" in out  # the real layout check ran, with the overrides
    assert f"export PYTHONPATH={paths['MINDSPEED_RL_DIR']}:{REPO}" in out
    train = next(line for line in out.splitlines() if "-m mindspeed_rl_r3.train" in line)
    assert f"--config-path {REPO}/configs --config-name {MAIN}" in train
    assert paths["MODEL_PATH"] in train and paths["DATA_PATH"] in train
    assert train.endswith("rl_config.n_samples_per_prompt=4")
    assert "actor_config.load" not in train and "LOAD_PATH not set" in out
    # every check ran (npu-smi, plan) and nothing was started, stopped or created
    assert calls(paths) == [
        "npu-smi info -l",
        f"python -m mindspeed_rl_r3.cli.main plan {REPO}/configs/{MAIN}.yaml rl_config.n_samples_per_prompt=4 "
        "--npus 16 --nnodes 1",
    ]
    assert not Path(paths["LOG_DIR"]).exists()


def test_dry_run_two_node_head_and_worker(paths, tmp_path):
    common = paths | {
        "NNODES": "2",
        "NPUS_PER_NODE": "8",
        "MASTER_ADDR": "192.168.1.10",
        "CONFIG_NAME": f"{MAIN}_A2_2x8",
        "LOAD_PATH": str(tmp_path / "ckpt"),
        "SAVE_PATH": "relative/save",
    }
    head = launch(["--dry-run"], common | {"NODE_RANK": "0"}, cwd=tmp_path)
    assert head.returncode == 0, head.stderr
    assert "head node 0 of 2, 8 NPUs per node, 16 NPUs in total" in head.stdout
    assert "wait until 'ray status' shows 16 NPU" in head.stdout
    assert "--dashboard-host=192.168.1.10" in head.stdout
    train = next(line for line in head.stdout.splitlines() if "-m mindspeed_rl_r3.train" in line)
    assert f"--config-name {MAIN}_A2_2x8" in train
    assert str(tmp_path / "ckpt") in train and str(tmp_path / "relative" / "save") in train  # made absolute

    worker = launch(["--dry-run"], common | {"NODE_RANK": "1"})
    assert worker.returncode == 0, worker.stderr
    assert "worker node 1 of 2" in worker.stdout
    assert f"ray start --address=192.168.1.10:{paths['RAY_PORT']}" in worker.stdout
    assert "-m mindspeed_rl_r3.train" not in worker.stdout and "--head" not in worker.stdout
    assert not [c for c in calls(common) if c.startswith("ray")]  # neither dry run ran Ray


def test_config_name_flag_and_yaml_suffix(paths):
    result = launch(["--dry-run", f"--config-name={MAIN}_12npu.yaml"], paths | {"NPUS_PER_NODE": "12"})
    assert result.returncode == 0, result.stderr
    assert f"--config-name {MAIN}_12npu " in result.stdout and "12 NPUs in total" in result.stdout


def test_help():
    result = launch(["--help"], {})
    assert result.returncode == 0 and "NNODES" in result.stdout and "--dry-run" in result.stdout


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"NNODES": "0"}, [], "NNODES must be a positive integer"),
        ({"NPUS_PER_NODE": "x"}, [], "NPUS_PER_NODE must be a positive integer"),
        ({"NODE_RANK": "2", "NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, [], "NODE_RANK 2 is out of range"),
        ({"NNODES": "2"}, [], "needs MASTER_ADDR set to the head node's address"),
        ({}, ["--bogus"], "unknown argument '--bogus'"),
        ({}, ["--config-name"], "--config-name needs a value"),
    ],
)
def test_argument_errors(paths, env, args, message):
    result = launch(["--dry-run", *args], paths | env)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "usage:" in result.stderr


def test_path_errors(paths, tmp_path):
    def fails(env: dict[str, str], *fragments: str) -> None:
        result = launch(["--dry-run"], env)
        assert result.returncode == 1, result.stdout
        for fragment in fragments:
            assert fragment in result.stderr, result.stderr

    fails({k: v for k, v in paths.items() if k != "MINDSPEED_RL_DIR"}, "MINDSPEED_RL_DIR is not set")
    fails(paths | {"MINDSPEED_RL_DIR": str(tmp_path / "nope")}, f"MINDSPEED_RL_DIR={tmp_path / 'nope'} does not exist")
    fails(paths | {"MINDSPEED_RL_DIR": str(tmp_path)}, "is not a MindSpeed-RL checkout")
    fails({k: v for k, v in paths.items() if k != "MODEL_PATH"}, "MODEL_PATH is not set")
    fails(paths | {"MODEL_PATH": str(tmp_path / "data")}, "has no config.json")
    fails(
        paths | {"DATA_PATH": str(tmp_path / "data" / "other")}, "other_packed_input_ids_document", "preprocess_data.py"
    )
    fails(paths | {"LOAD_PATH": str(tmp_path / "missing_ckpt")}, "LOAD_PATH=", "does not exist")
    fails(paths | {"CONFIG_NAME": "grpo_nope"}, "config 'grpo_nope' not found", MAIN)
    (tmp_path / "data" / "gsm8k_packed_labels_document.idx").unlink()
    fails(paths, "gsm8k_packed_labels_document", "dataset_additional_keys: [labels]")


def test_relative_paths_resolve_against_the_caller(paths, tmp_path):
    rel = {k: os.path.relpath(v, tmp_path) for k, v in paths.items() if k in ("MODEL_PATH", "DATA_PATH")}
    result = launch(["--dry-run"], paths | rel, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"megatron_training.data_path=\\'{paths['DATA_PATH']}\\'" in result.stdout


def test_plan_rejection_fails_before_any_ray_command(paths):
    for args in (["--dry-run"], []):
        result = launch([*args, "--", "actor_config.tensor_model_parallel_size=3"], paths)
        assert result.returncode == 1, result.stdout
        assert "plan rejected" in result.stderr and "[plan] plan REJECTED" in result.stdout
    assert not [c for c in calls(paths) if c.startswith("ray") or "mindspeed_rl_r3.train" in c]


def test_too_few_npus_on_the_node_fails_before_any_ray_command(paths):
    result = launch([], paths | {"STUB_NODE_NPUS": "8"})
    assert result.returncode == 1
    assert "npu-smi sees 8 NPUs on this node, NPUS_PER_NODE is 16" in result.stderr
    assert calls(paths) == ["npu-smi info -l"]  # not even plan


def test_missing_ray_fails_a_dry_run_too(paths, tmp_path):
    (tmp_path / "bin" / "ray").unlink()
    result = launch(["--dry-run"], paths | {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})
    assert result.returncode == 1 and "ray is not in PATH" in result.stderr


@pytest.mark.parametrize("train_exit", [0, 3])
def test_the_launcher_stops_only_the_ray_head_it_started(paths, train_exit):
    result = launch([], paths | {"STUB_TRAIN_EXIT": str(train_exit)})
    assert result.returncode == train_exit, result.stderr
    assert "training ran" in result.stdout and "Ray cluster ready: 16 NPUs" in result.stdout
    log = calls(paths)
    head = [c for c in log if c.startswith("ray start")]
    assert len(head) == 1 and f"--head --block --port {paths['RAY_PORT']}" in head[0]
    assert log[-1] == "ray head stopped by TERM"  # its own head, after training, failed or not
    assert not [c for c in log if c.startswith("ray stop")]  # never `ray stop`: that would hit other clusters
    assert "stopping the Ray head this launch started" in result.stderr
    assert ("training failed (exit status 3)" in result.stderr) == bool(train_exit)
    assert len(list(Path(paths["LOG_DIR"]).glob(f"{MAIN}_*.log"))) == 1


def test_a_taken_ray_port_is_reported_not_cleared(paths):
    with socket.socket() as foreign:  # another job's Ray head
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = str(foreign.getsockname()[1])
        for args in (["--dry-run"], []):
            result = launch(args, paths | {"RAY_PORT": port})
            assert result.returncode == 1, result.stdout
            assert f"port {port} on this node is in use" in result.stderr
    assert not [c for c in calls(paths) if c.startswith("ray") or "mindspeed_rl_r3.train" in c]


def test_a_head_that_fails_to_start_stops_the_launch(paths):
    result = launch([], paths | {"STUB_HEAD_FAILS": "1"})
    assert result.returncode == 1
    assert "'ray start --head' exited (status 1) before the cluster was ready" in result.stderr
    assert not [c for c in calls(paths) if c.startswith("ray stop") or "mindspeed_rl_r3.train" in c]
