"""R3, AQN and the LoRA fixes in MindSpeed-RL's GRPO pipeline: which patch goes on which upstream module.

:data:`MODULE_PATCHES` maps each MindSpeed-RL module to the functions that patch it once it is imported. The import
hook of :mod:`mindspeed_rl_r3.autopatch` runs them as each module finishes importing, in every process (driver, the
Ray task running the trainer, every worker), which is what Ray needs: it binds an actor's remote methods when it
loads the actor class, so patches installed later never reach them. :func:`apply` patches whatever is importable
now (tests, doctor). Every patch is inert unless :func:`mindspeed_rl_r3.integration.runtime.activate` was called in
the process, so an installed patch changes nothing for a job without ``r3`` / ``aqn`` / ``lora_extras`` sections.

Modules: :mod:`.mindspeed_rl_trainer` (TransferDock columns, metric reduction), :mod:`.mindspeed_rl_worker`
(dispatch columns, rollout put, worker lifecycle), :mod:`.mindspeed_rl_rollout` (vLLM engine: token prompts,
capture, log-probs), :mod:`.mindspeed_rl_aqn` (noise after each weight sync), :mod:`.mindspeed_rl_replay` (training
engine, loss, router registration) and the LoRA sync fixes of :mod:`.mindspeed_rl_lora`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from mindspeed_rl_r3.integration.runtime import IntegrationRuntime, activate, active
from mindspeed_rl_r3.integration.settings import sections_from_environment
from mindspeed_rl_r3.patches import (
    mindspeed_rl_aqn,
    mindspeed_rl_replay,
    mindspeed_rl_rollout,
    mindspeed_rl_trainer,
    mindspeed_rl_worker,
)

LORA_MODULE = "mindspeed_rl.workers.integrated_worker"
PARTS = (mindspeed_rl_trainer, mindspeed_rl_worker, mindspeed_rl_rollout, mindspeed_rl_aqn, mindspeed_rl_replay)
TARGETS = tuple(t for part in PARTS for t in part.TARGETS)


def patch_lora(_module: ModuleType | None = None) -> list[str]:
    """MindSpeed-RL's LoRA sync and reference fixes (inert without ``lora_target_modules``), router per config."""
    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    runtime = active()
    if runtime is None:
        return []
    if importlib.util.find_spec("peft") is None:
        return []  # MindSpeed-LLM's LoRA imports peft: without it no job can configure LoRA
    return mindspeed_rl_lora.apply(router_trainable=runtime.config.lora_extras.lora_router_trainable)


def _merged() -> dict[str, list[Callable[[ModuleType], list[str]]]]:
    merged: dict[str, list[Callable[[ModuleType], list[str]]]] = {}
    for part in PARTS:
        for name, patch in part.MODULE_PATCHES.items():
            merged.setdefault(name, []).append(patch)
    merged.setdefault(LORA_MODULE, []).append(patch_lora)
    return merged


MODULE_PATCHES: Mapping[str, list[Callable[[ModuleType], list[str]]]] = _merged()


def patch_module(name: str, module: ModuleType) -> list[str]:
    """Run every patch registered for ``name`` on the imported ``module``, then refresh the method copies Ray's actor
    classes made before it (:mod:`mindspeed_rl_r3.patches.ray_actor_methods`)."""
    from mindspeed_rl_r3.patches import ray_actor_methods

    patched = [p for patch in MODULE_PATCHES.get(name, ()) for p in patch(module)]
    if patched:
        ray_actor_methods.refresh()
    return patched


def activate_from_environment() -> IntegrationRuntime | None:
    """Activate this process from the job's environment (see :mod:`mindspeed_rl_r3.integration.settings`)."""
    if active() is not None:
        return active()
    found = sections_from_environment()
    return None if found is None else activate(found[0])


def apply(modules: Iterable[str] | None = None) -> list[str]:
    """Import the given (default: all) upstream modules and patch them; returns the patched paths."""
    patched = []
    for name in modules if modules is not None else MODULE_PATCHES:
        patched += patch_module(name, importlib.import_module(name))
    return patched


def undo() -> list[str]:
    """Restore every original this module's parts (and the LoRA fixes) replaced."""
    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    return mindspeed_rl_lora.undo() + [p for part in reversed(PARTS) for p in part.undo()]


def check() -> list[dict[str, Any]]:
    return [t.check(None) for t in TARGETS]
