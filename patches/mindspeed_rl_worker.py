"""MindSpeed-RL's actor worker: which columns each stage fetches, what the rollout puts, when metrics are sent.

``BaseWorker.dispatch_transfer_dock_data`` receives the hard-coded column list of each stage
(``compute_log_prob``: ``input_ids, responses, response_length, prompt_length``; ``update``: those plus
``advantages, old_log_prob, ref_log_prob``); the wrapper appends ours for the stage (see
:class:`~mindspeed_rl_r3.integration.settings.ColumnPlan`) and expands group-deduplicated routing payloads of the
dispatched batch into standalone ones. ``ActorHybridWorkerBase``:

- ``initialize``: refuses configurations the integration cannot serve (before anything is built), then attaches AQN
  noise to the built rollout engine and actor model;
- ``generate_sequences`` (the actor rollout): marks the engine so its generate call captures routing and keeps
  log-probs, refuses rollout paths without capture support (``async_engine``, multi-turn, multimodal);
- ``sync_generate_process``: keeps the dispatched batch at hand (partial rollout joins earlier segments from it);
- ``collect_transfer_dock_data``: adds ``routed_experts`` / ``rollout_log_probs`` to the rollout's put (ahead of
  MindSpeed-RL's columns, so they are in the TransferDock before ``input_ids`` marks the sample ready);
- ``compute_log_prob`` / ``update``: set the actor-noise step and send the stage's metrics to the TransferDock.

``generate_sequences``, ``compute_log_prob``, ``update`` and ``initialize`` are called by Ray, which binds an actor's
methods when it loads the actor class: these patches must be installed when the module is imported in the worker
(:mod:`mindspeed_rl_r3.autopatch`), not later.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import ray

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.config_rules import refusal_message, refusals
from mindspeed_rl_r3.integration.feed import expand_group_payloads
from mindspeed_rl_r3.integration.rollout_columns import PreviousSegments, previous_segments, rollout_columns
from mindspeed_rl_r3.integration.runtime import IntegrationRuntime, active
from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROLLOUT_STAGE, ROUTED_EXPERTS
from mindspeed_rl_r3.patches.mindspeed_rl_aqn import actor_noise, attach_noise
from mindspeed_rl_r3.patches.mindspeed_rl_rollout import ACTOR_ROLLOUT, take_last_rollout
from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget
from mindspeed_rl_r3.routing.trace import RoutingError

BASE_WORKER_MODULE = "mindspeed_rl.workers.base_worker"
ACTOR_MODULE = "mindspeed_rl.workers.actor_hybrid_worker"
REFERENCE_MODULE = "mindspeed_rl.workers.reference_worker"
RL_VERSIONS = (pins.MINDSPEED_RL,)
_ACTOR = f"{ACTOR_MODULE}.ActorHybridWorkerBase"
TARGETS = (
    PatchTarget(
        f"{BASE_WORKER_MODULE}.BaseWorker.dispatch_transfer_dock_data",
        RL_VERSIONS,
        (
            "self",
            "experience_consumer_stage",
            "experience_columns",
            "experience_count",
            "tp_size",
            "cp_size",
            "cp_algo",
            "use_vllm",
            "indexes",
            "get_n_samples",
            "enable_partial_rollout",
            "is_generate",
        ),
    ),
    PatchTarget(
        f"{BASE_WORKER_MODULE}.BaseWorker.collect_transfer_dock_data",
        RL_VERSIONS,
        ("self", "output", "index", "use_vllm", "is_generate", "sync"),
    ),
    PatchTarget(f"{_ACTOR}.initialize", RL_VERSIONS, ("self",)),
    PatchTarget(f"{_ACTOR}.generate_sequences", RL_VERSIONS, ("self",)),
    PatchTarget(
        f"{_ACTOR}.sync_generate_process",
        RL_VERSIONS,
        ("self", "batch_data", "experience_count", "index", "pad_token_id"),
    ),
    PatchTarget(f"{_ACTOR}.async_generate_process", RL_VERSIONS, ("self", "batch_data", "index", "pad_token_id")),
    PatchTarget(f"{_ACTOR}.compute_log_prob", RL_VERSIONS, ("self",)),
    PatchTarget(f"{_ACTOR}.update", RL_VERSIONS, ("self", "kl_ctrl", "skip_actor_log_prob")),
    PatchTarget(f"{REFERENCE_MODULE}.ReferenceWorkerBase.compute_ref_log_prob", RL_VERSIONS, ("self",)),
)
PATCHES = PatchSet("__r3_mindspeed_rl_worker__")
ROLLOUT_BATCH = "_r3_rollout_batch"  # worker attribute: the batch sync_generate_process is generating for


def _partial_rollout(worker: Any) -> bool:
    return int(getattr(worker.rl_config, "partial_rollout_max_split", 1) or 1) > 1


def refuse_unsupported(worker: Any, runtime: IntegrationRuntime) -> None:
    """Raise naming the setting for configurations the integration cannot serve."""
    problems = refusals(worker.rl_config, worker.megatron_config, worker.generate_config, runtime.config)
    if problems:
        raise RoutingError(refusal_message(problems))


def send_metrics(worker: Any, runtime: IntegrationRuntime) -> None:
    """Send this process's pending metrics to the TransferDock's metric dict (the trainer reduces them)."""
    entries = runtime.take_metrics()
    if entries:
        ray.get(worker.td.update_metrics.remote(value=entries, cumulate=True))


def dispatch_transfer_dock_data_columns_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def dispatch_transfer_dock_data(
        self: Any,
        experience_consumer_stage: str,
        experience_columns: list[str],
        experience_count: int,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        runtime = active()
        if runtime is None:
            return fn(self, experience_consumer_stage, experience_columns, experience_count, *args, **kwargs)
        extra = runtime.columns.consumer_columns(experience_consumer_stage, _partial_rollout(self))
        columns = list(experience_columns) + [c for c in extra if c not in experience_columns]
        batch, index = fn(self, experience_consumer_stage, columns, experience_count, *args, **kwargs)
        if batch and ROUTED_EXPERTS in batch and experience_consumer_stage != ROLLOUT_STAGE:
            column = batch[ROUTED_EXPERTS]
            expanded = expand_group_payloads(column)
            if expanded is not None:
                batch[ROUTED_EXPERTS] = expanded.to(column.device)
        return batch, index

    return dispatch_transfer_dock_data


def initialize_integration_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def initialize(self: Any) -> Any:
        runtime = active()
        if runtime is None:
            return fn(self)
        refuse_unsupported(self, runtime)
        out = fn(self)
        attach_noise(self, runtime)
        return out

    return initialize


def generate_sequences_capture_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def generate_sequences(self: Any) -> Any:
        runtime = active()
        if runtime is None:
            return fn(self)
        engine = self.inference_model
        setattr(engine, ACTOR_ROLLOUT, True)
        try:
            out = fn(self)
        finally:
            setattr(engine, ACTOR_ROLLOUT, False)
            take_last_rollout(engine)  # never leak a generation into a later put
        send_metrics(self, runtime)
        return out

    return generate_sequences


def sync_generate_process_batch_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def sync_generate_process(self: Any, batch_data: Any, experience_count: int, index: Any, pad_token_id: int):
        if active() is None:
            return fn(self, batch_data, experience_count, index, pad_token_id)
        setattr(self, ROLLOUT_BATCH, batch_data)
        try:
            return fn(self, batch_data, experience_count, index, pad_token_id)
        finally:
            setattr(self, ROLLOUT_BATCH, None)

    return sync_generate_process


def _previous(worker: Any, count: int) -> list[PreviousSegments] | None:
    if not _partial_rollout(worker):
        return None
    batch = getattr(worker, ROLLOUT_BATCH, None)
    if batch is None:
        raise RoutingError("partial rollout put without its dispatched batch (only sync_generate_process is supported)")
    lengths = batch["response_length"].reshape(-1).tolist()
    routing, log_probs = batch.get(ROUTED_EXPERTS), batch.get(ROLLOUT_LOG_PROBS)
    return [
        previous_segments(
            None if routing is None else routing[i],
            None if log_probs is None else log_probs[i],
            int(lengths[i]),
            i,
        )
        for i in range(count)
    ]


def collect_transfer_dock_data_columns_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def collect_transfer_dock_data(
        self: Any, output: Any, index: Any, use_vllm: bool = False, is_generate: bool = False, sync: bool = False
    ) -> Any:
        runtime = active()
        engine = getattr(self, "inference_model", None)
        rollout = take_last_rollout(engine) if runtime is not None and is_generate and engine is not None else None
        if rollout is None:
            return fn(self, output, index, use_vllm, is_generate, sync)
        partial = _partial_rollout(self)
        extra = rollout_columns(
            rollout.samples,
            output["input_ids"],
            output["responses"],
            routed_experts=runtime.columns.routed_experts,
            group_size=1 if partial else rollout.n,
            group_dedupe=runtime.config.r3.group_dedupe and not partial,
            previous=_previous(self, len(rollout.samples)),
        )
        return fn(self, {**extra, **output}, index, use_vllm, is_generate, sync)

    return collect_transfer_dock_data


def stage_metrics_wrapper(fn: Any) -> Any:
    """``compute_log_prob`` / ``update``: the actor noise of this step, then the stage's metrics to the dock."""

    @functools.wraps(fn)
    def stage(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = active()
        if runtime is None:
            return fn(self, *args, **kwargs)
        noise = actor_noise(self.model)
        if noise is not None:
            noise.set_step(int(self.iteration))
        out = fn(self, *args, **kwargs)
        send_metrics(self, runtime)
        return out

    return stage


def reference_metrics_wrapper(fn: Any) -> Any:
    """A separate ``ReferenceWorker`` (no integrated worker) runs the reference pass in its own process: send the
    pass's replay metrics from there, as the actor's stages do."""

    @functools.wraps(fn)
    def compute_ref_log_prob(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = fn(self, *args, **kwargs)
        runtime = active()
        if runtime is not None:
            send_metrics(self, runtime)
        return out

    return compute_ref_log_prob


def patch_reference_module(module: ModuleType) -> list[str]:
    done = PATCHES.wrap(module.ReferenceWorkerBase, "compute_ref_log_prob", reference_metrics_wrapper)
    return [done] if done else []


def patch_base_worker_module(module: ModuleType) -> list[str]:
    cls = module.BaseWorker
    done = [
        PATCHES.wrap(cls, "dispatch_transfer_dock_data", dispatch_transfer_dock_data_columns_wrapper),
        PATCHES.wrap(cls, "collect_transfer_dock_data", collect_transfer_dock_data_columns_wrapper),
    ]
    return [p for p in done if p]


def patch_actor_module(module: ModuleType) -> list[str]:
    cls = module.ActorHybridWorkerBase
    done = [
        PATCHES.wrap(cls, "initialize", initialize_integration_wrapper),
        PATCHES.wrap(cls, "generate_sequences", generate_sequences_capture_wrapper),
        PATCHES.wrap(cls, "sync_generate_process", sync_generate_process_batch_wrapper),
        PATCHES.wrap(cls, "compute_log_prob", stage_metrics_wrapper),
        PATCHES.wrap(cls, "update", stage_metrics_wrapper),
    ]
    return [p for p in done if p]


MODULE_PATCHES = {
    BASE_WORKER_MODULE: patch_base_worker_module,
    ACTOR_MODULE: patch_actor_module,
    REFERENCE_MODULE: patch_reference_module,
}


def apply() -> list[str]:
    return [p for name, patch in MODULE_PATCHES.items() for p in patch(importlib.import_module(name))]


def undo() -> list[str]:
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    return [t.check(None) for t in TARGETS]
