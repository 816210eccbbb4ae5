"""A slow, literal re-statement of how MindSpeed-RL (05a90d77) and Megatron lay a micro-batch out, used as an oracle.

Each function follows the upstream one named in its docstring step by step, with plain loops, on a *probe* batch
whose every token carries a unique integer ``sample * STRIDE + position`` (padding carries -1). Running the probe
through these functions gives, for every router row, which (sample, position) it holds.
"""

from __future__ import annotations

import torch

STRIDE = 1 << 20
PAD = -1


def probe_batch(seq_lens: list[int], padded_len: int) -> torch.Tensor:
    """``[B, S]`` right-padded batch of probe ids (``unpack_pad_experience`` with pad id -1)."""
    batch = torch.full((len(seq_lens), padded_len), PAD, dtype=torch.int64)
    for b, n in enumerate(seq_lens):
        for s in range(n):
            batch[b, s] = b * STRIDE + s
    return batch


def preprocess_packed_seqs(batch: torch.Tensor, seq_lens: list[int], multiple: int) -> tuple[torch.Tensor, list[int]]:
    """``remove_padding.preprocess_packed_seqs``: valid tokens of each sample, padded to ``multiple``, concatenated."""
    padded = [n + (multiple - n % multiple) % multiple for n in seq_lens]
    cu = [0]
    for p in padded:
        cu.append(cu[-1] + p)
    packed = torch.full((cu[-1],), PAD, dtype=torch.int64)
    for i, n in enumerate(seq_lens):
        packed[cu[i] : cu[i] + n] = batch[i, :n]
    return packed.unsqueeze(0), cu


def get_batch_on_this_cp_rank(
    tokens: torch.Tensor, cp: int, rank: int, algo: str, cu_seqlens_padded: list[int] | None
) -> torch.Tensor:
    """``context_parallel.get_batch_on_this_cp_rank`` on a ``[b, s]`` tensor (cases A, B and C of the upstream)."""
    if cp <= 1:
        return tokens
    if algo == "megatron_cp_algo" and cu_seqlens_padded is not None:  # reset_attention_mask: per packed sample
        flat = tokens.reshape(-1)
        index: list[int] = []
        start = 0
        for end in cu_seqlens_padded[1:]:
            c = (end - start) // (2 * cp)
            index += list(range(start + rank * c, start + (rank + 1) * c))
            index += list(range(end - (rank + 1) * c, end - rank * c))
            start = end
        return flat.index_select(0, torch.tensor(index, dtype=torch.long)).reshape(tokens.shape[0], -1)
    if algo == "megatron_cp_algo":
        b, s = tokens.shape
        chunks = tokens.view(b, 2 * cp, s // (2 * cp))
        kept = chunks.index_select(1, torch.tensor([rank, 2 * cp - 1 - rank]))
        return kept.reshape(b, -1)
    return tokens.chunk(cp, dim=1)[rank]


def router_rows(local: torch.Tensor, tp: int, tp_rank: int, sequence_parallel: bool, gathers: bool) -> torch.Tensor:
    """Embedding ``[b, s] -> [s, b]``, SP scatter (dim 0 split), optional TP all-gather of logits, s-major flatten."""
    seq_major = local.transpose(0, 1).contiguous()

    def on_rank(t: int) -> torch.Tensor:
        if sequence_parallel and tp > 1:
            return seq_major.chunk(tp, dim=0)[t]
        return seq_major

    if gathers and tp > 1:
        return torch.cat([on_rank(t).reshape(-1) for t in range(tp)])
    return on_rank(tp_rank).reshape(-1)


def expected_router_probe(
    seq_lens: list[int],
    *,
    tp: int,
    tp_rank: int,
    cp: int,
    cp_rank: int,
    algo: str,
    sequence_parallel: bool,
    gathers: bool,
    remove_padding: bool,
    padded_len: int,
) -> torch.Tensor:
    multiple = 2 * tp * cp if algo == "megatron_cp_algo" else tp * cp
    if remove_padding:
        batch = probe_batch(seq_lens, max(seq_lens))
        tokens, cu = preprocess_packed_seqs(batch, seq_lens, multiple)
        local = get_batch_on_this_cp_rank(tokens, cp, cp_rank, algo, cu if algo == "megatron_cp_algo" else None)
    else:
        tokens = probe_batch(seq_lens, padded_len)
        local = get_batch_on_this_cp_rank(tokens, cp, cp_rank, algo, None)
    return router_rows(local, tp, tp_rank, sequence_parallel, gathers)
