"""Routing traces on the wire: one flat 1-D int32 tensor per sample.

MindSpeed-RL's TransferDock and its HCCL broadcast carry only 1-D int32/float32 columns, so a trace travels as a
19-word header followed by its ids' raw bytes (uint8 or int16) packed four (or two) to an int32 word. The header
describes the trace and carries checksums, so a truncated, corrupted, mispaired or wrong-model payload is rejected
with a message saying which.

Header words: magic, version, flags, layers, topk, experts, rows, prompt_len, token_hash, body_bytes, shared_rows,
leader_offset, exceptions, model layout, leader hash (two words), header CRC32, body XXH3-64 (two words). Two
checks, so an error can say whether the header (dimensions, length) or the ids were damaged; XXH3 because a CRC32 of
the body alone would take more time than the whole layout step. Beyond the checksums, the decoder checks that the
declared body length is exactly what rows x layers x top-k (plus a follower's exceptions) need, and that every field
is consistent with the flags, so a header that is wrong but well-sealed (an encoder bug) is refused too.

Model layout: :attr:`MoEModelSpec.layout_id`, a fingerprint of which decoder layers are MoE (not only how many),
top-k and the expert count; 0 when the trace was recorded without one. Decoding against a spec refuses a payload
stamped with another layout.

GRPO group dedupe: the n samples of one prompt usually route their prompt identically. :func:`encode_group` stores
the leader (first sample) in full; each follower stores only its own response rows plus the prompt rows that differ
from the leader's ("exceptions"), so nothing is lost when prefill was not bit-identical across samples. A follower
also stores the XXH3-64 of the leader's shared rows it was encoded against: rebuilt against any other leader whose
rows differ (two groups interleaved in a batch), it raises an error naming both samples instead of silently taking
another group's prompt routing.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError, RoutingTrace, compact_dtype

MAGIC = 0x52335254  # "R3RT"
VERSION = 2  # 2: model layout, leader binding, exact body length
HEADER_WORDS = 19

_FLAG_INT16 = 1
_FLAG_PROMPT_LEN = 2
_FLAG_TOKEN_HASH = 4
_FLAG_SHARED_PROMPT = 8
_KNOWN_FLAGS = _FLAG_INT16 | _FLAG_PROMPT_LEN | _FLAG_TOKEN_HASH | _FLAG_SHARED_PROMPT

(_MAGIC, _VERSION, _FLAGS, _LAYERS, _TOPK, _EXPERTS, _ROWS, _PROMPT_LEN, _TOKEN_HASH, _BODY_BYTES, _SHARED_ROWS,
 _LEADER_OFFSET, _EXCEPTIONS, _LAYOUT, _LEADER_HASH_LO, _LEADER_HASH_HI, _HEADER_CRC, _BODY_HASH_LO,
 _BODY_HASH_HI) = range(HEADER_WORDS)  # fmt: skip

# The wire format (the constants above) stays in this module: other modules ask these functions, never a header word.
__all__ = [
    "decode",
    "decode_group",
    "encode",
    "encode_group",
    "encoded_words",
    "is_group_follower",
    "is_payload",
    "payload_words",
    "standalone_words",
]


def _i32(value: int) -> int:
    """Reinterpret an unsigned 32-bit value as int32 (hashes and magic do not fit a signed word)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


def _header_crc(header: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(header[:_HEADER_CRC], dtype=np.int32))


def _split64(digest: int) -> tuple[int, int]:
    return _i32(digest & 0xFFFFFFFF), _i32(digest >> 32)


def _body_hash(words: np.ndarray) -> tuple[int, int]:
    return _split64(xxhash.xxh3_64_intdigest(words))


def _leader_hash(leader_ids: torch.Tensor) -> int:
    """XXH3-64 of the leader rows a follower shares, seeded with their count (so 0 rows still binds)."""
    data = _bytes(leader_ids).numpy()
    return xxhash.xxh3_64_intdigest(data, seed=leader_ids.shape[0])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of any tensor, 1-D uint8; safe for empty and oddly strided tensors (e.g. a 0-row int16 slice)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return flat.contiguous().view(torch.uint8)


