#!/usr/bin/env bash
# Fresh-machine test run: a venv with the CPU torch wheel, the package with its test extras, ruff, and the suite on
# megatron-core 0.12.1 (MindSpeed-RL's pin) and again, for the replay tests, on 0.16.1 (native RouterReplay hook).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q --no-deps megatron-core==0.12.1
pip install -q -e ".[test]"
pip install -q --no-deps --upgrade --target .venv/megatron-core-0.16 megatron-core==0.16.1
ruff check .
echo "== tests, megatron-core 0.12.1 =="
python -m pytest -q
echo "== replay tests, megatron-core 0.16.1 =="
PYTHONPATH=.venv/megatron-core-0.16 python -m pytest -q -m megatron
