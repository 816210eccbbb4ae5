"""Per-sample routing traces: which experts the rollout engine chose for every token at every MoE layer.

A sample of ``P`` prompt tokens and ``R`` response tokens has ``P + R - 1`` routing rows (the last sampled token is
never fed through the rollout model). Row ``i`` holds, for each MoE layer, the top-k *logical* expert ids chosen for
the token at position ``i``. Rows or (row, layer) cells the engine did not record are *missing*: every one of their k
entries holds the dtype's sentinel, and training falls back to native routing there (never to expert 0).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


class RoutingError(ValueError):
    """Routing data that cannot be replayed as given. The message names the sample, layer and row involved."""


MISSING_UINT8 = 255
MISSING_INT16 = -1


def compact_dtype(num_experts: int) -> torch.dtype:
    """Smallest dtype holding ids ``0..num_experts-1`` plus a distinct missing sentinel."""
    if num_experts < 1:
        raise RoutingError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts <= 255:  # 255 is the sentinel
        return torch.uint8
    if num_experts <= 32767:
        return torch.int16
    raise RoutingError(f"num_experts={num_experts} exceeds the int16 trace limit of 32767")


def missing_value(dtype: torch.dtype) -> int:
    if dtype == torch.uint8:
        return MISSING_UINT8
    if dtype == torch.int16:
        return MISSING_INT16
    raise RoutingError(f"trace ids must be uint8 or int16, got {dtype}")


def token_fingerprint(token_ids: torch.Tensor | np.ndarray | Sequence[int]) -> int:
    """CRC32 of the token ids as int32, so rollout and training can prove they routed the same tokens."""
    arr = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
    return zlib.crc32(np.ascontiguousarray(arr, dtype=np.int32).reshape(-1))


@dataclass(frozen=True)
class MoEModelSpec:
    """What a routing trace must look like for one model.

    ``moe_layers`` are the HF/vLLM decoder-layer indices (0-based, noop layers excluded) that have a router, in order;
    trace layer ``j`` belongs to decoder layer ``moe_layers[j]``.
    """

    num_layers: int
    topk: int
    num_experts: int
    moe_layers: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", tuple(range(self.num_layers)))
        if self.topk < 1 or self.topk > self.num_experts:
            raise RoutingError(f"topk must be in [1, num_experts={self.num_experts}], got {self.topk}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.moe_layers)) != len(self.moe_layers) or list(self.moe_layers) != sorted(self.moe_layers):
            raise RoutingError(
                f"moe_layers must be distinct increasing indices in [0, {self.num_layers}), got {self.moe_layers}"
            )
        compact_dtype(self.num_experts)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def dtype(self) -> torch.dtype:
        return compact_dtype(self.num_experts)

    @property
    def layout_id(self) -> int:
        """Nonzero 32-bit fingerprint of the routing layout: decoder layer count, which layers are MoE, top-k, experts.

        Two models with the same counts but MoE layers in different places get different ids, so a payload stamped
        with one is refused by the other (see :mod:`mindspeed_rl_r3.routing.codec`).
        """
        words = np.asarray([self.num_layers, self.topk, self.num_experts, *self.moe_layers], dtype=np.int64)
        return zlib.crc32(words.tobytes(), zlib.crc32(b"R3-moe-layout")) or 1

    def describe(self) -> str:
        """``MoE layers [1, 2, 4, 5] of 6, top-8 of 128 experts`` (for error messages)."""
        return (
            f"MoE layers {list(self.moe_layers)} of {self.num_layers}, top-{self.topk} of {self.num_experts} experts"
        )

    @classmethod
    def from_hf_config(cls, config: object) -> MoEModelSpec:
        """Read a Qwen3-MoE / Qwen2-MoE style HF config (object or dict)."""

        def get(name: str, default: object = None) -> object:
            return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)

        num_layers = int(get("num_hidden_layers"))
        sparse_step = int(get("decoder_sparse_step", 1) or 1)
        dense = set(get("mlp_only_layers", None) or [])
        moe = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % sparse_step == 0)
        return cls(
            num_layers=num_layers,
            topk=int(get("num_experts_per_tok")),
            num_experts=int(get("num_experts")),
            moe_layers=moe,
        )

    @classmethod
    def qwen3_30b_a3b(cls) -> MoEModelSpec:
        return cls(num_layers=48, topk=8, num_experts=128)


@dataclass(frozen=True)
class RoutingTrace:
    """Routing of one sample: ``ids`` is ``[rows, num_moe_layers, topk]`` in :func:`compact_dtype`.

    ``prompt_len`` (tokens) and ``token_hash`` (:func:`token_fingerprint` of prompt + response ids) are optional
    provenance, checked against the training batch when present. ``layout`` is the recording model's
    :attr:`MoEModelSpec.layout_id` when known; the codec carries it, and decoding or validating against a spec with
    another routing layout is refused.
    """

    ids: torch.Tensor
    num_experts: int
    prompt_len: int | None = None
    token_hash: int | None = None
    layout: int | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() != 3:
            raise RoutingError(f"trace ids must be [rows, layers, topk], got shape {tuple(self.ids.shape)}")
        expected = compact_dtype(self.num_experts)
        if self.ids.dtype != expected:
            raise RoutingError(
                f"trace ids for {self.num_experts} experts must be {expected}, got {self.ids.dtype}; "
                "build traces with RoutingTrace.from_ids"
            )
        if self.layout is not None and not 0 < self.layout < 1 << 32:
            raise RoutingError(f"trace layout must be a MoEModelSpec.layout_id (nonzero uint32), got {self.layout}")

    @classmethod
    def from_ids(
        cls,
        ids: torch.Tensor | np.ndarray,
        num_experts: int,
        prompt_len: int | None = None,
        token_ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        layout: int | None = None,
    ) -> RoutingTrace:
        """Build a trace from any integer ids ``[rows, layers, topk]``; negative ids mark missing entries.

        ``layout`` is the recording model's :attr:`MoEModelSpec.layout_id`.
        """
        t = torch.as_tensor(ids)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise RoutingError(f"expert ids must be integers, got {t.dtype}")
        dtype = compact_dtype(num_experts)
        t = t.detach().to("cpu")
        if t.dtype != dtype:
            wide = t.to(torch.int64)
            # An out-of-range id must stay out of range after the cast, so validation still catches it.
            bad = (wide >= num_experts).any() or (wide < -1).any()
            if bad:
                raise RoutingError(
                    f"expert ids must be in [0, {num_experts}) or negative for missing; found values in "
                    f"[{int(wide.min())}, {int(wide.max())}]"
                )
            t = torch.where(wide < 0, torch.full_like(wide, missing_value(dtype)), wide).to(dtype)
        fingerprint = None if token_ids is None else token_fingerprint(token_ids)
        return cls(t.contiguous(), num_experts, prompt_len, fingerprint, layout)

    @classmethod
    def all_missing(cls, rows: int, spec: MoEModelSpec) -> RoutingTrace:
        ids = torch.full((rows, spec.num_moe_layers, spec.topk), missing_value(spec.dtype), dtype=spec.dtype)
        return cls(ids, spec.num_experts, layout=spec.layout_id)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.ids.shape[1]

    @property
    def topk(self) -> int:
        return self.ids.shape[2]

    @property
    def sentinel(self) -> int:
        return missing_value(self.ids.dtype)

    @property
    def response_len(self) -> int | None:
        return None if self.prompt_len is None else self.rows + 1 - self.prompt_len

    def missing(self) -> torch.Tensor:
        """Bool ``[rows, layers]``: True where the rollout recorded nothing."""
        return self.ids[..., 0] == self.sentinel

    def to_int64(self) -> torch.Tensor:
        """``[rows, layers, topk]`` int64 with -1 for missing entries."""
        wide = self.ids.to(torch.int64)
        return wide.masked_fill_(self.ids == self.sentinel, -1) if self.ids.dtype == torch.uint8 else wide

    def extend(self, continuation: RoutingTrace) -> RoutingTrace:
        """Append the rows of a partial-rollout continuation (its rows follow this trace's rows)."""
        if continuation.ids.shape[1:] != self.ids.shape[1:] or continuation.num_experts != self.num_experts:
            raise RoutingError(
                f"continuation has layers/topk/experts {tuple(continuation.ids.shape[1:])}/"
                f"{continuation.num_experts}, trace has {tuple(self.ids.shape[1:])}/{self.num_experts}"
            )
        if None not in (self.layout, continuation.layout) and self.layout != continuation.layout:
            raise RoutingError(
                f"continuation was recorded by a model with routing layout {continuation.layout:#010x}, the trace by "
                f"{self.layout:#010x}"
            )
        layout = self.layout if self.layout is not None else continuation.layout
        return RoutingTrace(torch.cat([self.ids, continuation.ids]), self.num_experts, self.prompt_len, layout=layout)


def _where(sample_index: int | None) -> str:
    return "trace" if sample_index is None else f"sample {sample_index}"


def _first_cell(mask: torch.Tensor) -> tuple[int, int]:
    row, layer = (int(v) for v in mask.nonzero()[0])
    return row, layer


def validate_trace(
    trace: RoutingTrace,
    spec: MoEModelSpec | None = None,
    *,
    sample_index: int | None = None,
    prompt_len: int | None = None,
    response_len: int | None = None,
    token_ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
) -> None:
    """Raise :class:`RoutingError` naming the sample, layer and row of the first problem found.

    Checks: shape against ``spec``; ids in ``[0, num_experts)``; ids distinct within each (row, layer); missing cells
    marked in all k entries; ``rows == prompt_len + response_len - 1``; prompt length and token fingerprint against
    the trace's own provenance when both sides have it.
    """
    where = _where(sample_index)
    if spec is not None:
        found = (trace.num_layers, trace.topk, trace.num_experts)
        expected = (spec.num_moe_layers, spec.topk, spec.num_experts)
        if found != expected:
            raise RoutingError(
                f"{where}: trace has (moe_layers, topk, num_experts) = {found}, the model expects {expected}"
            )
        if trace.layout is not None and trace.layout != spec.layout_id:
            raise RoutingError(
                f"{where}: trace was recorded by a model with routing layout {trace.layout:#010x}, this model "
                f"({spec.describe()}) has {spec.layout_id:#010x}: same counts, MoE layers in other places"
            )
    if prompt_len is not None and trace.prompt_len is not None and prompt_len != trace.prompt_len:
        raise RoutingError(
            f"{where}: prompt length {prompt_len} expected, the trace was recorded for {trace.prompt_len}"
        )
    if prompt_len is not None and response_len is not None and trace.rows != prompt_len + response_len - 1:
        raise RoutingError(
            f"{where}: expected {prompt_len + response_len - 1} routing rows (prompt {prompt_len} + response "
            f"{response_len} - 1), found {trace.rows}"
        )
    if token_ids is not None and trace.token_hash is not None:
        found_hash = token_fingerprint(token_ids)
        if found_hash != trace.token_hash:
            raise RoutingError(
                f"{where}: token fingerprint {found_hash:#010x} of the training tokens differs from "
                f"{trace.token_hash:#010x} recorded at rollout; the routing belongs to different tokens "
                "(re-tokenized prompt?)"
            )
    ids = trace.ids
    if ids.numel() == 0:
        return
    sentinel = trace.sentinel
    is_missing = ids == sentinel
    partial = is_missing.any(-1) & ~is_missing.all(-1)
    if partial.any():
        row, layer = _first_cell(partial)
        raise RoutingError(
            f"{where}: layer {layer} row {row} mixes missing markers with ids {ids[row, layer].tolist()}; "
            "a cell is missing in all top-k entries or in none"
        )
    out_of_range = ((ids >= trace.num_experts) | (ids < 0)) & ~is_missing
    if out_of_range.any():
        row, layer = _first_cell(out_of_range.any(-1))
        raise RoutingError(
            f"{where}: layer {layer} row {row} has ids {ids[row, layer].tolist()}, expected values in "
            f"[0, {trace.num_experts})"
        )
    if trace.topk > 1:
        ordered = ids.sort(dim=-1).values
        duplicate = (ordered[..., 1:] == ordered[..., :-1]).any(-1) & ~is_missing[..., 0]
        if duplicate.any():
            row, layer = _first_cell(duplicate)
            raise RoutingError(
                f"{where}: layer {layer} row {row} has duplicate expert ids {ids[row, layer].tolist()}, "
                "expected distinct ids"
            )


def validate_batch(
    traces: Sequence[RoutingTrace],
    spec: MoEModelSpec,
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
) -> None:
    """Validate every trace of a batch against its sample's lengths; errors name the sample index."""
    if not len(traces) == len(prompt_lens) == len(response_lens):
        raise RoutingError(
            f"batch has {len(traces)} traces for {len(prompt_lens)} prompt and {len(response_lens)} response lengths"
        )
    for i, (trace, p, r) in enumerate(zip(traces, prompt_lens, response_lens, strict=True)):
        validate_trace(trace, spec, sample_index=i, prompt_len=int(p), response_len=int(r))
