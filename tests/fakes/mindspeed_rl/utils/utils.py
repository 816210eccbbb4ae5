"""Fake ``mindspeed_rl/utils/utils.py`` at 05a90d77 (rewritten): the helpers the trainer, workers and engine use.

``metrics_post_processing`` keeps the upstream rules: ``timing`` lists become max - min (``resharding``: max),
``start_time`` min, ``end_time`` max, any other list its mean.
"""

import os

import torch


def is_multimodal():
    return os.environ.get("IS_MULTIMODAL", "False") == "True"


def generate_position_ids(input_ids):
    return [list(range(input_ids.size(1))) for _ in range(input_ids.size(0))]


def generate_mask(data_pad, seq_lengths):
    width = data_pad.size(1)
    lengths = torch.as_tensor(seq_lengths).reshape(-1, 1)
    return (torch.arange(width).unsqueeze(0) < lengths).to(torch.int64)


def get_current_dp_range_indexes(experience_count, assign_batch_size, current_dp_rank=0):
    start = assign_batch_size * current_dp_rank
    indexes = list(range(start, start + assign_batch_size))
    return [indexes[i : i + experience_count] for i in range(0, len(indexes), experience_count)]


def _mean(values):
    numbers = [v for v in values if isinstance(v, int | float)]
    return sum(numbers) / len(numbers)


def metrics_post_processing(metrics):
    out = {}
    for key, value in metrics.metric.items():
        if not isinstance(value, list):
            out[key] = value
        elif "timing" in key:
            out[key] = max(value) if "resharding" in key else max(value) - min(value)
        elif "start_time" in key:
            out[key] = min(value)
        elif "end_time" in key:
            out[key] = max(value)
        else:
            out[key] = _mean(value)
    return out
