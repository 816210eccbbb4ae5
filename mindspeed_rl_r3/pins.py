"""The upstream commits and versions this package is written against, in one place.

Patch targets, doctor, plan messages and tests name these constants instead of repeating the hashes.
"""

from __future__ import annotations

MINDSPEED_RL = "05a90d77"  # Ascend/MindSpeed-RL master
VLLM_ASCEND = "1b16c01a"  # vllm-project/vllm-ascend v0.11.0-dev
VLLM_ASCEND_LINE = "0.11.0"  # the capture layout of that vllm-ascend line
MINDSPEED = "ac9f0e74"  # Ascend/MindSpeed
MINDSPEED_LLM = "a2c0733b"  # Ascend/MindSpeed-LLM, branch 2.3.0
MEGATRON_CORE = "0.12.1"  # MindSpeed-RL's megatron-core pin
VLLM = "0.11.0"  # MindSpeed-RL's vLLM pin
