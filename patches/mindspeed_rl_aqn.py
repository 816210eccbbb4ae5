"""AQN in MindSpeed-RL: noise on the rollout weights right after each weight sync, optionally in the actor forward.

``MegatronShardingManager.enter_infer_mode`` ends with ``inference_engine.sync_model_weights``, which rebinds every
vLLM parameter to freshly resharded buffers (MindSpeed-RL runs it before each rollout, in ``generate_sequences`` or
the worker's ``enter_infer_mode``). The wrapper perturbs the targeted norms right after it, with the step the
worker reports (``ActorHybridWorkerBase.iteration``, the 0-based global step, resumed runs included) and
``megatron_training.train_iters`` as the schedule's length. The noise lives in the synced buffers only: the next
sync overwrites it, training weights and checkpoints never see it.

``aqn.apply_to: rollout+actor`` adds the same noise to the actor's old-log-prob and update forwards through hooks
(:class:`mindspeed_rl_r3.aqn.ActorNoise`); the reference forward runs without it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.aqn import ActorNoise, AQNConfig, RolloutNoise
from mindspeed_rl_r3.integration.metrics import aqn_entries
from mindspeed_rl_r3.integration.runtime import IntegrationRuntime, active
from mindspeed_rl_r3.patches.mindspeed_rl_rollout import ROLLOUT_NOISE
from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget

SHARDING_MODULE = "mindspeed_rl.workers.resharding.megatron_sharding_manager"
RL_VERSIONS = (pins.MINDSPEED_RL,)
TARGETS = (
    PatchTarget(f"{SHARDING_MODULE}.MegatronShardingManager.enter_infer_mode", RL_VERSIONS, ("self",)),
    PatchTarget(
        "mindspeed_rl.models.rollout.vllm_engine.VLLMInferEngine.sync_model_weights",
        RL_VERSIONS,
        ("self", "params", "load_format"),
    ),
)
PATCHES = PatchSet("__r3_mindspeed_rl_aqn__")
SHARDING_NOISE = "_r3_noise_binding"  # sharding manager attribute: RolloutNoiseBinding
ACTOR_NOISE = "_r3_actor_noise"  # attribute of the first Megatron model chunk: its ActorNoise


@dataclass
class RolloutNoiseBinding:
    """Built at the first weight sync: by then the vLLM weights live on the device (after ``initialize`` they are
    offloaded to CPU), which the fp32 mode's norm hooks and their check need."""

    engine: Any
    config: AQNConfig
    total_steps: int
    step: Callable[[], int]
    noise: RolloutNoise | None = None

    def apply(self) -> dict[str, float]:
        if self.noise is None:
            self.noise = RolloutNoise(self.engine.model, self.config, self.total_steps)
            setattr(self.engine, ROLLOUT_NOISE, self.noise)
        return self.noise.apply(self.step())


def _dtype(name: Any) -> torch.dtype | None:
    if isinstance(name, torch.dtype):
        return name
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "float32": torch.float32}.get(
        str(name)
    )


def attach_noise(worker: Any, runtime: IntegrationRuntime) -> list[str]:
    """Build the rollout (and actor) noise of an initialised actor worker; returns what was attached."""
    config = runtime.config.aqn
    if not config.enabled:
        return []
    total = int(worker.megatron_config.train_iters)
    binding = RolloutNoiseBinding(worker.inference_model, config, total, lambda: int(worker.iteration))
    setattr(worker.sharding_manager, SHARDING_NOISE, binding)
    attached = ["rollout noise (built at the first weight sync)"]
    if config.actor:
        chunks = list(worker.model)
        dtype = _dtype(getattr(worker.generate_config, "dtype", None))
        actor = ActorNoise(chunks[0], config, total, rollout_dtype=dtype)
        setattr(chunks[0], ACTOR_NOISE, actor)
        attached.append(f"actor noise on {len(actor.targets)} norms")
    return attached


def actor_noise(model_chunks: Any) -> ActorNoise | None:
    try:
        first = next(iter(model_chunks))
    except (TypeError, StopIteration):
        return None
    return getattr(first, ACTOR_NOISE, None)


def enter_infer_mode_noise_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def enter_infer_mode(self: Any) -> Any:
        out = fn(self)
        binding = getattr(self, SHARDING_NOISE, None)
        runtime = active()
        if binding is not None and runtime is not None:
            runtime.add_metrics(aqn_entries(binding.apply()))
        return out

    return enter_infer_mode


def patch_sharding_module(module: ModuleType) -> list[str]:
    done = PATCHES.wrap(module.MegatronShardingManager, "enter_infer_mode", enter_infer_mode_noise_wrapper)
    return [done] if done else []


MODULE_PATCHES = {SHARDING_MODULE: patch_sharding_module}


def apply() -> list[str]:
    return patch_sharding_module(importlib.import_module(SHARDING_MODULE))


def undo() -> list[str]:
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    return [t.check(None) for t in TARGETS]
