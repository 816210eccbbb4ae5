"""Replayed top-k routing: the selection comes from the rollout, the gate weights from the live logits.

Pure torch. The functions mirror Megatron's top-k routing (core 0.12.1 ``topk_softmax_with_capacity``, core 0.16
``topk_routing_with_score_function``) with its ``compute_topk`` step replaced by :func:`replay_select`, so replaying
the ids the router would have chosen anyway reproduces the native probabilities and gradients exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

TopkFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def replay_select(
    scores: torch.Tensor,
    native_idx: torch.Tensor,
    replay_ids: torch.Tensor,
    missing: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` with the replayed ids, or the native ones on missing rows.

    ``values`` are gathered from the dense ``scores``, so every replayed expert gets gradient, including those the
    live router would not have picked. The choice between replayed and native is a ``torch.where`` on the device: no
    host synchronisation.
    """
    ids = replay_ids if missing is None else torch.where(missing.unsqueeze(1), native_idx, replay_ids)
    return scores.gather(1, ids), ids


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int | None = None) -> int:
    """Megatron's ``get_capacity``: ``ceil(num_tokens / num_experts * capacity_factor)``, at least ``min_capacity``."""
    capacity = math.ceil(num_tokens / num_experts * capacity_factor)
    return max(capacity, min_capacity) if min_capacity is not None else capacity


def apply_capacity(
    routing_probs: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    capacity_factor: float,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token dropping applied to the (replayed) map, with Megatron's drop policies."""
    num_tokens, num_experts = routing_probs.shape
    capacity = expert_capacity(num_tokens * topk, num_experts, capacity_factor)
    if drop_policy == "probs":
        ranked = routing_probs
    elif drop_policy == "position":
        ranked = routing_map.int()
    else:
        raise ValueError(f"Invalid drop_policy: {drop_policy}")
    _, keep = torch.topk(ranked, k=min(capacity, num_tokens), dim=0, sorted=False)
    capacity_mask = torch.zeros_like(routing_probs).scatter(0, keep, 1).bool()
    final_map = capacity_mask if pad_to_capacity else routing_map & capacity_mask
    return routing_probs * final_map, final_map


def routing_with_select(
    logits: torch.Tensor,
    topk: int,
    select: TopkFn,
    *,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: str = "softmax",
    expert_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's score-function top-k routing with ``select(scores, topk, num_groups, group_topk)`` choosing ids.

    Returns ``(routing_probs [T, E], routing_map [T, E] bool, top_indices [T, k])``.
    """
    if score_function == "softmax":
        if use_pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            probs, top_indices = select(scores, topk, num_groups, group_topk)
        else:
            scores, top_indices = select(logits, topk, num_groups, group_topk)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is not None:
            # The bias steers selection only; the gate weights come from the unbiased scores.
            _, top_indices = select(scores + expert_bias, topk, num_groups, group_topk)
            scores = torch.gather(scores, dim=1, index=top_indices).type_as(logits)
        else:
            scores, top_indices = select(scores, topk, num_groups, group_topk)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    else:
        raise ValueError(f"Invalid score_function: {score_function}")
    if scaling_factor:
        probs = probs * scaling_factor
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map, top_indices


def replay_topk(
    logits: torch.Tensor,
    replay_ids: torch.Tensor,
    missing: torch.Tensor | None = None,
    *,
    score_function: str = "softmax",
    use_pre_softmax: bool = False,
    expert_bias: torch.Tensor | None = None,
    scaling_factor: float | None = None,
    norm_topk_prob: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(probs [T, E], routing_map [T, E])`` for replayed ids ``[T, k]``; native top-k on ``missing`` rows.

    Differentiable with respect to ``logits``. ``norm_topk_prob`` renormalises the k gate weights to sum to one
    (MindSpeed-LLM's flag; the post-softmax path is normalised already).
    """
    topk = replay_ids.shape[1]

    def select(scores: torch.Tensor, k: int, _groups: int | None, _group_topk: int | None):
        native = torch.topk(scores, k=k, dim=1).indices
        return replay_select(scores, native, replay_ids, missing)

    probs, routing_map, _ = routing_with_select(
        logits,
        topk,
        select,
        use_pre_softmax=use_pre_softmax,
        scaling_factor=scaling_factor,
        score_function=score_function,
        expert_bias=expert_bias,
    )
    if norm_topk_prob:
        probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    return probs, routing_map
