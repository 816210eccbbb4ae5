"""The reference forward with every adapter off, grouped-expert LoRA included, shared backbone or not.

peft's ``disable_adapter()`` only reaches peft tuner layers. MindSpeed-LLM's grouped-expert LoRA
(``LoraParallelGroupedMLP``) is not a peft layer and always adds ``scaling * (x @ A) @ B``; its forward reads
``self.scaling`` on every path (plain grouped GEMM, activation recompute, the all-to-all overlap function), so
setting it to ``0.0`` makes the LoRA term exactly zero without touching a parameter. With a trainable router
(``lora_router_trainable``) the router is swapped for its initial snapshot, so the reference stays the initial
policy when the backbone is shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from mindspeed_rl_r3.lora.merge import is_grouped_lora_experts
from mindspeed_rl_r3.lora.names import model_chunks
from mindspeed_rl_r3.lora.router import initial_router_weights


@dataclass(frozen=True)
class DisabledAdapters:
    """What :func:`adapters_disabled` switched off."""

    peft_layers: int
    grouped_experts: int
    routers: int


def _is_peft_tuner(module: Any) -> bool:
    return callable(getattr(module, "enable_adapters", None)) and hasattr(module, "disable_adapters")


@contextmanager
def adapters_disabled(model: Any, initial_router: bool = True) -> Iterator[DisabledAdapters]:
    """For the block, ``model`` (a module or list of chunks, any wrappers) computes the base model.

    peft tuner layers are disabled through their own ``enable_adapters(False)`` (as ``PeftModel.disable_adapter``
    does; the LoRA tensors' ``requires_grad`` is restored on exit), grouped LoRA experts get ``scaling = 0.0``, and
    with ``initial_router`` routers that have a snapshot compute with it. Everything is restored on exit, also after
    an exception. Raises if a peft layer has merged adapters (its disabled forward would unmerge them in place).
    """
    peft_layers: dict[int, Any] = {}
    grouped: dict[int, Any] = {}
    for chunk in model_chunks(model):
        for name, module in chunk.named_modules():
            if _is_peft_tuner(module):
                if getattr(module, "merged", False):
                    raise RuntimeError(
                        f"{name}: adapters are merged into the base weight; unmerge before the reference"
                    )
                peft_layers[id(module)] = module
            elif is_grouped_lora_experts(module):
                grouped[id(module)] = module
    saved_peft = [(m, m.disable_adapters, {p: p.requires_grad for p in m.parameters()}) for m in peft_layers.values()]
    saved_scaling = [(m, m.scaling) for m in grouped.values()]
    try:
        for module, _, _ in saved_peft:
            module.enable_adapters(False)
        for module, _ in saved_scaling:
            module.scaling = 0.0
        with initial_router_weights(model) if initial_router else nullcontext(0) as routers:
            yield DisabledAdapters(len(saved_peft), len(saved_scaling), routers)
    finally:
        for module, was_disabled, grads in saved_peft:
            module.enable_adapters(not was_disabled)
            for param, requires_grad in grads.items():
                param.requires_grad_(requires_grad)
        for module, scaling in saved_scaling:
            module.scaling = scaling


def lora_contribution_is_off(model: Any) -> bool:
    """True if every peft layer is disabled and every grouped LoRA expert has ``scaling == 0``."""
    for chunk in model_chunks(model):
        for module in chunk.modules():
            if _is_peft_tuner(module) and not module.disable_adapters:
                return False
            if is_grouped_lora_experts(module) and module.scaling != 0:
                return False
    return True
