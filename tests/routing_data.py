"""Random routing data for tests: distinct ids per (row, layer), optional missing cells."""

from __future__ import annotations

import torch

from mindspeed_rl_r3.routing import RoutingTrace


def random_ids(rows: int, layers: int, topk: int, experts: int, generator: torch.Generator) -> torch.Tensor:
    """int64 ``[rows, layers, topk]`` of distinct ids per cell (top-k of random scores, like a real router)."""
    scores = torch.rand(rows, layers, experts, generator=generator)
    return scores.topk(topk, dim=-1).indices


def random_trace(
    rows: int,
    layers: int,
    topk: int,
    experts: int,
    *,
    missing: float = 0.0,
    seed: int = 0,
    prompt_len: int | None = None,
) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(rows, layers, topk, experts, g)
    if missing > 0:
        drop = torch.rand(rows, layers, generator=g) < missing
        ids[drop] = -1
    return RoutingTrace.from_ids(ids, experts, prompt_len=prompt_len)
