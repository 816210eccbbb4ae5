#!/usr/bin/env bash
# Fresh-machine test run, three environments:
# 1. .venv: the CPU torch wheel, megatron-core 0.12.1 (MindSpeed-RL's pin) and the package with its test extras; ruff,
#    the suite, and the replay tests again on megatron-core 0.16.1 (native RouterReplay hook);
# 2. .venv-upstream (ci/upstream/install.sh): torch 2.8.0 with the real vLLM 0.11.0 engine, in which tests/upstream
#    runs against the real MindSpeed-RL / MindSpeed / MindSpeed-LLM / vllm-ascend sources of ../shared/upstream.
# 3. .venv-vllm027 (ci/vllm027/install.sh): vLLM 0.27.0 on the CPU torch wheel, whose own routed-experts capture is
#    the independent oracle for the package's capture, and the demo rolling out through that engine (tests/vllm027).
# Any upstream-backed test that skips while ../shared/upstream exists, or an oracle test that skips, fails the run.
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
deactivate
echo "== upstream environment: torch 2.8.0, vLLM 0.11.0, megatron-core 0.12.1 =="
bash ci/upstream/install.sh .venv-upstream 2>&1 | grep -v "^WARNING: Location"
echo "== tests against the real upstream sources =="
.venv-upstream/bin/python -m pytest -q tests/upstream
echo "== oracle environment: torch 2.13.0+cpu, vLLM 0.27.0 =="
bash ci/vllm027/install.sh .venv-vllm027 2>&1 | grep -v "^WARNING: Location"
echo "== oracle test: the package's capture against vLLM's own routed experts; the demo's vLLM rollout =="
.venv-vllm027/bin/python -m pytest -q tests/vllm027
