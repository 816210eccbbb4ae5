"""Routing payload benchmark: wire size per token and encode -> decode -> layout throughput on one core.

Sizes are for Qwen3-30B-A3B (48 MoE layers, top-8 of 128 experts). The throughput baseline is what existing forks
do: int32 payloads, then a per-sample, per-layer Python loop into a zero-padded int64 ``[B, S, L, k]`` tensor that is
transposed to Megatron's s-major order. Both run in the same process on the same data, and their outputs are checked
to agree before any number is reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from mindspeed_rl_r3.routing import MoEModelSpec, RoutingTrace, decode, decode_group, encode, encode_group
from mindspeed_rl_r3.routing.layout import RouterTokenLayout, layout_micro_batch


@dataclass(frozen=True)
class RoutingBenchConfig:
    prompt_len: int = 256
    response_len: int = 1024
    group_size: int = 8
    batch_prompts: int = 8  # 8 prompts x 8 samples: one GRPO mini-batch of 64 sequences
    micro_batch_size: int = 8
    tp_size: int = 4  # Qwen3-30B-A3B's training TP; alltoall_seq routers see the SP-gathered micro-batch
    repeats: int = 5
    seed: int = 0


def _random_ids(rows: int, spec: MoEModelSpec, g: torch.Generator) -> torch.Tensor:
    """Distinct ids per cell, cheaply: ``(start + step * j) % E`` with a random start and a step coprime to E."""
    steps = torch.tensor([s for s in range(1, spec.num_experts) if math.gcd(s, spec.num_experts) == 1] or [1])
    cells = rows * spec.num_moe_layers
    start = torch.randint(0, spec.num_experts, (cells, 1), generator=g)
    step = steps[torch.randint(0, steps.numel(), (cells, 1), generator=g)]
    ids = (start + step * torch.arange(spec.topk)) % spec.num_experts
    return ids.reshape(rows, spec.num_moe_layers, spec.topk).to(spec.dtype)


def _grpo_batch(cfg: RoutingBenchConfig, spec: MoEModelSpec) -> tuple[list[RoutingTrace], list[int]]:
    """Groups sharing their prompt routing, response lengths spread between a quarter and all of the maximum."""
    g = torch.Generator().manual_seed(cfg.seed)
    traces, lens = [], []
    for _ in range(cfg.batch_prompts):
        prompt = _random_ids(cfg.prompt_len, spec, g)
        for _ in range(cfg.group_size):
            response = int(torch.randint(cfg.response_len // 4, cfg.response_len + 1, (1,), generator=g))
            ids = torch.cat([prompt, _random_ids(response - 1, spec, g)])
            traces.append(RoutingTrace(ids, spec.num_experts, cfg.prompt_len))
            lens.append(cfg.prompt_len + response)
    return traces, lens


def _ours(traces: list[RoutingTrace], lens: list[int], cfg: RoutingBenchConfig, layout: RouterTokenLayout) -> list:
    payloads = [encode(t) for t in traces]
    decoded = [decode(p) for p in payloads]
    padded_len = layout.padded_len(torch.tensor(lens))
    mbs = cfg.micro_batch_size
    return [
        layout_micro_batch(decoded[i : i + mbs], lens[i : i + mbs], layout, padded_len=padded_len).ids
        for i in range(0, len(decoded), mbs)
    ]


def _naive(traces: list[RoutingTrace], lens: list[int], cfg: RoutingBenchConfig, layout: RouterTokenLayout) -> list:
    payloads = [t.ids.to(torch.int32).reshape(-1) for t in traces]
    decoded = [p.view(-1, t.num_layers, t.topk) for p, t in zip(payloads, traces, strict=True)]
    padded_len = layout.padded_len(torch.tensor(lens))
    out = []
    for i in range(0, len(decoded), cfg.micro_batch_size):
        chunk = decoded[i : i + cfg.micro_batch_size]
        layers, topk = chunk[0].shape[1:]
        dense = torch.zeros(len(chunk), padded_len, layers, topk, dtype=torch.int64)
        for b, ids in enumerate(chunk):
            for layer in range(layers):
                dense[b, : ids.shape[0], layer] = ids[:, layer].to(torch.int64)
        out.append(dense.transpose(0, 1).reshape(-1, layers, topk))
    return out


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run_routing_bench(cfg: RoutingBenchConfig | None = None, progress: Callable[[str], None] | None = None) -> dict:
    cfg = cfg or RoutingBenchConfig()
    spec = MoEModelSpec.qwen3_30b_a3b()
    say = progress or (lambda _msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        say("sizes")
        tokens = cfg.prompt_len + cfg.response_len
        single = RoutingTrace(_random_ids(tokens - 1, spec, torch.Generator().manual_seed(1)), spec.num_experts)
        bytes_per_token = encode(single).numel() * 4 / tokens
        prompt = single.ids[: cfg.prompt_len]
        group_gen = torch.Generator().manual_seed(2)
        group = [
            RoutingTrace(torch.cat([prompt, _random_ids(cfg.response_len - 1, spec, group_gen)]), spec.num_experts)
            for _ in range(cfg.group_size)
        ]
        group_payloads = encode_group(group, cfg.prompt_len)
        if not all(torch.equal(a.ids, b.ids) for a, b in zip(decode_group(group_payloads), group, strict=True)):
            raise RuntimeError("benchmark self-check failed: group dedupe did not round-trip")
        bytes_dedupe = sum(p.numel() * 4 for p in group_payloads) / (tokens * cfg.group_size)

        say("throughput")
        traces, lens = _grpo_batch(cfg, spec)
        layout = RouterTokenLayout(tp_size=cfg.tp_size, sequence_parallel=True, router_gathers_tp=True)
        ours_s, ours = _best_time(lambda: _ours(traces, lens, cfg, layout), cfg.repeats)
        naive_s, naive = _best_time(lambda: _naive(traces, lens, cfg, layout), max(1, cfg.repeats // 2))
        for mine, theirs in zip(ours, naive, strict=True):
            recorded = mine[..., 0] != 255
            if not torch.equal(mine[recorded].to(torch.int64), theirs[recorded]):
                raise RuntimeError("benchmark self-check failed: layout differs from the naive baseline")
        payload_bytes = sum(t.ids.numel() for t in traces)
    finally:
        torch.set_num_threads(threads)
    int32_bytes_per_token = (tokens - 1) * spec.num_moe_layers * spec.topk * 4 / tokens
    return {
        "model": asdict(spec) | {"name": "Qwen3-30B-A3B"},
        "config": asdict(cfg),
        "bytes_per_token": round(bytes_per_token, 2),
        "bytes_per_token_dedupe": round(bytes_dedupe, 2),
        "dedupe_ratio": round(bytes_dedupe / bytes_per_token, 4),
        "int32_bytes_per_token": round(int32_bytes_per_token, 2),
        "batch_sequences": len(traces),
        "batch_tokens": int(sum(lens)),
        "payload_mb": round(payload_bytes / 1e6, 2),
        "layout_seconds": round(ours_s, 4),
        "naive_seconds": round(naive_s, 4),
        "layout_gb_per_s": round(payload_bytes / ours_s / 1e9, 3),
        "layout_speedup_vs_naive": round(naive_s / ours_s, 2),
        "threads": 1,
    }
