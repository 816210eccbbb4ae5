"""Fake ``mindspeed_rl/models/rollout/vllm_adapter/fused_moe.py`` (2.3.0): binds ``select_experts`` from
vllm_ascend.ops.fused_moe, defines its own ``AscendUnquantizedFusedMoEMethod.apply`` calling that binding, and
installs it into vllm_ascend.ops.fused_moe at import."""

from vllm_ascend.ops import fused_moe as ascend_fused_moe
from vllm_ascend.ops.common_fused_moe import AscendUnquantizedFusedMoEMethod as _Base
from vllm_ascend.ops.fused_moe import select_experts  # noqa: F401  (the binding apply() looks up)


class AscendUnquantizedFusedMoEMethod(_Base):
    def apply(
        self,
        layer,
        x,
        router_logits,
        top_k,
        renormalize,
        use_grouped_topk=False,
        global_num_experts=-1,
        expert_map=None,
        topk_group=None,
        num_expert_group=None,
        custom_routing_function=None,
        scoring_func="softmax",
        e_score_correction_bias=None,
        is_prefill=False,
        enable_force_load_balance=False,
        log2phy=None,
        global_redundant_expert_num=0,
        hidden_states_for_share=None,
        shared_experts=None,
        **kwargs,
    ):
        return super().apply(layer, x, use_grouped_topk, top_k, router_logits, renormalize)


ascend_fused_moe.AscendUnquantizedFusedMoEMethod = AscendUnquantizedFusedMoEMethod
