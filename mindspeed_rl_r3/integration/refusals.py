"""Configurations the integration refuses, decided from MindSpeed-RL's own config objects (torch-free).

One function serves the driver (``mindspeed_rl_r3.train``, before Ray starts) and every actor worker's
``initialize`` (the last line of defence for drivers that are not ours), so both refuse the same configs with the
same words. Each refusal names the setting and, where there is one, the fix.
"""

from __future__ import annotations

from typing import Any

from mindspeed_rl_r3.config import IntegrationConfig


def refusals(rl: Any, megatron: Any, generate: Any, config: IntegrationConfig) -> list[str]:
    """Why ``(rl_config, megatron config, generate_config)`` cannot run with the package's sections (``[]``: it can).

    The arguments are MindSpeed-RL's ``RLConfig`` / ``MegatronConfig`` / ``GenerateConfig`` (or anything with the same
    attributes); a missing attribute counts as MindSpeed-RL's default.
    """
    problems = []
    if getattr(megatron, "stage", "ray_grpo") != "ray_grpo":
        problems.append(f"megatron_training.stage {megatron.stage!r} (the integration extends the GRPO trainer)")
    if getattr(rl, "is_multimodal", False):
        problems.append("rl_config.is_multimodal (text-only models)")
    # Every integrated rollout puts rollout_log_probs (and with R3 routed_experts), which the training stages wait
    # for in the TransferDock: a rollout path the package does not wrap would leave them waiting forever.
    if getattr(rl, "async_engine", False):
        problems.append("rl_config.async_engine (the package wraps the synchronous rollout path only)")
    if getattr(rl, "multi_turn_enable", False):
        problems.append("rl_config.multi_turn_enable (the package wraps the single-turn rollout path only)")
    if config.r3.capture:
        if getattr(generate, "torchair_graph", False):
            problems.append("generate_config.torchair_graph (capture runs in vllm-ascend's eager / ACL graph MoE)")
        if not getattr(generate, "enforce_eager", True):
            # A captured ACL graph freezes the capture's Python decisions; until graph replay is proven to record
            # every step's routing, graph-mode rollouts with R3 are refused rather than replaying stale rows.
            problems.append(
                "generate_config.enforce_eager: false (routing capture is proven in eager mode only): set "
                "generate_config.enforce_eager: true"
            )
        if getattr(megatron, "num_layers_per_virtual_pipeline_stage", None):
            problems.append("actor_config.num_layers_per_virtual_pipeline_stage (replay serves one chunk per rank)")
        if config.r3.group_dedupe:
            problems += _group_dedupe_problems(rl)
    return problems


# Consumers of the routing column whose dispatch must hand out whole GRPO groups for group dedupe to decode.
_GROUP_DISPATCHES = ("actor_logprob_dispatch_size", "actor_update_dispatch_size", "ref_dispatch_size")


def _group_dedupe_problems(rl: Any) -> list[str]:
    """A follower's payload decodes only next to its group's leader, so every dispatch must carry whole groups."""
    fix = "or r3.group_dedupe: false"
    if not getattr(rl, "guarantee_order", False):
        return [
            "r3.group_dedupe with rl_config.guarantee_order: false (MindSpeed-RL's default samples single rows at "
            "random, splitting GRPO groups from the leader that carries their shared prompt routing): set "
            f"rl_config.guarantee_order: true {fix}"
        ]
    n = int(getattr(rl, "n_samples_per_prompt", 1) or 1)
    return [
        f"r3.group_dedupe with rl_config.{name}: {size}, not a multiple of n_samples_per_prompt {n} (a dispatch "
        f"would split a GRPO group): use a multiple of {n} {fix}"
        for name in _GROUP_DISPATCHES
        if (size := getattr(rl, name, None)) and int(size) % n
    ]


def refusal_message(problems: list[str]) -> str:
    return "mindspeed_rl_r3 cannot run with: " + "; ".join(problems)
