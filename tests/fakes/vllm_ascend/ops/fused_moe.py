"""Fake ``vllm_ascend/ops/fused_moe.py`` of v0.9.1-dev (8c7bc45): ``select_experts`` is defined here, and
``AscendFusedMoE.forward(hidden_states, router_logits, is_prefill, ...)`` exchanges tokens before ``apply``.
MindSpeed-RL 2.3.0 replaces ``AscendUnquantizedFusedMoEMethod`` in this module at import time."""

from vllm_ascend.ops import common_fused_moe
from vllm_ascend.ops.moe.experts_selector import select_experts  # noqa: F401  (v0.9.1-dev defines it here)

AscendUnquantizedFusedMoEMethod = common_fused_moe.AscendUnquantizedFusedMoEMethod


class AscendFusedMoE(common_fused_moe.AscendFusedMoE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant_method = AscendUnquantizedFusedMoEMethod()

    def forward(
        self,
        hidden_states,
        router_logits,
        is_prefill=True,
        enable_force_load_balance=False,
        top_k=None,
        shared_experts=None,
        gate=None,
        replace_allreduce=False,
    ):
        return common_fused_moe.AscendFusedMoE.forward_impl(self, hidden_states, router_logits)
