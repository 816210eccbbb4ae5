"""Routing traces on the wire: one flat 1-D int32 tensor per sample.

MindSpeed-RL's TransferDock and its HCCL broadcast carry only 1-D int32/float32 columns, so a trace travels as a
16-word header followed by its ids' raw bytes (uint8 or int16) packed four (or two) to an int32 word. The header
describes the trace and carries checksums, so a truncated, corrupted or wrong-model payload is
rejected with a message saying which.

Header words: magic, version, flags, layers, topk, experts, rows, prompt_len, token_hash, body_bytes, shared_rows,
leader_offset, exceptions, header CRC32, body XXH3-64 (two words). Two checks, so an error can say whether the
header (dimensions, length) or the ids were damaged; XXH3 because a CRC32 of the body alone would take more time
than the whole layout step.

GRPO group dedupe: the n samples of one prompt usually route their prompt identically. :func:`encode_group` stores
the leader (first sample) in full; each follower stores only its own response rows plus the prompt rows that differ
from the leader's ("exceptions"), so nothing is lost when prefill was not bit-identical across samples.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError, RoutingTrace, compact_dtype

MAGIC = 0x52335254  # "R3RT"
VERSION = 1
HEADER_WORDS = 16

_FLAG_INT16 = 1
_FLAG_PROMPT_LEN = 2
_FLAG_TOKEN_HASH = 4
_FLAG_SHARED_PROMPT = 8
_KNOWN_FLAGS = _FLAG_INT16 | _FLAG_PROMPT_LEN | _FLAG_TOKEN_HASH | _FLAG_SHARED_PROMPT

(_MAGIC, _VERSION, _FLAGS, _LAYERS, _TOPK, _EXPERTS, _ROWS, _PROMPT_LEN, _TOKEN_HASH, _BODY_BYTES, _SHARED_ROWS,
 _LEADER_OFFSET, _EXCEPTIONS, _HEADER_CRC, _BODY_HASH_LO, _BODY_HASH_HI) = range(HEADER_WORDS)  # fmt: skip


def _i32(value: int) -> int:
    """Reinterpret an unsigned 32-bit value as int32 (hashes and magic do not fit a signed word)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


def _header_crc(header: np.ndarray) -> int:
    return zlib.crc32(header[:_HEADER_CRC])


def _body_hash(words: np.ndarray) -> tuple[int, int]:
    digest = xxhash.xxh3_64_intdigest(words)
    return _i32(digest & 0xFFFFFFFF), _i32(digest >> 32)


def _ids_bytes(ids: torch.Tensor) -> torch.Tensor:
    return ids.contiguous().view(torch.uint8).reshape(-1)


