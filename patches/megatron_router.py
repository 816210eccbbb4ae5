"""Routing replay in megatron-core's ``TopKRouter``: core 0.12.x (MindSpeed-RL's pin) and core 0.16+.

core 0.12.x has no replay hook: top-k selection is a closure inside ``topk_softmax_with_capacity``, which
``router.py`` imports by name. :func:`topk_softmax_with_capacity_replay_wrapper` wraps that binding and, while the
calling router has an active hook, recomputes the same routing with the hook choosing the ids;
:func:`topk_router_routing_replay_wrapper` wraps ``TopKRouter.routing`` so the wrapper knows which router calls it.
Both are plain decorators named ``*_wrapper``, so MindSpeed's patch manager stacks them over its own replacements
(see :mod:`mindspeed_rl_r3.patches.mindspeed_llm_router`); :func:`apply` installs them directly otherwise.

core 0.16+ passes ``router.router_replay`` into ``topk_routing_with_score_function``; :func:`bind_replay` sets it to
our hook, bound by the router's global layer number rather than construction order. The fused (TE) router path
skips that hook, so binding refuses it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any

import torch

from mindspeed_rl_r3.patches.patch_set import PatchSet, carries_mark
from mindspeed_rl_r3.patches.targets import PatchTarget
from mindspeed_rl_r3.replay.router import apply_capacity, routing_with_select
from mindspeed_rl_r3.replay.state import ReplayHook, RouterAction, RouterReplayState
from mindspeed_rl_r3.routing.trace import RoutingError

ROUTER_MODULE = "megatron.core.transformer.moe.router"
TARGETS = (
    PatchTarget(
        f"{ROUTER_MODULE}.topk_softmax_with_capacity",
        versions=("0.12.",),
        parameters=("logits", "topk", "capacity_factor", "pad_to_capacity", "drop_policy", "use_pre_softmax"),
    ),
    PatchTarget(f"{ROUTER_MODULE}.TopKRouter.routing", versions=("0.12.", "0.16."), parameters=("self", "logits")),
    PatchTarget(
        "megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function",
        versions=("0.16.",),
        parameters=("logits", "topk", "use_pre_softmax", "num_groups", "group_topk", "scaling_factor"),
    ),
)
_MARK = "_mindspeed_rl_r3_replay"
_active_hooks: list[ReplayHook] = []  # the router currently inside ``routing`` (calls do not nest)


def megatron_version() -> str | None:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except ImportError:
        return None


def has_native_replay_hook() -> bool:
    """core 0.16+: ``topk_routing_with_score_function`` accepts ``router_replay``."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return False
    fn = getattr(moe_utils, "topk_routing_with_score_function", None)
    return fn is not None and "router_replay" in inspect.signature(fn).parameters


def _topk_reference(
    logits,
    topk,
    capacity_factor=None,
    pad_to_capacity=False,
    drop_policy="probs",
    use_pre_softmax=False,
    num_groups=None,
    group_topk=None,
    scaling_factor=None,
    deterministic_mode=False,
    score_function="softmax",
    expert_bias=None,
):
    """Parameter list of core 0.12.1 ``topk_softmax_with_capacity``, used to bind the wrapped call's arguments."""


_TOPK_SIGNATURE = inspect.signature(_topk_reference)


def _replayed_topk_softmax_with_capacity(hook: ReplayHook, args: inspect.BoundArguments):
    from megatron.core.transformer.moe import moe_utils

    a = args.arguments
    logits, topk = a["logits"], a["topk"]
    num_tokens, num_experts = logits.shape

    def compute_topk(scores, k, num_groups=None, group_topk=None):
        if group_topk:
            return moe_utils.group_limited_topk(
                scores=scores,
                topk=k,
                num_tokens=num_tokens,
                num_experts=num_experts,
                num_groups=num_groups,
                group_topk=group_topk,
            )
        return torch.topk(scores, k=k, dim=1)

    probs, routing_map, _ = routing_with_select(
        logits,
        topk,
        lambda scores, k, groups, group_k: hook.select(scores, k, groups, group_k, compute_topk),
        use_pre_softmax=a["use_pre_softmax"],
        num_groups=a["num_groups"],
        group_topk=a["group_topk"],
        scaling_factor=a["scaling_factor"],
        score_function=a["score_function"],
        expert_bias=a["expert_bias"],
    )
    if hook.state.config.aux_loss_routing == "replayed":
        tokens_per_expert = routing_map.sum(dim=0)
    else:
        tokens_per_expert = torch.bincount(hook.last_native.reshape(-1), minlength=num_experts)
    if a["capacity_factor"] is not None:
        probs, routing_map = apply_capacity(
            probs, routing_map, topk, a["capacity_factor"], a["drop_policy"], a["pad_to_capacity"]
        )
    return probs, routing_map, tokens_per_expert


