"""Parallel-plan rules for MindSpeed LoRA on an MoE model, as keyword arguments: a view of
:mod:`mindspeed_rl_r3.config_rules`, which holds the rules themselves (``plan``, ``train`` and the worker use them).

- MindSpeed-LLM ``LoraFeature.validate_args``: LoRA on an MoE model requires ``moe_token_dispatcher_type ==
  "alltoall_seq"``; MindSpeed-LLM after the pinned commit (checked at ``c77308a``) also rejects ``moe_tp_extend_ep``.
- MindSpeed-LLM ``training/arguments.py``: ``moe_alltoall_overlap_comm`` requires ``alltoall_seq``.
- MindSpeed-RL ``_validate_parallel_config``: training EP > 1 requires ``moe_tp_extend_ep``; inference ``EP * TP`` must
  be a multiple of the training expert group; ``get_infer_params`` writes expert weights to a rollout with
  ``EP * TP > 1`` only with ``moe_tp_extend_ep`` (not checked upstream).
- ``lora_router_trainable`` with ``lora_ckpt_filter`` loses the trained router at every checkpoint.
"""

from __future__ import annotations

from typing import Literal

from mindspeed_rl_r3 import config_rules
from mindspeed_rl_r3.config import IntegrationConfig, LoraExtras


def lora_moe_plan_problems(
    *,
    moe_token_dispatcher_type: str,
    moe_tp_extend_ep: bool,
    train_tp: int,
    train_ep: int,
    infer_tp: int,
    infer_ep: int,
    moe_alltoall_overlap_comm: bool = False,
    lora_router_trainable: bool = False,
    lora_ckpt_filter: bool = False,
    mindspeed_llm: Literal["pinned", "later"] = "pinned",
) -> list[str]:
    """Every rule above that a LoRA run on an MoE model with these settings breaks (empty list: the plan is valid).

    ``mindspeed_llm="pinned"`` is the commit MindSpeed-RL pins; ``"later"`` makes MindSpeed-LLM's newer rejection of
    ``moe_tp_extend_ep`` an error instead of a warning.
    """
    megatron = config_rules.ConfigView(
        {
            "num_experts": 2,  # any MoE model
            "lora_target_modules": ["linear_qkv"],
            "moe_token_dispatcher_type": moe_token_dispatcher_type,
            "moe_tp_extend_ep": moe_tp_extend_ep,
            "tensor_model_parallel_size": train_tp,
            "expert_model_parallel_size": train_ep,
            "moe_alltoall_overlap_comm": moe_alltoall_overlap_comm,
            # the overlap's other prerequisites are not what this view asks about
            "moe_permutation_async_comm": True,
            "moe_grouped_gemm": True,
            "lora_ckpt_filter": lora_ckpt_filter,
            "stage": "ray_grpo",
        }
    )
    generate = config_rules.ConfigView({"infer_tensor_parallel_size": infer_tp, "infer_expert_parallel_size": infer_ep})
    sections = IntegrationConfig(lora_extras=LoraExtras(lora_router_trainable))
    configs = config_rules.RunConfigs(config_rules.ConfigView(), megatron, generate, sections)
    problems = [f.message for rule in config_rules.RULES for f in rule(configs) if f.severity == "error"]
    if mindspeed_llm == "later":
        problems += [f.message for f in config_rules.lora_with_tp_extend_ep(configs)]
    return problems