def _assemble(header: list[int], *parts: torch.Tensor) -> torch.Tensor:
    """Header + byte parts -> one int32 tensor, body padded to whole words, CRC filled in."""
    body = torch.cat([p.reshape(-1).view(torch.uint8) for p in parts]) if len(parts) > 1 else parts[0]
    nbytes = body.numel()
    out = torch.empty(HEADER_WORDS + (nbytes + 3) // 4, dtype=torch.int32)
    out[-1] = 0  # the last word's padding bytes (the body, if any, overwrites the rest)
    out[HEADER_WORDS:].view(torch.uint8)[:nbytes] = body
    header[_BODY_BYTES] = nbytes
    head = np.asarray(header, dtype=np.int64).astype(np.int32)
    head[_BODY_HASH_LO], head[_BODY_HASH_HI] = _body_hash(out[HEADER_WORDS:].numpy())
    head[_HEADER_CRC] = _i32(_header_crc(head))
    out[:HEADER_WORDS] = torch.from_numpy(head)
    return out


def _header(trace: RoutingTrace) -> list[int]:
    h = [0] * HEADER_WORDS
    h[_MAGIC] = _i32(MAGIC)
    h[_VERSION] = VERSION
    h[_FLAGS] = (
        (_FLAG_INT16 if trace.ids.dtype == torch.int16 else 0)
        | (_FLAG_PROMPT_LEN if trace.prompt_len is not None else 0)
        | (_FLAG_TOKEN_HASH if trace.token_hash is not None else 0)
    )
    h[_LAYERS], h[_TOPK], h[_EXPERTS], h[_ROWS] = trace.num_layers, trace.topk, trace.num_experts, trace.rows
    h[_PROMPT_LEN] = -1 if trace.prompt_len is None else trace.prompt_len
    h[_TOKEN_HASH] = 0 if trace.token_hash is None else _i32(trace.token_hash)
    return h


def encode(trace: RoutingTrace) -> torch.Tensor:
    """Encode one trace as a 1-D int32 tensor (header + ids bytes)."""
    return _assemble(_header(trace), _ids_bytes(trace.ids))


def encoded_words(trace: RoutingTrace) -> int:
    """Length in int32 words of ``encode(trace)``, without encoding."""
    return HEADER_WORDS + (trace.ids.numel() * trace.ids.element_size() + 3) // 4


class _Payload:
    """A checked header plus a zero-copy byte view of the body."""

    def __init__(
        self,
        tensor: torch.Tensor,
        where: str,
        spec: MoEModelSpec | None,
        allow_trailing: bool,
    ) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.dtype != torch.int32:
            found = (
                f"{tensor.dtype} of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor)
            )
            raise RoutingError(f"{where}routing payload must be a 1-D int32 tensor, got {found}")
        if tensor.numel() < HEADER_WORDS:
            raise RoutingError(
                f"{where}routing payload truncated: {tensor.numel()} words, the header alone needs {HEADER_WORDS}"
            )
        words = tensor.detach().cpu().contiguous()
        head = words[:HEADER_WORDS].numpy()
        if _u32(int(head[_MAGIC])) != MAGIC:
            raise RoutingError(f"{where}not a routing payload (magic {_u32(int(head[_MAGIC])):#010x})")
        if _u32(int(head[_HEADER_CRC])) != _header_crc(head):
            raise RoutingError(f"{where}routing payload header checksum mismatch: the header is corrupted")
        if int(head[_VERSION]) != VERSION:
            raise RoutingError(f"{where}routing payload format version {int(head[_VERSION])}, expected {VERSION}")
        flags = int(head[_FLAGS])
        if flags & ~_KNOWN_FLAGS:
            raise RoutingError(f"{where}unknown routing payload flags {flags:#x}")
        nbytes = int(head[_BODY_BYTES])
        needed = HEADER_WORDS + (nbytes + 3) // 4
        if nbytes < 0 or words.numel() < needed:
            raise RoutingError(f"{where}routing payload truncated: {words.numel()} words, the header declares {needed}")
        if words.numel() > needed and not allow_trailing:
            raise RoutingError(
                f"{where}routing payload has {words.numel() - needed} words past its declared end of {needed}; "
                "pass allow_trailing_padding=True for batch-padded payloads"
            )
        body = words[HEADER_WORDS:needed].view(torch.uint8)[:nbytes]
        if (int(head[_BODY_HASH_LO]), int(head[_BODY_HASH_HI])) != _body_hash(words[HEADER_WORDS:needed].numpy()):
            raise RoutingError(f"{where}routing payload body checksum mismatch: the expert ids are corrupted")
        self.where, self.flags, self.head, self.body = where, flags, head, body
        self.layers, self.topk, self.experts, self.rows = (int(head[i]) for i in (_LAYERS, _TOPK, _EXPERTS, _ROWS))
        self.dtype = torch.int16 if flags & _FLAG_INT16 else torch.uint8
        try:
            expected_dtype = compact_dtype(self.experts)
        except RoutingError as err:
            raise RoutingError(f"{where}{err}") from None
        if expected_dtype != self.dtype:
            raise RoutingError(f"{where}payload stores {self.dtype} ids for {self.experts} experts")
        if spec is not None and (self.layers, self.topk, self.experts) != (
            spec.num_moe_layers,
            spec.topk,
            spec.num_experts,
        ):
            raise RoutingError(
                f"{where}payload is for a model with (moe_layers, topk, num_experts) = "
                f"{(self.layers, self.topk, self.experts)}, "
                f"expected {(spec.num_moe_layers, spec.topk, spec.num_experts)}"
            )

    @property
    def shared(self) -> bool:
        return bool(self.flags & _FLAG_SHARED_PROMPT)

    def rows_view(self, byte_offset: int, rows: int) -> torch.Tensor:
        cell = self.layers * self.topk * self.dtype.itemsize
        end = byte_offset + rows * cell
        if end > self.body.numel():
            raise RoutingError(f"{self.where}payload body holds {self.body.numel()} bytes, needs {end}")
        return self.body[byte_offset:end].view(self.dtype).view(rows, self.layers, self.topk)

    def trace(self, ids: torch.Tensor) -> RoutingTrace:
        if ids.shape[0] != self.rows:
            raise RoutingError(f"{self.where}payload declares {self.rows} rows, rebuilt {ids.shape[0]}")
        prompt_len = int(self.head[_PROMPT_LEN]) if self.flags & _FLAG_PROMPT_LEN else None
        token_hash = _u32(int(self.head[_TOKEN_HASH])) if self.flags & _FLAG_TOKEN_HASH else None
        return RoutingTrace(ids, self.experts, prompt_len, token_hash)


def payload_words(tensor: torch.Tensor) -> int:
    """Words a (possibly batch-padded) payload really occupies, read from its header."""
    nbytes = int(tensor[_BODY_BYTES])
    return HEADER_WORDS + (nbytes + 3) // 4


def decode(
    tensor: torch.Tensor,
    *,
    spec: MoEModelSpec | None = None,
    sample_index: int | None = None,
    leader: RoutingTrace | None = None,
    allow_trailing_padding: bool = False,
) -> RoutingTrace:
    """Decode one payload. The ids are a zero-copy view of ``tensor`` when it is a contiguous CPU tensor.

    A group follower (see :func:`encode_group`) needs its decoded ``leader``. Raises :class:`RoutingError` (a
    ``ValueError``) naming ``sample_index`` and what is wrong.
    """
    where = "" if sample_index is None else f"sample {sample_index}: "
    p = _Payload(tensor, where, spec, allow_trailing_padding)
    if not p.shared:
        return p.trace(p.rows_view(0, p.rows))
    if leader is None:
        raise RoutingError(
            f"{where}payload shares its prompt rows with the sample {int(p.head[_LEADER_OFFSET])} positions "
            "earlier in its group; decode it with decode_group or pass leader="
        )
    return _rebuild_follower(p, leader)


def _rebuild_follower(p: _Payload, leader: RoutingTrace) -> RoutingTrace:
    shared_rows, n_exc = int(p.head[_SHARED_ROWS]), int(p.head[_EXCEPTIONS])
    if leader.ids.shape[1:] != (p.layers, p.topk) or leader.num_experts != p.experts or leader.rows < shared_rows:
        raise RoutingError(
            f"{p.where}group leader has {leader.rows} rows of {tuple(leader.ids.shape[1:])} for "
            f"{leader.num_experts} experts; the payload needs {shared_rows} shared rows of {(p.layers, p.topk)} "
            f"for {p.experts} experts"
        )
    if not 0 <= shared_rows <= p.rows or not 0 <= n_exc <= shared_rows:
        raise RoutingError(f"{p.where}inconsistent shared rows {shared_rows} / exceptions {n_exc} / rows {p.rows}")
    exc_bytes = 4 * n_exc
    exc_rows = p.body[:exc_bytes].view(torch.int32).to(torch.int64) if n_exc else None
    cell = p.layers * p.topk * p.dtype.itemsize
    exc_ids = p.rows_view(exc_bytes, n_exc)
    own = p.rows_view(exc_bytes + n_exc * cell, p.rows - shared_rows)
    ids = torch.cat([leader.ids[:shared_rows], own])
    if exc_rows is not None:
        if int(exc_rows.min()) < 0 or int(exc_rows.max()) >= shared_rows:
            raise RoutingError(f"{p.where}exception rows outside the {shared_rows} shared rows")
        ids[exc_rows] = exc_ids
    return p.trace(ids)


def encode_group(traces: Sequence[RoutingTrace], prompt_len: int) -> list[torch.Tensor]:
    """Encode the n samples of one GRPO prompt, storing their first ``prompt_len`` rows once.

    Lossless: prompt rows of a follower that differ from the leader's are stored with it as exceptions.
    """
    if not traces:
        return []
    leader = traces[0]
    out = [encode(leader)]
    for j, trace in enumerate(traces[1:], start=1):
        if trace.ids.shape[1:] != leader.ids.shape[1:] or trace.num_experts != leader.num_experts:
            raise RoutingError(
                f"group sample {j}: trace layout {tuple(trace.ids.shape[1:])}/{trace.num_experts} experts differs "
                f"from the leader's {tuple(leader.ids.shape[1:])}/{leader.num_experts}"
            )
        shared = min(prompt_len, trace.rows, leader.rows)
        differs = (trace.ids[:shared] != leader.ids[:shared]).flatten(1).any(1)
        exc_rows = differs.nonzero().flatten().to(torch.int32)
        header = _header(trace)
        header[_FLAGS] |= _FLAG_SHARED_PROMPT
        header[_SHARED_ROWS], header[_LEADER_OFFSET], header[_EXCEPTIONS] = shared, j, exc_rows.numel()
        out.append(
            _assemble(
                header,
                exc_rows.view(torch.uint8),
                _ids_bytes(trace.ids[exc_rows.long()]),
                _ids_bytes(trace.ids[shared:]),
            )
        )
    return out


def decode_group(
    payloads: Sequence[torch.Tensor],
    *,
    spec: MoEModelSpec | None = None,
    first_sample_index: int = 0,
    allow_trailing_padding: bool = False,
) -> list[RoutingTrace]:
    """Decode payloads in sample order (leaders before their followers), e.g. a whole GRPO batch."""
    traces: list[RoutingTrace] = []
    for i, tensor in enumerate(payloads):
        index = first_sample_index + i
        p = _Payload(tensor, f"sample {index}: ", spec, allow_trailing_padding)
        if not p.shared:
            traces.append(p.trace(p.rows_view(0, p.rows)))
            continue
        offset = int(p.head[_LEADER_OFFSET])
        if not 1 <= offset <= i:
            raise RoutingError(
                f"sample {index}: its group leader is {offset} samples earlier, which is not in this batch "
                f"(batch starts at sample {first_sample_index})"
            )
        leader = traces[i - offset]
        traces.append(_rebuild_follower(p, leader))
    return traces
