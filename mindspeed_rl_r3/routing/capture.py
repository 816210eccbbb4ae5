"""Engine-agnostic routing capture for the rollout engine.

Hot path (inside every MoE layer's forward): :func:`record` writes the layer's top-k ids into a preallocated device
buffer ``[layers, max_tokens, k]`` by slice assignment. No ``.item()``, ``.cpu()``, list append or data-dependent
branch, so a captured ACL/CUDA graph replays the same write into the same static buffer. The slice length is the
forward's (padded) token count, which a captured graph fixes together with its batch size.

Step boundary (host side, outside the graph): :meth:`RoutingRecorder.begin_step` fills the step's rows with the
missing value, so a forward that did not write them (a graph captured without the write, or writing into another
buffer) cannot pass off the previous step's rows as this one's: :meth:`RoutingRecorder.end_step` refuses the step.
It then copies the rows of the step's real tokens (padding dropped) into a host store indexed by KV-cache slot, with
one device-to-host copy. Keying by slot makes every engine feature come out right without special cases:

* chunked prefill: each chunk writes its own positions' slots;
* preemption with recompute: the recomputed tokens write their (new) slots again, overwriting;
* prefix-cache hits: the request's block table points at slots written when the prefix was computed;
* n > 1 samples: children sharing prompt blocks read the same prompt rows; children that prefilled separately
  read their own;
* graph / DP padding and profile or dummy runs: never reach the store (no real step, or rows past the real count).

When a request finishes, its rows are read from its slots before those blocks can be reused
(:meth:`RoutingRecorder.begin_step` with the finished ids, or :meth:`RoutingRecorder.finish`), giving a
:class:`RoutingTrace` of ``P + R - 1`` rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError, RoutingTrace, missing_value


@dataclass
class _RequestBlocks:
    block_ids: list[int]
    num_computed: int


def capture_buffer(spec: MoEModelSpec, max_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The device buffer the MoE layers write into: ``[moe layers, max_tokens, k]`` in the trace dtype."""
    shape = (spec.num_moe_layers, max_tokens, spec.topk)
    return torch.full(shape, missing_value(spec.dtype), dtype=spec.dtype, device=device)


def record(buffer: torch.Tensor, layer: int, topk_ids: torch.Tensor) -> None:
    """The hot-path write: ``topk_ids [tokens, k]`` into rows ``0..tokens-1`` of trace layer ``layer``."""
    buffer[layer, : topk_ids.shape[0]] = topk_ids


