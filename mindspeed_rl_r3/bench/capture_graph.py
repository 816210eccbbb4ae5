"""Capture overhead in graph-replay mode: the work the capture adds inside a captured decode graph, per step.

Under ACL / CUDA graphs only the recorded tensor ops run, so the capture's cost in a replayed step is exactly what it
put into the graph: per MoE layer, one softmax top-k on the router logits and one slice write into the recording
buffer. Here a stack of MoE layers with Qwen3-30B-A3B's routing (128 experts, top-8) and grouped experts
(GShard-style capacity dispatch, so the expert GEMMs cost what the routed tokens need) is captured with the CPU graph
stand-in (:class:`~mindspeed_rl_r3.bench.graph_replay.GraphReplay`) with and without the package's capture wrapper,
and both graphs are replayed alternately on the same inputs. Since the difference is far below timing noise on a
shared CPU, the overhead is reported from a third graph holding only the ops the capture adds (its selector and
write for every layer), timed the same way, as a ratio to the step without capture; the end-to-end difference is
reported beside it. Attention and the dense parts of a decoder layer are left out, which makes the step smaller and
the ratio larger than in a full model. The captured graph is also scanned for host-synchronising ops.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from mindspeed_rl_r3.bench.graph_replay import GraphReplay
from mindspeed_rl_r3.bench.syncs import SYNC_OPS
from mindspeed_rl_r3.patches.vllm_ascend_capture import CaptureSession, forward_impl_capture_wrapper
from mindspeed_rl_r3.routing.capture import record
from mindspeed_rl_r3.routing.trace import MoEModelSpec


@dataclass(frozen=True)
class GraphCaptureBenchConfig:
    tokens: int = 64  # a decode batch: one graph size
    hidden: int = 1024
    moe_intermediate: int = 384
    experts: int = 128
    topk: int = 8
    layers: int = 2
    capacity_factor: float = 1.25
    repeats: int = 20
    seed: int = 0


def _select_experts(hidden_states, router_logits, top_k, renormalize, **_):
    weights, ids = router_logits.softmax(-1).topk(top_k)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


class GroupedMoE(torch.nn.Module):
    """One MoE layer: gate, top-k, capacity dispatch into ``[experts, capacity, hidden]``, swiglu expert GEMMs."""

    def __init__(self, cfg: GraphCaptureBenchConfig, index: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed + index)
        h, i, e = cfg.hidden, cfg.moe_intermediate, cfg.experts
        self.layer_name = f"model.layers.{index}.mlp.experts"
        self.top_k, self.global_num_experts, self.renormalize = cfg.topk, e, True
        self.use_grouped_topk, self.scoring_func = False, "softmax"
        self.topk_group = self.num_expert_group = self.custom_routing_function = self.e_score_correction_bias = None
        self.capacity = math.ceil(cfg.tokens * cfg.topk / e * cfg.capacity_factor)
        self.gate = torch.nn.Parameter(torch.randn(h, e, generator=g) / h**0.5, requires_grad=False)
        self.w13 = torch.nn.Parameter(torch.randn(e, h, 2 * i, generator=g) / h**0.5, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(e, i, h, generator=g) / i**0.5, requires_grad=False)
        self.experts = torch.arange(e)

    def forward_impl(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = _select_experts(hidden_states, router_logits, self.top_k, self.renormalize)
        mask = (ids.long().reshape(-1, 1) == self.experts).to(hidden_states.dtype)  # [T*k, E]
        position = (mask.cumsum(0) - 1) * mask  # slot of each (token, k) in its expert's queue
        slots = torch.arange(self.capacity, dtype=hidden_states.dtype)
        dispatch = mask.unsqueeze(-1) * (position.unsqueeze(-1) == slots)  # [T*k, E, C]; overflow dropped
        rows = hidden_states.repeat_interleave(self.top_k, dim=0, output_size=dispatch.shape[0])
        grouped = torch.einsum("nec,nh->ech", dispatch, rows)
        gate, up = torch.bmm(grouped, self.w13).chunk(2, dim=-1)
        out = torch.bmm(torch.nn.functional.silu(gate) * up, self.w2)  # [E, C, H]
        combined = torch.einsum("nec,ech->nh", dispatch, out) * weights.reshape(-1, 1)
        return combined.reshape(-1, self.top_k, combined.shape[-1]).sum(1)

    def forward(self, hidden_states: torch.Tensor, forward_impl) -> torch.Tensor:
        return hidden_states + forward_impl(self, hidden_states, hidden_states @ self.gate)


def _graph(layers: list[GroupedMoE], forward_impl, tokens: int, hidden: int) -> GraphReplay:
    def step(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x, forward_impl)
        return x

    graph = GraphReplay(step, sizes=(tokens,))
    graph.capture(lambda size: (torch.randn(size, hidden),))
    return graph


def run_graph_capture_bench(cfg: GraphCaptureBenchConfig | None = None) -> dict:
    """Best-of-N replay time of the decode graph with and without capture, their ratio, and the captured graph's
    host-synchronising ops."""
    cfg = cfg or GraphCaptureBenchConfig()
    layers = [GroupedMoE(cfg, i) for i in range(cfg.layers)]
    spec = MoEModelSpec(num_layers=cfg.layers, topk=cfg.topk, num_experts=cfg.experts)
    saved = CaptureSession.buffer, CaptureSession.spec, CaptureSession.graphs_captured
    try:
        CaptureSession.release()
        plain = _graph(layers, GroupedMoE.forward_impl, cfg.tokens, cfg.hidden)
        CaptureSession.reserve(spec, max_tokens=cfg.tokens, device="cpu")
        wrapped = forward_impl_capture_wrapper(GroupedMoE.forward_impl, lambda: _select_experts)
        captured = _graph(layers, wrapped, cfg.tokens, cfg.hidden)
        buffer = CaptureSession.buffer

        def added(logits: torch.Tensor) -> torch.Tensor:  # what the wrapper puts into the graph, every layer
            for j, layer in enumerate(layers):
                _, ids = _select_experts(None, logits[j], layer.top_k, layer.renormalize)
                record(buffer, j, ids)
            return logits

        added_only = GraphReplay(added, sizes=(cfg.tokens,))
        added_only.capture(lambda size: (torch.randn(cfg.layers, size, cfg.experts),))
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.tokens, cfg.hidden, generator=gen)
        logits = torch.randn(cfg.layers, cfg.tokens, cfg.experts, generator=gen)
        runs = (("plain", plain, x), ("capture", captured, x), ("added", added_only, logits))
        times: dict[str, list[float]] = {name: [] for name, *_ in runs}
        for i in range(cfg.repeats + 1):
            for name, graph, inputs in runs:
                start = time.perf_counter()
                graph(inputs)
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        buffer.fill_(255)
        captured(x)
        written = bool((buffer[:, : cfg.tokens] != 255).all())
    finally:
        CaptureSession.release()
        CaptureSession.buffer, CaptureSession.spec, CaptureSession.graphs_captured = saved
    ops = [str(n.target) for n in captured.graphs[cfg.tokens].graph.nodes if n.op == "call_function"]
    extra = len(ops) - sum(1 for n in plain.graphs[cfg.tokens].graph.nodes if n.op == "call_function")
    syncs = sorted({op for op in ops if op.split(".")[0].replace("aten.", "aten::") in SYNC_OPS})
    best_plain, best_capture, best_added = min(times["plain"]), min(times["capture"]), min(times["added"])
    return {
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "engine": "graph replay (CPU stand-in)",
        "step_ms_plain": round(best_plain * 1e3, 3),
        "step_ms_capture": round(best_capture * 1e3, 3),
        "added_ops_ms": round(best_added * 1e3, 4),
        "capture_overhead": round(best_added / best_plain, 5),
        "end_to_end_overhead": round(best_capture / best_plain - 1.0, 4),
        "extra_graph_ops_per_step": extra,
        "capture_written_by_replay": written,
        "host_syncs_per_step": len(syncs),
        "host_sync_ops": syncs,
    }
