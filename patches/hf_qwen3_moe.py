"""Routing capture for transformers' Qwen3-MoE: the rollout stand-in of the CPU pipeline.

Forward hooks on every ``mlp.gate`` pass its top-k ids to a :class:`RoutingRecorder` (transformers 5 returns them
from ``Qwen3MoeTopKRouter``; 4.57's gate is a plain linear layer, so its softmax top-k is recomputed as the MoE block
does). A pre-hook on the model turns each ``generate`` step into recorder steps: row ``b`` of the batch is one
request whose "KV slots" are ``b * max_len + position``, with left padding skipped through the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mindspeed_rl_r3.patches.targets import PatchTarget
from mindspeed_rl_r3.routing.capture import RoutingRecorder
from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError, RoutingTrace

TARGETS = (
    PatchTarget(
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock.forward",
        versions=("4.57", "5."),
        parameters=("self", "hidden_states"),
    ),
)


def moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(decoder layer index, sparse MoE block)`` for every routed layer."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [(i, layer.mlp) for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]


def gate_topk(block: torch.nn.Module, gate_output) -> torch.Tensor:
    """Top-k expert ids ``[tokens, k]`` from a gate's output, for either transformers layout."""
    if isinstance(gate_output, tuple):  # transformers 5: (logits, scores, indices)
        return gate_output[2]
    k = getattr(block, "top_k", None) or block.gate.top_k
    return torch.softmax(gate_output, dim=-1, dtype=torch.float).topk(k, dim=-1).indices


@dataclass
class HFCapture:
    """Capture attached to one model; use as a context manager around ``generate``."""

    model: torch.nn.Module
    recorder: RoutingRecorder
    max_len: int
    handles: list = field(default_factory=list)
    _step: dict = field(default_factory=dict)

    def __enter__(self) -> HFCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _begin(self, _module, _args, kwargs) -> None:
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        if input_ids is None or positions is None:
            raise RoutingError("HF capture needs input_ids and position_ids in the model call (as generate passes)")
        batch, q = input_ids.shape
        valid = torch.ones(batch, q, dtype=torch.bool) if mask is None else mask[:, -q:].bool().cpu()
        pos = positions.cpu().to(torch.int64)
        if pos.max() >= self.max_len:
            raise RoutingError(f"position {int(pos.max())} exceeds the capture length {self.max_len}")
        rows = torch.arange(batch).unsqueeze(1) * self.max_len
        slots = torch.where(valid, rows + pos, -1).reshape(-1)
        computed = torch.where(valid, pos + 1, 0).amax(dim=1)
        self._step = {"tokens": batch * q, "slots": slots, "computed": computed}
        self.recorder.begin_step()

    def _end(self, _module, _args, _kwargs, _output) -> None:
        step, self._step = self._step, {}
        requests = {str(b): ([b], int(n)) for b, n in enumerate(step["computed"].tolist())}
        self.recorder.end_step(step["tokens"], step["slots"], requests)

    def trace(self, row: int, num_tokens: int, prompt_len: int | None = None) -> RoutingTrace:
        """Routing of batch row ``row`` for its first ``num_tokens`` real tokens (prompt + response)."""
        return self.recorder.pop_trace(str(row), num_tokens=num_tokens, prompt_len=prompt_len)


def attach_capture(model: torch.nn.Module, spec: MoEModelSpec, *, max_batch: int, max_len: int) -> HFCapture:
    """Hook capture into a transformers Qwen3-MoE model for batches up to ``max_batch`` rows of ``max_len``."""
    recorder = RoutingRecorder(spec, max_tokens=max_batch * max_len, num_slots=max_batch * max_len, block_size=max_len)
    capture = HFCapture(model, recorder, max_len)
    for index, block in moe_blocks(model):
        layer = recorder.trace_layer(index)

        def hook(module, _inputs, output, layer=layer, block=block):
            recorder.capture(layer, gate_topk(block, output))

        capture.handles.append(block.gate.register_forward_hook(hook))
    capture.handles.append(model.register_forward_pre_hook(capture._begin, with_kwargs=True))
    capture.handles.append(model.register_forward_hook(capture._end, with_kwargs=True))
    return capture


def spec_of(model: torch.nn.Module) -> MoEModelSpec:
    return MoEModelSpec.from_hf_config(model.config)
