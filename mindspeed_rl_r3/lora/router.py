"""``lora_router_trainable``: train the MoE router as a full parameter next to the LoRA adapters.

peft freezes every parameter whose name lacks ``lora_``, the router included, so R3's recomputed gate weights would
never move it. Setting ``requires_grad`` on ``mlp.router.weight`` (after peft wrapping, before the DDP buffers and
the optimizer are built) keeps its name, so weight sync carries it like any other weight (``mlp.router`` ->
``mlp.gate``); peft's ``modules_to_save`` would rename it and break the sync adaptors. MindSpeed-LLM deletes the
``sequence_parallel`` attribute of frozen parameters after wrapping; a trainable router needs it back, or its
gradients are not all-reduced over TP under sequence parallelism.

The reference policy is the initial model: when the actor and the reference share a backbone, the trained router is
swapped for a snapshot of its initial weight during the reference forward (see :mod:`.reference`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mindspeed_rl_r3.lora.names import model_chunks, strip_wrappers

ROUTER_SUFFIX = "mlp.router"
INITIAL_WEIGHT_ATTR = "_r3_initial_router_weight"


def iter_routers(model: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(wrapper-free module name, router)`` for every module named ``*.mlp.router`` with a ``weight``."""
    seen: set[int] = set()
    for chunk in model_chunks(model):
        for name, module in chunk.named_modules():
            clean = strip_wrappers(name)
            is_router = clean == ROUTER_SUFFIX or clean.endswith("." + ROUTER_SUFFIX)
            if is_router and id(module) not in seen and isinstance(getattr(module, "weight", None), torch.Tensor):
                seen.add(id(module))
                yield clean, module


def make_router_trainable(model: Any, sequence_parallel: bool | None = None) -> list[str]:
    """Let every router weight train; return their wrapper-free parameter names.

    Sets ``requires_grad`` and the ``sequence_parallel`` attribute (``sequence_parallel`` argument, else the
    router's ``config.sequence_parallel``, else ``False``). Call after ``get_peft_model`` and before DDP and the
    optimizer are built. Raises if the model has no router.
    """
    names = []
    for name, router in iter_routers(model):
        sp = sequence_parallel
        if sp is None:
            sp = bool(getattr(getattr(router, "config", None), "sequence_parallel", False))
        router.weight.requires_grad_(True)
        router.weight.sequence_parallel = sp
        names.append(f"{name}.weight")
    if not names:
        raise ValueError("lora_router_trainable: the model has no '*.mlp.router' module with a weight")
    return names


def snapshot_router_weights(model: Any, overwrite: bool = False, trainable_only: bool = False) -> int:
    """Keep a detached copy of each router weight on its module (a plain attribute: not a parameter or buffer, so
    never saved, synced or optimized). Take it after the checkpoint load and before the first update. Existing
    snapshots are kept unless ``overwrite``; ``trainable_only`` skips frozen routers. Returns routers snapshotted.
    """
    count = 0
    for _, router in iter_routers(model):
        if trainable_only and not router.weight.requires_grad:
            continue
        if overwrite or getattr(router, INITIAL_WEIGHT_ATTR, None) is None:
            setattr(router, INITIAL_WEIGHT_ATTR, router.weight.detach().clone())
            count += 1
    return count


@contextmanager
def initial_router_weights(model: Any) -> Iterator[int]:
    """Inside the block every router with a snapshot computes with its initial weight (the parameter's ``data`` is
    rebound, not written; restored on exit). Yields the number of routers swapped."""
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, router in iter_routers(model):
            initial = getattr(router, INITIAL_WEIGHT_ATTR, None)
            if initial is None:
                continue
            weight = router.weight
            if initial.shape != weight.shape:
                raise ValueError(f"{name}: router snapshot {tuple(initial.shape)} != weight {tuple(weight.shape)}")
            swapped.append((weight, weight.data))
            weight.data = initial.to(device=weight.device, dtype=weight.dtype)
        yield len(swapped)
    finally:
        for weight, data in swapped:
            weight.data = data


def check_router_trainable_options(lora_target_modules: Any, lora_ckpt_filter: bool = False) -> list[str]:
    """Problems with enabling ``lora_router_trainable`` under these MindSpeed settings (empty if none)."""
    problems = []
    if not lora_target_modules:
        problems.append("lora_router_trainable needs LoRA (lora_target_modules is empty)")
    if lora_ckpt_filter:
        problems.append(
            "lora_ckpt_filter saves only names containing 'lora' (MindSpeed-LLM filter_lora_keys): "
            "the trained router would be lost at every checkpoint"
        )
    return problems
