"""Register the routing-replay wrappers through MindSpeed's patch manager, over MindSpeed-LLM's router.

MindSpeed-LLM (a2c0733) replaces ``TopKRouter.routing`` with ``topk_router_routing`` (SP-gathered logits with
``alltoall_seq`` and TP > 1, then the ``moe_tp_extend_ep`` split) and, with ``--topk-softmax-in-fp32``, replaces
``topk_softmax_with_capacity``. MindSpeed's manager treats a callable named ``*_wrapper`` as a decorator that stacks
around whatever replacement is registered, so registering ours (after ``mindspeed_llm`` has registered its own, and
before the model is built) keeps every MindSpeed-LLM behaviour and adds replay. Re-registering is a no-op: the
manager deduplicates wrappers by identity.
"""

from __future__ import annotations

from typing import Any

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.patches.megatron_router import (
    ROUTER_MODULE,
    topk_router_routing_replay_wrapper,
    topk_softmax_with_capacity_replay_wrapper,
)
from mindspeed_rl_r3.patches.targets import PatchTarget

TARGETS = (
    PatchTarget(
        "mindspeed.patch_utils.MindSpeedPatchesManager.register_patch",
        versions=(pins.MINDSPEED,),
        parameters=("orig_func_name", "new_func", "force_patch", "create_dummy"),
    ),
    PatchTarget(
        "mindspeed_llm.core.transformer.moe.router.topk_router_routing",
        versions=(pins.MINDSPEED_LLM,),
        parameters=("self", "logits"),
    ),
)

REGISTRATIONS = (
    (f"{ROUTER_MODULE}.TopKRouter.routing", topk_router_routing_replay_wrapper),
    (f"{ROUTER_MODULE}.topk_softmax_with_capacity", topk_softmax_with_capacity_replay_wrapper),
)


def apply(manager: Any = None) -> list[str]:
    """Register both wrappers and apply MindSpeed's patches; returns the patched names."""
    if manager is None:
        from mindspeed.patch_utils import MindSpeedPatchesManager as manager
    for name, wrapper in REGISTRATIONS:
        manager.register_patch(name, wrapper)
    manager.apply_patches()
    return [name for name, _ in REGISTRATIONS]


def check() -> list[dict[str, Any]]:
    return [t.check(None) for t in TARGETS]
