"""Fake ``mindspeed_rl/utils/context_parallel.py::get_batch_on_this_cp_rank`` at 05a90d77 (rewritten).

Slices every tensor of the batch along dim 1: ``megatron_cp_algo`` with ``reset_attention_mask`` and a causal mask
keeps chunks ``r`` and ``2cp-1-r`` of every packed sample (boundaries ``actual_seq_len``, the padded cumulative
lengths), plain ``megatron_cp_algo`` those chunks of the whole row, ``ulysses_cp_algo`` the ``r``-th contiguous part.
"""

import torch

from mindspeed_rl.utils.compute import get_parallel_state


def get_ring_degree(megatron_config):
    return 1


def _eod_index(actual_seq_len, cp, r):
    index, start = [], 0
    for end in actual_seq_len:
        c = (end - start) // (2 * cp)
        index += list(range(start + r * c, start + (r + 1) * c))
        index += list(range(end - (r + 1) * c, end - r * c))
        start = end
    return torch.tensor(index, dtype=torch.long)


def get_batch_on_this_cp_rank(megatron_config, batch, actual_seq_len):
    if megatron_config.context_parallel_size <= 1:
        return batch
    state = get_parallel_state()
    cp, r = state.get_context_parallel_world_size(), state.get_context_parallel_rank()
    algo = megatron_config.context_parallel_algo
    index = None
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = value
            continue
        b, s = value.shape[0], value.shape[1]
        if algo == "megatron_cp_algo" and megatron_config.reset_attention_mask:
            index = _eod_index([int(x) for x in actual_seq_len], cp, r)
            out[key] = value.reshape(b * s, *value.shape[2:]).index_select(0, index).reshape(b, -1, *value.shape[2:])
        elif algo == "megatron_cp_algo":
            chunks = value.reshape(b, 2 * cp, s // (2 * cp), *value.shape[2:])
            index = torch.tensor([r, 2 * cp - 1 - r])
            out[key] = chunks.index_select(1, index).reshape(b, -1, *value.shape[2:])
        else:
            out[key] = value.chunk(cp, dim=1)[r]
    return out, index
