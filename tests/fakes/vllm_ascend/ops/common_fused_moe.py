"""Fake ``vllm_ascend/ops/common_fused_moe.py`` at 1b16c01.

``select_experts`` is bound in this module; ``AscendFusedMoE.forward_impl`` runs ``prepare`` (here: the AllGather
layout with DP > 1, padding this rank's tokens to ``max_tokens_across_dp`` and stacking another rank's block in
front of them), then ``quant_method.apply`` (selection on the prepared rows), then ``finalize`` (this rank's rows).
"""

import torch

from vllm_ascend.ops.moe.experts_selector import select_experts

DP_RANK = 1  # this rank's block comes after DP rank 0's
OTHER_RANK_TOKENS = 3


class AscendUnquantizedFusedMoEMethod:
    def apply(
        self,
        layer,
        x,
        use_grouped_topk,
        top_k,
        router_logits,
        renormalize,
        topk_group=None,
        num_expert_group=None,
        custom_routing_function=None,
        scoring_func="softmax",
        routed_scaling_factor=1.0,
        e_score_correction_bias=None,
        global_num_experts=-1,
        expert_map=None,
        apply_router_weight_on_input=False,
        enable_force_load_balance=False,
        shared_experts=None,
        **kwargs,
    ):
        weights, ids = select_experts(
            hidden_states=x,
            router_logits=router_logits,
            top_k=top_k,
            use_grouped_topk=use_grouped_topk,
            renormalize=renormalize,
            topk_group=topk_group,
            num_expert_group=num_expert_group,
            custom_routing_function=custom_routing_function,
            scoring_func=scoring_func,
            routed_scaling_factor=routed_scaling_factor,
            e_score_correction_bias=e_score_correction_bias,
            global_num_experts=global_num_experts,
        )
        expert_out = torch.einsum("th,ehd->ted", x, layer.w)  # every expert, then mix the chosen ones
        chosen = expert_out.gather(1, ids.long().unsqueeze(-1).expand(-1, -1, expert_out.shape[-1]))
        return (chosen * weights.unsqueeze(-1).to(x.dtype)).sum(1)


class AscendFusedMoE(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.top_k = kwargs["top_k"]
        self.global_num_experts = kwargs["num_experts"]
        self.renormalize = kwargs.get("renormalize", True)
        self.use_grouped_topk = kwargs.get("use_grouped_topk", False)
        self.topk_group = kwargs.get("topk_group")
        self.num_expert_group = kwargs.get("num_expert_group")
        self.custom_routing_function = kwargs.get("custom_routing_function")
        self.scoring_func = kwargs.get("scoring_func", "softmax")
        self.routed_scaling_factor = kwargs.get("routed_scaling_factor", 1.0)
        self.e_score_correction_bias = kwargs.get("e_score_correction_bias")
        self.layer_name = kwargs["prefix"]
        hidden = kwargs["hidden_size"]
        generator = torch.Generator().manual_seed(len(self.layer_name))
        self.w = torch.randn(self.global_num_experts, hidden, hidden, generator=generator) / hidden**0.5
        self.quant_method = AscendUnquantizedFusedMoEMethod()

    def forward(self, hidden_states, router_logits):
        return self.forward_impl(hidden_states, router_logits)

    def forward_impl(self, hidden_states, router_logits):
        n = hidden_states.shape[0]
        pad = max(n, OTHER_RANK_TOKENS)
        other_x = torch.ones(pad, hidden_states.shape[1])
        other_logits = torch.linspace(-1, 1, router_logits.shape[1]).expand(pad, -1)
        x = torch.cat([other_x, torch.nn.functional.pad(hidden_states, (0, 0, 0, pad - n))])
        logits = torch.cat([other_logits, torch.nn.functional.pad(router_logits, (0, 0, 0, pad - n))])
        out = self.quant_method.apply(
            layer=self,
            x=x,
            router_logits=logits,
            top_k=self.top_k,
            renormalize=self.renormalize,
            use_grouped_topk=self.use_grouped_topk,
            global_num_experts=self.global_num_experts,
            scoring_func=self.scoring_func,
        )
        return out[DP_RANK * pad : DP_RANK * pad + n]
