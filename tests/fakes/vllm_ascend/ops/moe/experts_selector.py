"""Fake ``vllm_ascend/ops/moe/experts_selector.py::select_experts`` (softmax top-k, renormalised, int32 ids)."""

import torch


def select_experts(
    hidden_states,
    router_logits,
    top_k,
    use_grouped_topk,
    renormalize,
    topk_group=None,
    num_expert_group=None,
    custom_routing_function=None,
    scoring_func="softmax",
    routed_scaling_factor=1.0,
    e_score_correction_bias=None,
    indices_type=None,
    global_num_experts=-1,
):
    scores = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = scores.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
