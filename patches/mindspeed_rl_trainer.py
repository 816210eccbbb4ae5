"""MindSpeed-RL's GRPO trainer (driver side of the job): the extra TransferDock columns and the metric reduction.

- ``RayGRPOTrainer.transfer_dock_init`` builds the TransferDock with ``addition_columns`` from the dataset's keys; the
  dock rejects ``put``/``get`` of any other column. The wrapper adds ``routed_experts`` and ``rollout_log_probs`` to
  the columns it builds with (TransferDock strategy ``td`` only).
- ``put_prompts_experience`` (bound by name in ``grpo_trainer_hybrid``): with partial rollout, a sample's columns are
  handed to the rollout again for every segment, so the prompt put fills ours with one-word placeholders.
- ``metrics_post_processing`` (bound by name there): resolves the encoded partial sums of our metrics before
  MindSpeed-RL averages every metric list (see :mod:`mindspeed_rl_r3.integration.metrics`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType
from typing import Any

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.integration.metrics import reduce_entries
from mindspeed_rl_r3.integration.rollout_columns import placeholder_log_probs, placeholder_routing
from mindspeed_rl_r3.integration.runtime import active
from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.patches.patch_set import PatchError, PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget

TRAINER_MODULE = "mindspeed_rl.trainer.grpo_trainer_hybrid"
RL_VERSIONS = (pins.MINDSPEED_RL,)
TARGETS = (
    PatchTarget(f"{TRAINER_MODULE}.RayGRPOTrainer.transfer_dock_init", RL_VERSIONS, ("self",)),
    PatchTarget(
        f"{TRAINER_MODULE}.put_prompts_experience",
        RL_VERSIONS,
        ("batch", "n_samples_per_prompt", "dataset_additional_keys", "indexes", "add_another_batch"),
    ),
    PatchTarget(f"{TRAINER_MODULE}.metrics_post_processing", RL_VERSIONS, ("metrics",)),
    PatchTarget(
        "mindspeed_rl.trainer.utils.data_strategy.DataStrategy.build_grpo",
        RL_VERSIONS,
        ("self", "prompts_num", "n_samples_per_prompt", "metrics", "max_age", "gbs_train", "addition_columns"),
    ),
)
PATCHES = PatchSet("__r3_mindspeed_rl_trainer__")
_partial_rollout = False  # set by transfer_dock_init: the trainer in this process generates in segments


def _with_columns(build: Any, columns: list[str]) -> Any:
    signature = inspect.signature(build)

    @functools.wraps(build)
    def build_grpo(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        existing = list(bound.arguments.get("addition_columns") or [])
        bound.arguments["addition_columns"] = existing + [c for c in columns if c not in existing]
        return build(*bound.args, **bound.kwargs)

    return build_grpo


def transfer_dock_init_columns_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def transfer_dock_init(self: Any) -> Any:
        global _partial_rollout
        runtime = active()
        if runtime is None:
            return fn(self)
        strategy = self.data_strategy
        if getattr(strategy, "strategy", "td") != "td":
            raise PatchError(
                f"rl_config.data_strategy {strategy.strategy!r}: the routed_experts / rollout_log_probs columns are "
                "added to the TransferDock (data_strategy: td) only"
            )
        _partial_rollout = bool(getattr(self, "enable_partial_rollout", False))
        strategy.build_grpo = _with_columns(strategy.build_grpo, runtime.columns.transfer_dock_columns())
        try:
            return fn(self)
        finally:
            del strategy.build_grpo  # the instance attribute; the class method is untouched

    return transfer_dock_init


def put_prompts_experience_placeholder_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def put_prompts_experience(
        batch: Any,
        n_samples_per_prompt: int,
        dataset_additional_keys: Any = None,
        indexes: Any = None,
        add_another_batch: bool = False,
    ) -> Any:
        runtime = active()
        if runtime is None or not _partial_rollout:
            return fn(batch, n_samples_per_prompt, dataset_additional_keys, indexes, add_another_batch)
        count = len(batch["prompts"])
        placeholders = {ROUTED_EXPERTS: placeholder_routing, ROLLOUT_LOG_PROBS: placeholder_log_probs}
        extra = {c: [placeholders[c]() for _ in range(count)] for c in runtime.columns.transfer_dock_columns()}
        keys = [*(dataset_additional_keys or []), *extra]
        return fn({**batch, **extra}, n_samples_per_prompt, keys, indexes, add_another_batch)

    return put_prompts_experience


def metrics_post_processing_reduce_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def metrics_post_processing(metrics: Any) -> Any:
        reduced, rest = reduce_entries(metrics.metric)
        if not reduced and len(rest) == len(metrics.metric):
            return fn(metrics)
        metrics.metric = rest
        result = fn(metrics)
        result.update(reduced)
        return result

    return metrics_post_processing


def patch_trainer_module(module: ModuleType) -> list[str]:
    """Install the trainer patches on an imported ``grpo_trainer_hybrid`` module (idempotent)."""
    done = [
        PATCHES.wrap(module.RayGRPOTrainer, "transfer_dock_init", transfer_dock_init_columns_wrapper),
        PATCHES.wrap(module, "put_prompts_experience", put_prompts_experience_placeholder_wrapper),
        PATCHES.wrap(module, "metrics_post_processing", metrics_post_processing_reduce_wrapper),
    ]
    return [p for p in done if p]


MODULE_PATCHES = {TRAINER_MODULE: patch_trainer_module}


def apply() -> list[str]:
    return patch_trainer_module(importlib.import_module(TRAINER_MODULE))


def undo() -> list[str]:
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    return [t.check(None) for t in TARGETS]