class RoutingRecorder:
    """Records the top-k logical expert ids of every computed token, per MoE layer, keyed by KV slot.

    ``buffer`` (from :func:`capture_buffer`) is the device buffer to read steps from; pass the one captured graphs
    write into. Without it the recorder allocates its own.
    """

    def __init__(
        self,
        spec: MoEModelSpec,
        *,
        max_tokens: int,
        num_slots: int,
        block_size: int,
        device: torch.device | str = "cpu",
        buffer: torch.Tensor | None = None,
    ) -> None:
        self.spec = spec
        self.block_size = block_size
        self.sentinel = missing_value(spec.dtype)
        if buffer is None:
            buffer = capture_buffer(spec, max_tokens, device)
        expected = (spec.num_moe_layers, spec.topk)
        if (buffer.shape[0], buffer.shape[2]) != expected or buffer.shape[1] < max_tokens or buffer.dtype != spec.dtype:
            raise RoutingError(
                f"capture buffer {tuple(buffer.shape)} {buffer.dtype} cannot serve {spec.num_moe_layers} MoE layers, "
                f"top-{spec.topk}, {max_tokens} tokens a step in {spec.dtype}"
            )
        self.buffer = buffer
        host = torch.full((num_slots, spec.num_moe_layers, spec.topk), self.sentinel, dtype=spec.dtype)
        self.host = host.pin_memory() if torch.device(device).type == "cuda" else host
        self._layer_of = {hf: j for j, hf in enumerate(spec.moe_layers)}
        self._requests: dict[str, _RequestBlocks] = {}
        self._finished: dict[str, torch.Tensor] = {}
        self.steps = 0

    # -- hot path ----------------------------------------------------------------------------------------------------
    def capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Store ``topk_ids [tokens, k]`` (logical ids) of trace layer ``layer`` for the current step."""
        record(self.buffer, layer, topk_ids)

    def trace_layer(self, hf_layer_index: int) -> int:
        """Trace layer of an HF/vLLM decoder-layer index (resolved once, when an adapter binds a layer)."""
        try:
            return self._layer_of[hf_layer_index]
        except KeyError:
            raise RoutingError(
                f"decoder layer {hf_layer_index} has no router in this model (MoE layers {list(self.spec.moe_layers)})"
            ) from None

    # -- step boundaries (host side) ---------------------------------------------------------------------------------
    def _check_fits(self, num_tokens: int) -> None:
        if num_tokens > self.buffer.shape[1]:
            raise RoutingError(f"step has {num_tokens} tokens, the capture buffer holds {self.buffer.shape[1]}")

    def begin_step(self, finished_request_ids: Iterable[str] = (), num_tokens: int | None = None) -> None:
        """Before a real step: take the rows of requests that finished, before their blocks are written again, and
        mark the step's ``num_tokens`` rows missing so that :meth:`end_step` sees which ones the forward wrote."""
        for req_id in finished_request_ids:
            self.finish(req_id)
        if num_tokens is not None:
            self._check_fits(num_tokens)
            self.buffer[:, :num_tokens].fill_(self.sentinel)  # a device memset, outside any captured graph

    def end_step(
        self,
        num_tokens: int,
        slot_mapping: torch.Tensor,
        requests: dict[str, tuple[list[int], int]] | None = None,
    ) -> None:
        """After a real step's forward: move its ``num_tokens`` real rows to the host store.

        ``slot_mapping`` (CPU) gives each real token's KV slot (negative = padding, skipped). ``requests`` maps each
        request in the step to its block ids and its number of computed tokens after the step.
        """
        self._check_fits(num_tokens)
        slots = slot_mapping[:num_tokens].to(torch.int64)
        rows = self.buffer[:, :num_tokens].transpose(0, 1).to("cpu", non_blocking=False)
        keep = slots >= 0
        if slots.numel() and int(slots.max()) >= self.host.shape[0]:
            raise RoutingError(f"slot {int(slots.max())} is outside the {self.host.shape[0]} slots of the host store")
        real = rows[keep]
        unwritten = (real == self.sentinel).any(dim=2)  # [tokens, layers]: a real top-k id is never the sentinel
        if bool(unwritten.any()):
            layers = [self.spec.moe_layers[j] for j in unwritten.any(dim=0).nonzero().flatten().tolist()]
            raise RoutingError(
                f"step {self.steps}: {int(unwritten.any(dim=1).sum())} of {real.shape[0]} tokens have no routing in "
                f"decoder layers {layers}: the MoE forward did not write the capture buffer (a graph captured before "
                "the capture was installed, or one writing into another buffer); refusing to record stale rows"
            )
        self.host[slots[keep]] = real
        for req_id, (block_ids, num_computed) in (requests or {}).items():
            self._requests[req_id] = _RequestBlocks(list(block_ids), int(num_computed))
        self.steps += 1

    def finish(self, req_id: str) -> None:
        """Snapshot a finished request's rows (idempotent; unknown ids are ignored: nothing was computed)."""
        blocks = self._requests.pop(req_id, None)
        if blocks is None:
            return
        positions = torch.arange(blocks.num_computed)
        block_index = positions // self.block_size
        if blocks.num_computed and int(block_index.max()) >= len(blocks.block_ids):
            raise RoutingError(
                f"request {req_id}: {blocks.num_computed} computed tokens need "
                f"{int(block_index.max()) + 1} blocks, its table has {len(blocks.block_ids)}"
            )
        table = torch.tensor(blocks.block_ids, dtype=torch.int64)
        slots = table[block_index] * self.block_size + positions % self.block_size
        self._finished[req_id] = self.host[slots].clone()

    def request_ids(self) -> set[str]:
        """The runner request ids whose rows this recorder holds (tracked or finished, not yet popped)."""
        return set(self._requests) | set(self._finished)

    def finish_all(self) -> None:
        """At the end of a generate call: every tracked request is done and nothing reuses its blocks any more."""
        for req_id in list(self._requests):
            self.finish(req_id)

    def pop_trace(
        self,
        req_id: str,
        *,
        num_tokens: int | None = None,
        prompt_len: int | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> RoutingTrace:
        """The trace of a finished request: ``num_tokens - 1`` rows (prompt + response - 1).

        Rows past what the engine computed are missing (the final sampled token is never fed back).
        """
        self.finish(req_id)
        try:
            ids = self._finished.pop(req_id)
        except KeyError:
            raise RoutingError(f"no routing was captured for request {req_id!r}") from None
        rows = ids.shape[0] if num_tokens is None else num_tokens - 1
        if rows > ids.shape[0]:
            pad = torch.full((rows - ids.shape[0], *ids.shape[1:]), self.sentinel, dtype=ids.dtype)
            ids = torch.cat([ids, pad])
        trace = RoutingTrace.from_ids(
            ids[:rows], self.spec.num_experts, prompt_len=prompt_len, token_ids=token_ids, layout=self.spec.layout_id
        )
        return trace

    def reset(self) -> None:
        """Drop everything (a new rollout batch with a re-created KV cache)."""
        self.host.fill_(self.sentinel)
        self._requests.clear()
        self._finished.clear()