def _view(segment: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-copy typed view of a byte segment (a fresh empty tensor when there is nothing to view)."""
    if segment.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return segment.view(dtype).view(shape)


def _assemble(header: list[int], *parts: torch.Tensor) -> torch.Tensor:
    """Header + parts (any tensors, taken as their raw bytes) -> one int32 tensor, body padded to whole words, CRC
    filled in."""
    body = torch.cat([_bytes(p) for p in parts]) if parts else torch.empty(0, dtype=torch.uint8)
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


def _layout(trace: RoutingTrace, spec: MoEModelSpec | None, where: str) -> int:
    """The layout word for ``trace``: the spec's (checked against the trace), else the trace's own, else 0."""
    if spec is None:
        return trace.layout or 0
    found = (trace.num_layers, trace.topk, trace.num_experts)
    if found != (spec.num_moe_layers, spec.topk, spec.num_experts):
        raise RoutingError(
            f"{where}trace has (moe_layers, topk, num_experts) = {found}, the model expects "
            f"{(spec.num_moe_layers, spec.topk, spec.num_experts)}"
        )
    if trace.layout is not None and trace.layout != spec.layout_id:
        raise RoutingError(
            f"{where}trace was recorded by a model with routing layout {trace.layout:#010x}, the spec "
            f"({spec.describe()}) has {spec.layout_id:#010x}"
        )
    return spec.layout_id


def _header(trace: RoutingTrace, layout: int) -> list[int]:
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
    h[_LAYOUT] = _i32(layout)
    for value, name in ((trace.prompt_len, "prompt_len"), (trace.rows, "rows")):
        if value is not None and not 0 <= value < 1 << 31:
            raise RoutingError(f"trace {name} {value} does not fit the payload header")
    return h


def encode(trace: RoutingTrace, *, spec: MoEModelSpec | None = None) -> torch.Tensor:
    """Encode one trace as a 1-D int32 tensor (header + ids bytes).

    The header names the model's routing layout: ``spec.layout_id`` when ``spec`` is given (the trace must fit it),
    else ``trace.layout``, else "not recorded".
    """
    return _assemble(_header(trace, _layout(trace, spec, "")), trace.ids)


def encoded_words(trace: RoutingTrace) -> int:
    """Length in int32 words of ``encode(trace)``, without encoding."""
    return HEADER_WORDS + (trace.ids.numel() * trace.ids.element_size() + 3) // 4


def standalone_words(rows: int, spec: MoEModelSpec) -> int:
    """Length in int32 words of a standalone (not group-deduplicated) payload of ``rows`` rows of ``spec``'s
    routing, e.g. to size a column before any trace exists."""
    if rows < 0:
        raise RoutingError(f"a routing payload cannot hold {rows} rows")
    body_bytes = rows * spec.num_moe_layers * spec.topk * spec.dtype.itemsize
    return HEADER_WORDS + (body_bytes + 3) // 4


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
        self.where, self.flags, self.head = where, flags, head
        self.layers, self.topk, self.experts, self.rows = (int(head[i]) for i in (_LAYERS, _TOPK, _EXPERTS, _ROWS))
        self.dtype = torch.int16 if flags & _FLAG_INT16 else torch.uint8
        self.shared_rows, self.exceptions = int(head[_SHARED_ROWS]), int(head[_EXCEPTIONS])
        self.layout = _u32(int(head[_LAYOUT]))
        self._check_fields()
        nbytes = int(head[_BODY_BYTES])
        expected = self._expected_body_bytes()
        if nbytes != expected:
            raise RoutingError(
                f"{where}routing payload header declares a {nbytes}-byte body, but {self.rows} rows x {self.layers} "
                f"layers x top-{self.topk}"
                + (f" ({self.exceptions} exceptions, {self.shared_rows} shared rows)" if self.shared else "")
                + f" need {expected}"
            )
        needed = HEADER_WORDS + (nbytes + 3) // 4
        if words.numel() < needed:
            raise RoutingError(f"{where}routing payload truncated: {words.numel()} words, the header declares {needed}")
        if words.numel() > needed and not allow_trailing:
            raise RoutingError(
                f"{where}routing payload has {words.numel() - needed} words past its declared end of {needed}; "
                "pass allow_trailing_padding=True for batch-padded payloads"
            )
        if (int(head[_BODY_HASH_LO]), int(head[_BODY_HASH_HI])) != _body_hash(words[HEADER_WORDS:needed].numpy()):
            raise RoutingError(f"{where}routing payload body checksum mismatch: the expert ids are corrupted")
        self.body = _bytes(words[HEADER_WORDS:needed])[:nbytes]
        if spec is not None:
            self._check_model(spec)

    @property
    def shared(self) -> bool:
        return bool(self.flags & _FLAG_SHARED_PROMPT)

    @property
    def cell_bytes(self) -> int:
        return self.layers * self.topk * self.dtype.itemsize

    def _check_fields(self) -> None:
        """Header fields consistent with each other and the flags (a well-sealed but wrong header is refused)."""
        where, head = self.where, self.head
        try:
            expected_dtype = compact_dtype(self.experts)
        except RoutingError as err:
            raise RoutingError(f"{where}routing payload header: {err}") from None
        if expected_dtype != self.dtype:
            raise RoutingError(f"{where}payload stores {self.dtype} ids for {self.experts} experts")
        if self.layers < 0 or self.rows < 0 or not 1 <= self.topk <= self.experts:
            raise RoutingError(
                f"{where}routing payload header declares {self.rows} rows x {self.layers} layers x top-{self.topk} "
                f"of {self.experts} experts"
            )
        prompt_len = int(head[_PROMPT_LEN])
        if (prompt_len >= 0) != bool(self.flags & _FLAG_PROMPT_LEN) or prompt_len < -1:
            raise RoutingError(f"{where}routing payload header: prompt length {prompt_len} contradicts its flags")
        if not self.flags & _FLAG_TOKEN_HASH and int(head[_TOKEN_HASH]) != 0:
            raise RoutingError(f"{where}routing payload header: a token fingerprint without its flag")
        follower_words = (_SHARED_ROWS, _LEADER_OFFSET, _EXCEPTIONS, _LEADER_HASH_LO, _LEADER_HASH_HI)
        if not self.shared:
            if any(int(head[i]) for i in follower_words):
                raise RoutingError(f"{where}routing payload header: group-follower fields set on a standalone payload")
            return
        if not 0 <= self.shared_rows <= self.rows or not 0 <= self.exceptions <= self.shared_rows:
            raise RoutingError(
                f"{where}inconsistent shared rows {self.shared_rows} / exceptions {self.exceptions} / rows {self.rows}"
            )
        offset = int(head[_LEADER_OFFSET])
        if offset < 1:
            raise RoutingError(f"{where}group follower declares leader offset {offset}, expected >= 1")

    def _expected_body_bytes(self) -> int:
        if not self.shared:
            return self.rows * self.cell_bytes
        own = self.exceptions + self.rows - self.shared_rows
        return 4 * self.exceptions + own * self.cell_bytes

    def _check_model(self, spec: MoEModelSpec) -> None:
        found = (self.layers, self.topk, self.experts)
        expected = (spec.num_moe_layers, spec.topk, spec.num_experts)
        if found != expected:
            raise RoutingError(
                f"{self.where}payload is for a model with (moe_layers, topk, num_experts) = {found}, "
                f"expected {expected}"
            )
        if self.layout and self.layout != spec.layout_id:
            raise RoutingError(
                f"{self.where}payload was recorded by a model with routing layout {self.layout:#010x}, this model "
                f"({spec.describe()}) has {spec.layout_id:#010x}: same counts, MoE layers in other places"
            )

    def rows_view(self, byte_offset: int, rows: int) -> torch.Tensor:
        end = byte_offset + rows * self.cell_bytes
        if end > self.body.numel():  # unreachable after the body length check; kept as a guard for the views below
            raise RoutingError(f"{self.where}payload body holds {self.body.numel()} bytes, needs {end}")
        return _view(self.body[byte_offset:end], self.dtype, (rows, self.layers, self.topk))

    def trace(self, ids: torch.Tensor) -> RoutingTrace:
        if ids.shape[0] != self.rows:
            raise RoutingError(f"{self.where}payload declares {self.rows} rows, rebuilt {ids.shape[0]}")
        prompt_len = int(self.head[_PROMPT_LEN]) if self.flags & _FLAG_PROMPT_LEN else None
        token_hash = _u32(int(self.head[_TOKEN_HASH])) if self.flags & _FLAG_TOKEN_HASH else None
        return RoutingTrace(ids, self.experts, prompt_len, token_hash, self.layout or None)


def payload_words(tensor: torch.Tensor) -> int:
    """Words a (possibly batch-padded) payload really occupies, read from its header (not checked here)."""
    nbytes = int(tensor[_BODY_BYTES])
    return HEADER_WORDS + (nbytes + 3) // 4


def is_payload(row: torch.Tensor) -> bool:
    """Whether a (padded) column row starts with a routing payload header: long enough and the magic word first.

    A cheap sniff (e.g. to tell a payload from a placeholder); only :func:`decode` checks the payload itself.
    """
    flat = row.reshape(-1)
    return flat.numel() >= HEADER_WORDS and _u32(int(flat[_MAGIC])) == MAGIC


def is_group_follower(tensor: torch.Tensor) -> bool:
    """Whether a payload (or padded row) stores its prompt rows with its group leader; reads the flags word only."""
    flat = tensor.reshape(-1)
    return flat.numel() > _FLAGS and bool(int(flat[_FLAGS]) & _FLAG_SHARED_PROMPT)


def decode(
    tensor: torch.Tensor,
    *,
    spec: MoEModelSpec | None = None,
    sample_index: int | None = None,
    leader: RoutingTrace | None = None,
    leader_index: int | None = None,
    allow_trailing_padding: bool = False,
) -> RoutingTrace:
    """Decode one payload. The ids are a zero-copy view of ``tensor`` when it is a contiguous CPU tensor.

    A group follower (see :func:`encode_group`) needs its decoded ``leader`` (``leader_index`` names it in errors).
    Raises :class:`RoutingError` (a ``ValueError``) naming ``sample_index`` and what is wrong; a leader from another
    group is an error naming both samples.
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
    return _rebuild_follower(p, leader, sample_index, leader_index)


def _rebuild_follower(p: _Payload, leader: RoutingTrace, index: int | None, leader_index: int | None) -> RoutingTrace:
    shared_rows, n_exc = p.shared_rows, p.exceptions
    this = "this follower" if index is None else f"sample {index}"
    that = "the leader given" if leader_index is None else f"sample {leader_index}"
    if leader.ids.shape[1:] != (p.layers, p.topk) or leader.num_experts != p.experts or leader.rows < shared_rows:
        raise RoutingError(
            f"{p.where}group leader ({that}) has {leader.rows} rows of {tuple(leader.ids.shape[1:])} for "
            f"{leader.num_experts} experts; {this} needs {shared_rows} shared rows of {(p.layers, p.topk)} "
            f"for {p.experts} experts"
        )
    bound = _split64(_leader_hash(leader.ids[:shared_rows]))
    if bound != (int(p.head[_LEADER_HASH_LO]), int(p.head[_LEADER_HASH_HI])):
        raise RoutingError(
            f"{p.where}{this} is paired with the wrong group leader: it was encoded against another leader's "
            f"{shared_rows} prompt rows than those of {that} (GRPO groups interleaved or reordered in the batch?)"
        )
    exc_bytes = 4 * n_exc
    exc_rows = _view(p.body[:exc_bytes], torch.int32, (n_exc,)).to(torch.int64)
    exc_ids = p.rows_view(exc_bytes, n_exc)
    own = p.rows_view(exc_bytes + n_exc * p.cell_bytes, p.rows - shared_rows)
    ids = torch.cat([leader.ids[:shared_rows], own])
    if n_exc:
        if int(exc_rows[0]) < 0 or int(exc_rows[-1]) >= shared_rows or bool((exc_rows[1:] <= exc_rows[:-1]).any()):
            raise RoutingError(f"{p.where}exception rows are not increasing rows within the {shared_rows} shared rows")
        ids[exc_rows] = exc_ids
    return p.trace(ids)


def encode_group(
    traces: Sequence[RoutingTrace], prompt_len: int, *, spec: MoEModelSpec | None = None
) -> list[torch.Tensor]:
    """Encode the n samples of one GRPO prompt, storing their first ``prompt_len`` rows once.

    Lossless for every id dtype, top-k, layer count and number of differing rows: prompt rows of a follower that
    differ from the leader's are stored with it as exceptions. Each follower is bound to the leader's shared rows.
    Raises :class:`RoutingError` naming the group sample whose layout differs from the leader's.
    """
    if not traces:
        return []
    leader = traces[0]
    layout = _layout(leader, spec, "group sample 0: ")
    out = [_assemble(_header(leader, layout), leader.ids)]
    for j, trace in enumerate(traces[1:], start=1):
        if trace.ids.shape[1:] != leader.ids.shape[1:] or trace.num_experts != leader.num_experts:
            raise RoutingError(
                f"group sample {j}: trace layout {tuple(trace.ids.shape[1:])}/{trace.num_experts} experts differs "
                f"from the leader's {tuple(leader.ids.shape[1:])}/{leader.num_experts}"
            )
        if (_layout(trace, spec, f"group sample {j}: ") or layout) != layout:
            raise RoutingError(
                f"group sample {j}: recorded with routing layout {trace.layout:#010x}, the leader with {layout:#010x}"
            )
        shared = max(0, min(int(prompt_len), trace.rows, leader.rows))
        differs = (trace.ids[:shared] != leader.ids[:shared]).reshape(shared, trace.num_layers * trace.topk).any(1)
        exc_rows = differs.nonzero().reshape(-1)
        header = _header(trace, layout)
        header[_FLAGS] |= _FLAG_SHARED_PROMPT
        header[_SHARED_ROWS], header[_LEADER_OFFSET], header[_EXCEPTIONS] = shared, j, exc_rows.numel()
        header[_LEADER_HASH_LO], header[_LEADER_HASH_HI] = _split64(_leader_hash(leader.ids[:shared]))
        out.append(
            _assemble(
                header,
                exc_rows.to(torch.int32),
                trace.ids[exc_rows],
                trace.ids[shared:],
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
    """Decode payloads in sample order (leaders before their followers), e.g. a whole GRPO batch.

    A follower whose leader is missing from the batch, or whose offset points at another group's sample, raises
    :class:`RoutingError` naming both samples.
    """
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
                f"sample {index}: its group leader is {offset} samples earlier (sample {index - offset}), which is "
                f"not in this batch (batch starts at sample {first_sample_index})"
            )
        traces.append(_rebuild_follower(p, traces[i - offset], index, index - offset))
    return traces
