"""Datasets for the GRPO jobs: GSM8K reading, conversion to MindSpeed-RL's preprocess input, answer extraction and
reward, and a synthetic GSM8K-format generator for machines without the real files."""

from mindspeed_rl_r3.data.gsm8k import (
    GSM8KFormatError,
    convert_gsm8k,
    extract_final_number,
    gsm8k_reward,
    parse_number,
    read_gsm8k,
    synthetic_gsm8k,
    to_mindspeed_rl_record,
    write_synthetic_gsm8k,
)

__all__ = [
    "GSM8KFormatError",
    "convert_gsm8k",
    "extract_final_number",
    "gsm8k_reward",
    "parse_number",
    "read_gsm8k",
    "synthetic_gsm8k",
    "to_mindspeed_rl_record",
    "write_synthetic_gsm8k",
]
