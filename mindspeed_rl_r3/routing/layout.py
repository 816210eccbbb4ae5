"""Lay routing traces out in the exact token order a Megatron rank's routers see for one micro-batch.

MindSpeed-RL (``05a90d77``) feeds a micro-batch to Megatron in one of two forms, then splits it over context parallel
(CP) and sequence parallel (SP) ranks:

* right-padded ``[B, S]``, every sample padded to the same ``S``; the model works on ``[s, b]`` and each router
  flattens it s-major (row ``s * B + b``);
* remove-padding: each sample's valid tokens padded to a multiple ``m`` (``2*tp*cp`` for ``megatron_cp_algo``,
  else ``tp*cp``) and concatenated into one ``[1, total]`` sequence (``preprocess_packed_seqs``).

CP (``get_batch_on_this_cp_rank``) slices the sequence dim: ``megatron_cp_algo`` cuts it into ``2*cp`` chunks and
rank ``r`` keeps chunks ``r`` and ``2*cp-1-r`` (per packed sample when packed, since remove-padding forces
``reset_attention_mask``; over the whole row otherwise); ``ulysses_cp_algo`` keeps the ``r``-th contiguous chunk.
SP hands TP rank ``t`` the ``t``-th contiguous chunk of the CP-local sequence. MindSpeed-LLM's ``alltoall_seq``
router with TP > 1 all-gathers its logits over TP first, so it sees the whole CP-local micro-batch (and, without SP,
``tp`` copies of it); the ``moe_tp_extend_ep`` split comes after routing and does not change what the router sees.

Everything here is index arithmetic on whole tensors: no Python loop over tokens or layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mindspeed_rl_r3.routing.trace import RoutingError, RoutingTrace, compact_dtype, missing_value

CP_ALGOS = ("megatron_cp_algo", "ulysses_cp_algo")


@dataclass(frozen=True)
class RouterTokenLayout:
    """How one rank's routers see a micro-batch.

    ``router_gathers_tp``: the router all-gathers logits over TP before choosing experts (MindSpeed-LLM's
    ``alltoall_seq`` dispatcher with ``tensor_model_parallel_size > 1``).
    """

    tp_size: int = 1
    tp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0
    cp_algo: str = "megatron_cp_algo"
    sequence_parallel: bool = False
    router_gathers_tp: bool = False
    remove_padding: bool = False

    def __post_init__(self) -> None:
        if self.cp_algo not in CP_ALGOS:
            raise RoutingError(f"context_parallel_algo {self.cp_algo!r} is not supported; expected one of {CP_ALGOS}")
        for size, rank, name in ((self.tp_size, self.tp_rank, "tp"), (self.cp_size, self.cp_rank, "cp")):
            if size < 1 or not 0 <= rank < size:
                raise RoutingError(f"{name} rank {rank} is outside a {name} group of size {size}")

    @property
    def pad_multiple(self) -> int:
        """The multiple MindSpeed-RL pads each packed sample (and its HCCL-dispatched batches) to."""
        base = self.tp_size * self.cp_size
        return 2 * base if self.cp_algo == "megatron_cp_algo" else base

    def padded_len(self, seq_lens: torch.Tensor) -> int:
        """Right-padded row length for these samples: the longest rounded up to :attr:`pad_multiple`."""
        longest = int(seq_lens.max()) if seq_lens.numel() else 0
        return -(-longest // self.pad_multiple) * self.pad_multiple


def _cp_chunk_positions(length: int, layout: RouterTokenLayout) -> torch.Tensor:
    """Positions of one sequence of ``length`` kept by this CP rank, in the order the rank holds them."""
    cp, r = layout.cp_size, layout.cp_rank
    if cp == 1:
        return torch.arange(length)
    parts = 2 * cp if layout.cp_algo == "megatron_cp_algo" else cp
    if length % parts:
        raise RoutingError(f"sequence length {length} does not split into {parts} CP chunks ({layout.cp_algo})")
    c = length // parts
    if layout.cp_algo == "ulysses_cp_algo":
        return torch.arange(r * c, (r + 1) * c)
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((parts - 1 - r) * c, (parts - r) * c)])


def _packed_cp_positions(padded: torch.Tensor, layout: RouterTokenLayout) -> torch.Tensor:
    """Megatron zigzag CP applied to every packed sample: chunks r and 2cp-1-r of each, samples in order."""
    cp, r = layout.cp_size, layout.cp_rank
    chunk = padded // (2 * cp)
    starts = torch.cumsum(padded, 0) - padded
    per_sample = 2 * chunk
    sample = torch.repeat_interleave(torch.arange(padded.numel()), per_sample)
    k = torch.arange(int(per_sample.sum())) - torch.repeat_interleave(
        torch.cumsum(per_sample, 0) - per_sample, per_sample
    )
    c = chunk[sample]
    within = torch.where(k < c, r * c + k, (2 * cp - 1 - r) * c + (k - c))
    return starts[sample] + within


def _router_view(local: torch.Tensor, layout: RouterTokenLayout) -> torch.Tensor:
    """From the CP-local sequence positions to the ones the router sees on this TP rank (SP slice / TP gather)."""
    tp = layout.tp_size
    if tp == 1:
        return local
    if layout.router_gathers_tp:
        # Every rank contributes its share in TP-rank order: the whole local sequence, or tp copies without SP.
        return local if layout.sequence_parallel else local.repeat(tp)
    if not layout.sequence_parallel:
        return local
    if local.numel() % tp:
        raise RoutingError(f"CP-local sequence of {local.numel()} tokens does not split over tp={tp} for SP")
    n = local.numel() // tp
    return local[layout.tp_rank * n : (layout.tp_rank + 1) * n]


def router_token_positions(
    seq_lens: torch.Tensor | Sequence[int],
    layout: RouterTokenLayout,
    padded_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample, position)`` of every token the router sees, in router row order (both int64 ``[T]``).

    ``seq_lens`` are the training lengths (prompt + response) of the micro-batch's samples in micro-batch order.
    ``padded_len`` is ``S`` of the right-padded batch (default :meth:`RouterTokenLayout.padded_len`); ignored
    with remove-padding. Positions past a sample's valid tokens are padding.
    """
    lens = torch.as_tensor(seq_lens, dtype=torch.int64).reshape(-1)
    if (lens < 0).any():
        raise RoutingError(f"sequence lengths must be >= 0, got {lens.tolist()}")
    if layout.remove_padding:
        m = layout.pad_multiple
        padded = -(-lens // m) * m
        starts = torch.cumsum(padded, 0) - padded
        if layout.cp_size > 1 and layout.cp_algo == "megatron_cp_algo":
            local = _packed_cp_positions(padded, layout)
        else:
            local = _cp_chunk_positions(int(padded.sum()), layout)
        packed = _router_view(local, layout)
        sample = torch.searchsorted(torch.cumsum(padded, 0), packed, right=True)
        return sample, packed - starts[sample]
    s = layout.padded_len(lens) if padded_len is None else int(padded_len)
    if lens.numel() and s < int(lens.max()):
        raise RoutingError(f"padded length {s} is shorter than the longest sample ({int(lens.max())} tokens)")
    rows = _router_view(_cp_chunk_positions(s, layout), layout)
    batch = lens.numel()
    return torch.arange(batch).repeat(rows.numel()), rows.repeat_interleave(batch)


@dataclass(frozen=True)
class ReplayBatch:
    """Replay ids for the MoE layers of one rank and one micro-batch.

    ``ids`` is ``[tokens, layers, topk]``: row ``t`` is the ``t``-th token the routers see, column ``j`` belongs to
    Megatron layer ``layer_numbers[j]`` (global, 1-based). It keeps the trace dtype, with ``sentinel`` wherever
    nothing may be replayed (padding, a sample's last token, unrecorded cells). Token-major, so the whole micro-batch
    moves to the device in one copy and each layer reads a strided view there.
    """

    layer_numbers: tuple[int, ...]
    ids: torch.Tensor
    sentinel: int

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    def missing(self) -> torch.Tensor:
        """Bool ``[tokens, layers]``: cells that must fall back to native routing."""
        return self.ids[..., 0] == self.sentinel

    def to(self, device: torch.device | str) -> ReplayBatch:
        return ReplayBatch(self.layer_numbers, self.ids.to(device, non_blocking=True), self.sentinel)

    def layer(self, layer_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids int64 [T, k], missing bool [T])`` for one layer; missing rows hold id 0 so they index safely."""
        try:
            j = self.layer_numbers.index(layer_number)
        except ValueError:
            raise RoutingError(f"layer {layer_number} is not on this rank (has {list(self.layer_numbers)})") from None
        return self.column(j)

    def column(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`layer` by position in :attr:`layer_numbers`."""
        ids = self.ids[:, j]
        missing = ids[:, 0] == self.sentinel
        return ids.to(torch.int64).masked_fill_(missing.unsqueeze(1), 0), missing


def select_micro_batch(traces: Sequence[RoutingTrace], indices: Sequence[int]) -> list[RoutingTrace]:
    """Traces of one dynamic-batch-size micro-batch, in its (reordered) sample order."""
    return [traces[int(i)] for i in indices]


def layout_micro_batch(
    traces: Sequence[RoutingTrace],
    seq_lens: torch.Tensor | Sequence[int],
    layout: RouterTokenLayout,
    *,
    layers: Sequence[int] | None = None,
    layer_numbers: Sequence[int] | None = None,
    padded_len: int | None = None,
    first_sample_index: int = 0,
) -> ReplayBatch:
    """Replay ids for this rank's routers from the micro-batch's traces (in micro-batch order).

    ``layers``: trace layer indices held by this rank, in the rank's layer order (default: all); ``layer_numbers``:
    the Megatron layer numbers they bind to (default ``layer + 1``; see :mod:`mindspeed_rl_r3.routing.stages`).
    Each trace must have ``seq_len - 1`` rows; a sample's last position and padding are missing.
    """
    if not traces:
        raise RoutingError("micro-batch has no routing traces")
    lens = torch.as_tensor(seq_lens, dtype=torch.int64).reshape(-1)
    if lens.numel() != len(traces):
        raise RoutingError(f"micro-batch has {len(traces)} traces for {lens.numel()} sequence lengths")
    first = traces[0]
    rows = torch.tensor([t.rows for t in traces])
    for i, t in enumerate(traces):
        if t.ids.shape[1:] != first.ids.shape[1:] or t.ids.dtype != first.ids.dtype:
            raise RoutingError(
                f"sample {first_sample_index + i}: trace is {tuple(t.ids.shape[1:])} {t.ids.dtype}, the micro-batch's "
                f"first is {tuple(first.ids.shape[1:])} {first.ids.dtype}"
            )
    bad = (rows != (lens - 1).clamp(min=0)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise RoutingError(
            f"sample {first_sample_index + i}: expected {max(int(lens[i]) - 1, 0)} routing rows for {int(lens[i])} "
            f"training tokens, found {int(rows[i])}"
        )
    layer_sel = list(range(first.num_layers)) if layers is None else [int(x) for x in layers]
    if any(not 0 <= x < first.num_layers for x in layer_sel):
        raise RoutingError(f"layers {layer_sel} outside the trace's {first.num_layers} MoE layers")
    numbers = tuple(x + 1 for x in layer_sel) if layer_numbers is None else tuple(int(x) for x in layer_numbers)
    if len(numbers) != len(layer_sel):
        raise RoutingError(f"{len(layer_sel)} layers but {len(numbers)} layer numbers")

    sample, pos = router_token_positions(lens, layout, padded_len)
    offsets = torch.cumsum(rows, 0) - rows
    total = int(rows.sum())
    # Rows that have no routing point at an extra all-missing row appended after the real ones.
    flat = torch.where(pos < rows[sample], offsets[sample] + pos, total)
    contiguous = layer_sel == list(range(layer_sel[0], layer_sel[-1] + 1)) if layer_sel else True
    pick = slice(layer_sel[0], layer_sel[-1] + 1) if contiguous and layer_sel else layer_sel
    sentinel = first.sentinel
    pad_row = torch.full((1, len(layer_sel), first.topk), sentinel, dtype=first.ids.dtype)
    source = torch.cat([*(t.ids[:, pick] for t in traces), pad_row])
    return ReplayBatch(numbers, source.index_select(0, flat), sentinel)


def traces_from_recorded(
    recorded: dict[int, list[torch.Tensor]],
    micro_batch_seq_lens: Sequence[Sequence[int]],
    layout: RouterTokenLayout,
    *,
    trace_layers: Sequence[int],
    layer_numbers: Sequence[int],
    num_layers: int,
    num_experts: int,
    padded_len: int | None = None,
) -> list[RoutingTrace]:
    """R2: per-sample traces, in micro-batch order, from a recorded pass (``RouterReplayState.take_recorded()``).

    ``recorded[layer_number][m]`` holds micro-batch ``m``'s router-order ids; ``trace_layers[j]`` is the trace
    layer of ``layer_numbers[j]``.
    """
    missing = [n for n in layer_numbers if len(recorded.get(n, ())) != len(micro_batch_seq_lens)]
    if missing:
        raise RoutingError(
            f"layers {missing} recorded a different number of micro-batches than the {len(micro_batch_seq_lens)} given"
        )
    traces: list[RoutingTrace] = []
    for m, lens in enumerate(micro_batch_seq_lens):
        ids = torch.stack([recorded[n][m].cpu() for n in layer_numbers], dim=1)
        traces += traces_from_router_ids(
            ids,
            lens,
            layout,
            layers=trace_layers,
            num_layers=num_layers,
            num_experts=num_experts,
            padded_len=padded_len,
        )
    return traces


def traces_from_router_ids(
    router_ids: torch.Tensor,
    seq_lens: torch.Tensor | Sequence[int],
    layout: RouterTokenLayout,
    *,
    layers: Sequence[int],
    num_layers: int,
    num_experts: int,
    padded_len: int | None = None,
) -> list[RoutingTrace]:
    """Inverse of :func:`layout_micro_batch`: per-sample traces from ids ``[T, len(layers), k]`` in router order.

    Used by R2, which records the training router's own choice in one pass and replays it under another micro-batch
    split. Trace layers not in ``layers`` and rows this rank's routers did not see stay missing.
    """
    lens = torch.as_tensor(seq_lens, dtype=torch.int64).reshape(-1)
    sample, pos = router_token_positions(lens, layout, padded_len)
    if router_ids.dim() != 3 or router_ids.shape[0] != sample.numel() or router_ids.shape[1] != len(layers):
        raise RoutingError(
            f"router ids {tuple(router_ids.shape)} do not match {sample.numel()} router rows x {len(layers)} layers"
        )
    rows = (lens - 1).clamp(min=0)
    offsets = torch.cumsum(rows, 0) - rows
    valid = pos < rows[sample]
    dtype = compact_dtype(num_experts)
    flat = torch.full((int(rows.sum()), num_layers, router_ids.shape[2]), missing_value(dtype), dtype=dtype)
    target_rows = (offsets[sample] + pos)[valid]
    columns = torch.as_tensor(list(layers), dtype=torch.int64)
    flat[target_rows.unsqueeze(1), columns.unsqueeze(0)] = router_ids[valid].to(flat.dtype)
    return [RoutingTrace(part, num_experts) for part in torch.split(flat, rows.tolist())]