def topk_softmax_with_capacity_replay_wrapper(fn):
    """Wrap core 0.12 ``topk_softmax_with_capacity``: replay when the calling router's hook is active."""

    @functools.wraps(fn)
    def topk_softmax_with_capacity(*args: Any, **kwargs: Any):
        hook = _active_hooks[-1] if _active_hooks else None
        if hook is None or not hook.active:
            return fn(*args, **kwargs)
        bound = _TOPK_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        return _replayed_topk_softmax_with_capacity(hook, bound)

    setattr(topk_softmax_with_capacity, _MARK, True)
    return topk_softmax_with_capacity


def topk_router_routing_replay_wrapper(fn):
    """Wrap ``TopKRouter.routing`` (Megatron's or MindSpeed-LLM's): mark the router whose top-k runs now."""

    @functools.wraps(fn)
    def routing(self, logits, *args: Any, **kwargs: Any):
        hook = getattr(self, "_r3_hook", None)
        if hook is None:
            return fn(self, logits, *args, **kwargs)
        before = hook.selections
        _active_hooks.append(hook)
        try:
            out = fn(self, logits, *args, **kwargs)
        finally:
            _active_hooks.pop()
        if hook.active and hook.selections == before and not has_native_replay_hook():
            raise RoutingError(
                f"layer {hook.layer_number}: routing type {getattr(self, 'routing_type', '?')!r} never called "
                "topk_softmax_with_capacity, so routing could not be replayed; use aux_loss, seq_aux_loss or none"
            )
        if hook.active and isinstance(out, tuple) and len(out) == 2 and getattr(out[1], "dtype", None) == torch.bool:
            hook.dispatched(out[1])  # (probs, routing_map): the experts this layer really sends its tokens to
        return out

    setattr(routing, _MARK, True)
    return routing


PATCHES = PatchSet(_MARK, "megatron_router")


def is_wrapped(fn: Any) -> bool:
    """Whether our replay wrapper is anywhere in ``fn``'s chain of ``__wrapped__`` decorators."""
    return carries_mark(fn, _MARK)


def apply() -> list[str]:
    """Install the core 0.12 wrappers directly (no MindSpeed). Idempotent; returns what it changed."""
    from megatron.core.transformer.moe import router

    changed = [PATCHES.wrap(router.TopKRouter, "routing", topk_router_routing_replay_wrapper)]
    if getattr(router, "topk_softmax_with_capacity", None) is not None:  # core 0.16 has no such binding
        changed.append(PATCHES.wrap(router, "topk_softmax_with_capacity", topk_softmax_with_capacity_replay_wrapper))
    return [path for path in changed if path]


def undo() -> list[str]:
    """Restore what :func:`apply` replaced."""
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    version = megatron_version()
    native = has_native_replay_hook()
    return [
        t.check(version)
        for t in TARGETS
        if ("topk_routing_with_score_function" in t.path) == native or t.path.endswith("TopKRouter.routing")
    ]


def iter_routers(models: torch.nn.Module | Iterable[torch.nn.Module]):
    """``(name, router)`` for every decoder ``TopKRouter`` (multi-token-prediction layers excluded)."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = [models] if isinstance(models, torch.nn.Module) else list(models)
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, TopKRouter) and ".mtp." not in f".{name}.":
                yield name, module


def bind_replay(models: torch.nn.Module | Iterable[torch.nn.Module], state: RouterReplayState) -> list[int]:
    """Attach a hook to every router, keyed by its global layer number; returns the layer numbers."""
    native = has_native_replay_hook()
    if not native and not is_wrapped(_router_routing()):
        raise RoutingError(
            "megatron-core 0.12 routers are not wrapped: call mindspeed_rl_r3.patches.megatron_router.apply() "
            "(or register the MindSpeed wrappers) before binding replay"
        )
    if native and state.config.aux_loss_routing == "replayed":
        raise RoutingError(
            "r3.aux_loss_routing='replayed' needs megatron-core 0.12.x; core >= 0.16 computes the aux loss from "
            "its own top-k"
        )
    numbers = []
    for name, router in iter_routers(models):
        config = router.config
        if getattr(config, "moe_router_fusion", False):
            raise RoutingError(f"{name}: moe_router_fusion=True bypasses top-k selection; disable it to replay routing")
        if getattr(router, "routing_type", None) == "sinkhorn":
            raise RoutingError(f"{name}: sinkhorn routing has no top-k step to replay")
        if router.layer_number is None:
            raise RoutingError(f"{name}: router has no layer_number; build the model through TransformerLayer")
        hook = ReplayHook(state, int(router.layer_number))
        router._r3_hook = hook
        if native:
            router.router_replay = hook
        numbers.append(hook.layer_number)
    if not numbers:
        raise RoutingError("no MoE TopKRouter found in the model")
    state.bind_layers(numbers)
    return sorted(numbers)


def unbind_replay(models: torch.nn.Module | Iterable[torch.nn.Module]) -> None:
    for _, router in iter_routers(models):
        if getattr(router, "_r3_hook", None) is not None:
            if getattr(router, "router_replay", None) is router._r3_hook:
                router.router_replay = None
            router._r3_hook = None


def _router_routing():
    from megatron.core.transformer.moe.router import TopKRouter

    return TopKRouter.routing


__all__ = ["RouterAction", "apply", "bind_replay", "check", "unbind_replay", "undo"]
