"""Parallel-plan rules for MindSpeed LoRA on an MoE model, as the upstream code enforces or silently assumes them.

- MindSpeed-LLM ``features_manager/finetune/lora.py::LoraFeature.validate_args`` (a2c0733 and later): LoRA on an MoE
  model requires ``moe_token_dispatcher_type == "alltoall_seq"``.
- MindSpeed-LLM after a2c0733 (checked at ``c77308a``) also rejects LoRA with ``moe_tp_extend_ep``.
- MindSpeed-LLM ``training/arguments.py``: ``moe_alltoall_overlap_comm`` requires ``alltoall_seq``.
- MindSpeed-RL ``MegatronStyleVllmWeightContainer._validate_parallel_config`` (05a90d77): training EP > 1 requires
  ``moe_tp_extend_ep``; inference ``EP * TP`` must be a multiple of the training expert-parallel size.
- MindSpeed-RL ``get_infer_params``: expert weights are skipped by the non-expert update whenever inference
  ``EP * TP > 1`` and are written only by ``_update_weight_buffers_ep``, which runs only with ``moe_tp_extend_ep``.
  Without it the rollout keeps its dummy expert weights (not checked upstream).
- ``lora_router_trainable`` with ``lora_ckpt_filter`` loses the trained router at every checkpoint.
"""

from __future__ import annotations

from typing import Literal

from mindspeed_rl_r3.lora.router import check_router_trainable_options


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
    mindspeed_llm: Literal["a2c0733", "later"] = "a2c0733",
) -> list[str]:
    """Every rule above that a LoRA run on an MoE model with these settings breaks (empty list: the plan is valid).

    ``mindspeed_llm="a2c0733"`` is the commit MindSpeed-RL pins; ``"later"`` applies MindSpeed-LLM's newer check.
    """
    problems = []
    if moe_token_dispatcher_type != "alltoall_seq":
        problems.append(
            f"moe_token_dispatcher_type={moe_token_dispatcher_type!r}: MindSpeed-LLM LoRA on MoE requires "
            "'alltoall_seq' (LoraFeature.validate_args)"
        )
    if moe_alltoall_overlap_comm and moe_token_dispatcher_type != "alltoall_seq":
        problems.append("moe_alltoall_overlap_comm requires moe_token_dispatcher_type 'alltoall_seq'")
    if mindspeed_llm != "a2c0733" and moe_tp_extend_ep:
        problems.append("MindSpeed-LLM after a2c0733 rejects LoRA with moe_tp_extend_ep (LoraFeature.validate_args)")
    expert_group = train_ep * (train_tp if moe_tp_extend_ep else 1)
    if train_ep > 1 and not moe_tp_extend_ep:
        problems.append(
            f"training EP {train_ep} > 1 needs moe_tp_extend_ep in MindSpeed-RL's weight container "
            "(_validate_parallel_config)"
        )
    if (infer_ep * infer_tp) % expert_group:
        problems.append(
            f"inference EP*TP {infer_ep * infer_tp} is not a multiple of the training expert group {expert_group} "
            "(_validate_parallel_config)"
        )
    if infer_ep * infer_tp > 1 and not moe_tp_extend_ep:
        problems.append(
            f"inference EP*TP = {infer_ep * infer_tp} > 1 without moe_tp_extend_ep: MindSpeed-RL's get_infer_params "
            "never writes the expert weights (the non-expert update skips them, the EP update does not run), so the "
            "rollout's experts stay at their dummy initialisation"
        )
    if lora_router_trainable:
        problems += check_router_trainable_options(["lora"], lora_ckpt_filter)
    return problems
