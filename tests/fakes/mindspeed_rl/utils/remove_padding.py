"""Fake ``mindspeed_rl/utils/remove_padding.py::preprocess_packed_seqs`` at 05a90d77 (rewritten, same layout):
each sample's valid tokens padded with zeros to a multiple of ``tp_size``, concatenated into ``[1, total]``;
positions restart at 0 per padded sample."""

import torch


def preprocess_packed_seqs(input_ids, labels, attention_mask_1d, tp_size):
    lens = attention_mask_1d.sum(dim=1).to(torch.int32)
    padded = lens + (tp_size - lens % tp_size) % tp_size
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(padded, 0)
    total = int(cu[-1])
    ids = torch.zeros(total, dtype=input_ids.dtype)
    lab = torch.zeros(total, dtype=input_ids.dtype)
    pos = torch.zeros(total, dtype=torch.int32)
    for i, n in enumerate(lens.tolist()):
        start, end = int(cu[i]), int(cu[i + 1])
        ids[start : start + n] = input_ids[i, :n]
        lab[start : start + n] = labels[i, :n]
        pos[start:end] = torch.arange(end - start, dtype=torch.int32)
    return ids.unsqueeze(0), pos.unsqueeze(0), lab.unsqueeze(0), lens, cu
