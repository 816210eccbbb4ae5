"""``mindspeed-rl-r3 plan``: check a MindSpeed-RL config's parallel layout against the model, and estimate memory.

:func:`plan_config` reads a composed config (the hydra sections ``model``, ``megatron_training``, ``actor_config``,
``rl_config``, ``generate_config`` and the package's ``r3`` / ``aqn`` / ``lora_extras``) and returns::

    {"ok": bool, "errors": [str], "warnings": [str], "findings": [{"severity", "key", "message"}],
     "layout": {...}, "model": {...},
     "memory_gib_per_npu": {"with_lora": {...}, "without_lora": {...}, "active": ..., "hbm": ..., ...},
     "assumptions": [str]}

The layout is computed once (:mod:`.planning.layout`), then checked by the plan's rules (:mod:`.planning.rules`:
Megatron, MindSpeed-LLM, MindSpeed-RL ``validate_rl_args`` and vLLM sizes, batches, resources, memory) and by the
run's own rules (:mod:`.config_rules`, which ``train`` and every worker apply too, so ``plan`` accepts exactly the
configs the run accepts as far as those rules go). Every finding names the config key it is about.

Nothing here imports torch or an upstream framework; hydra/omegaconf are needed only by :func:`load_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mindspeed_rl_r3.planning.compose import CONFIGS_DIR, compose_hydra, load_config
from mindspeed_rl_r3.planning.layout import compute_layout, layout_report
from mindspeed_rl_r3.planning.memory import ASSUMPTIONS, activation_bytes_per_token, estimate_memory
from mindspeed_rl_r3.planning.report import format_plan
from mindspeed_rl_r3.planning.rules import PLAN_RULES, PlanContext, memory_rules
from mindspeed_rl_r3.planning.sections import ModelDims, PlanError, PlanSections, to_plain

__all__ = [
    "ASSUMPTIONS",
    "CONFIGS_DIR",
    "ModelDims",
    "PlanError",
    "activation_bytes_per_token",
    "compose_hydra",
    "format_plan",
    "load_config",
    "plan_config",
]


def plan_config(
    cfg: Mapping | Any,
    *,
    num_npus: int | None = None,
    nnodes: int | None = None,
    npu_memory_gib: float = 64.0,
    runtime_env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the parallel layout of a composed MindSpeed-RL config and estimate per-NPU memory.

    ``cfg`` is a dict or DictConfig with the hydra sections. ``num_npus`` is the NPU count the job gets
    (NNODES * NPUS_PER_NODE); when given it must equal ``rl_config.actor_resource.num_npus``. ``nnodes`` enables the
    per-node rules (rule-reward workers, TP inside a node). ``npu_memory_gib`` is the HBM of one NPU (64 for Atlas
    A2 910B and each A3 die). ``runtime_env`` is the Ray runtime env (``{"env_vars": {...}}``) if it should be
    cross-checked. ``ok`` is False when any error was found. Raises :class:`PlanError` only when the config lacks
    what a plan needs (the model section or its dimensions).
    """
    s = PlanSections(to_plain(cfg))
    m = ModelDims.from_sections(s)
    lay, found = compute_layout(s, m, num_npus=num_npus, nnodes=nnodes)
    context = PlanContext(s, m, lay, runtime_env)
    for rule in PLAN_RULES:
        found += rule(context)
    memory = estimate_memory(s, m, lay, npu_memory_gib)
    found += memory_rules(context, memory, npu_memory_gib)
    errors = [f.message for f in found if f.severity == "error"]
    return {
        "ok": not errors,
        "errors": errors,
        "warnings": [f.message for f in found if f.severity == "warning"],
        "findings": [f.as_dict() for f in found],
        "layout": layout_report(lay, m),
        "model": {
            "name": s.model_name,
            "total_params_b": round(m.total_params() / 1e9, 3),
            "layers": m.num_layers,
            "moe_layers": m.moe_layers if m.num_experts else 0,
            "hidden": m.hidden,
            "heads": m.heads,
            "kv_heads": m.kv_heads,
            "head_dim": m.head_dim,
            "experts": m.num_experts,
            "topk": m.topk,
        },
        "memory_gib_per_npu": memory,
        "assumptions": list(ASSUMPTIONS),
    }
