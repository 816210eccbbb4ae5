"""Routing replay in MindSpeed-RL's training engine: one pass per ``_forward_backward_batch``, one queue entry per
micro-batch, train / rollout log-prob mismatch from the loss.

- ``BaseTrainingEngine._forward_backward_batch(batch, forward_only)`` is the pass of every stage: the actor's
  old-log-prob forward (``forward_only``), each update mini-batch, the reference forward (``role == "reference"``).
  The wrapper binds the model's routers to a :class:`RouterReplayState` (once, by global layer number), opens the
  pass with the stage's :class:`RouterAction` (:func:`action_for`), closes it (exactly-once consumption, alignment
  alarm) and records the replay agreement.
- ``BaseTrainingEngine._get_forward_batch_info(batch_iter)`` runs once per micro-batch right before the model call,
  on every pipeline stage. The wrapper takes the micro-batch's ``routed_experts`` rows (split with the batch, by
  fixed or dynamic batch size, like every other key), checks each trace against the sample's lengths and tokens,
  lays it out in the order this rank's routers see the tokens (padding, remove-padding packing, CP chunks, SP / TP
  gather: :func:`layout_micro_batch`) and queues it.
- ``BaseLossFunc.compute_log_probs`` returns the training log-probs of the response tokens; where the batch carries
  ``rollout_log_probs`` the wrapper records the mismatch (k3 KL, extreme-token fraction, mean / max ``|dlogp|``).
- ``BaseWorker.setup_distributed_rank`` runs ``initialize_megatron`` (which installs every MindSpeed / MindSpeed-LLM
  patch) before the model is built; right after it the router replay wrappers are registered through MindSpeed's
  patch manager (plain megatron-core without MindSpeed: installed directly).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.integration.feed import micro_batch_traces, parse_noop_layers, spec_from_megatron
from mindspeed_rl_r3.integration.metrics import alignment_entries, mismatch_entries
from mindspeed_rl_r3.integration.runtime import IntegrationRuntime, active
from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.patches.mindspeed_rl_aqn import actor_noise
from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget
from mindspeed_rl_r3.replay.state import RouterAction, RouterReplayState, action_for
from mindspeed_rl_r3.routing.layout import RouterTokenLayout, layout_micro_batch
from mindspeed_rl_r3.routing.stages import moe_layers_on_stage
from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError

ENGINE_MODULE = "mindspeed_rl.models.base.base_training_engine"
LOSS_MODULE = "mindspeed_rl.models.loss.base_loss_func"
WORKER_MODULE = "mindspeed_rl.workers.base_worker"
RL_VERSIONS = (pins.MINDSPEED_RL,)
TARGETS = (
    PatchTarget(
        f"{ENGINE_MODULE}.BaseTrainingEngine._forward_backward_batch", RL_VERSIONS, ("self", "batch", "forward_only")
    ),
    PatchTarget(f"{ENGINE_MODULE}.BaseTrainingEngine._get_forward_batch_info", RL_VERSIONS, ("self", "batch_iter")),
    PatchTarget(f"{ENGINE_MODULE}.BaseTrainingEngine._split_batches_with_dynamic_bsz", RL_VERSIONS, ("batch",)),
    PatchTarget(f"{LOSS_MODULE}.BaseLossFunc.compute_log_probs", RL_VERSIONS, ("self", "output", "batch")),
    PatchTarget(f"{WORKER_MODULE}.BaseWorker.setup_distributed_rank", RL_VERSIONS, ("self",)),
    PatchTarget("mindspeed_rl.utils.compute.get_parallel_state", RL_VERSIONS, ()),
)
PATCHES = PatchSet("__r3_mindspeed_rl_replay__")
REPLAY_STATE = "_r3_replay_state"  # attribute of the first Megatron model chunk
FEED = "_r3_micro_batch_feed"  # engine attribute while a replaying pass runs
SUPPORTED_CP_ALGOS = ("megatron_cp_algo", "ulysses_cp_algo")

_stage: str | None = None  # the stage whose pass runs now, for the loss-side mismatch
_temperature: float = 1.0  # the engine's sampling temperature in that pass (its logits arrive divided by it)


def stage_of(engine: Any, forward_only: bool) -> str | None:
    """``reference``, ``old_log_prob`` or ``update`` for one ``_forward_backward_batch`` call; ``None`` for engines
    that never replay (MindSpeed-RL's reward model and critic are ``BaseTrainingEngine`` too: roles ``reward`` /
    ``critic``), which run exactly as upstream."""
    role = getattr(engine, "role", None)
    if role == "reference":
        return "reference"
    if role != "actor":
        return None
    return "old_log_prob" if forward_only else "update"


def _parallel_state() -> Any:
    from mindspeed_rl.utils.compute import get_parallel_state

    state = get_parallel_state()
    if state is None:
        raise RoutingError("mindspeed_rl.utils.compute has no parallel state yet (set by setup_distributed_rank)")
    return state


def router_layout(config: Any, parallel_state: Any, remove_padding: bool) -> RouterTokenLayout:
    """The token order this rank's routers see, from the worker's Megatron config and parallel state."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    algo = getattr(config, "context_parallel_algo", "megatron_cp_algo") or "megatron_cp_algo"
    if cp > 1:
        if algo not in SUPPORTED_CP_ALGOS:
            raise RoutingError(f"context_parallel_algo {algo!r}: routing replay supports {SUPPORTED_CP_ALGOS}")
        reset = bool(getattr(config, "reset_attention_mask", False))
        causal = getattr(config, "attention_mask_type", "causal") == "causal"
        if algo == "megatron_cp_algo" and remove_padding and not (reset and causal):
            raise RoutingError(
                "megatron_cp_algo with use_remove_padding splits each packed sample for CP only with "
                "reset_attention_mask: true and attention_mask_type: causal; routing replay needs that layout"
            )
        if algo == "megatron_cp_algo" and not remove_padding and reset:
            raise RoutingError(
                "megatron_cp_algo with reset_attention_mask but without use_remove_padding splits rows by stale "
                "sequence lengths; routing replay does not support that layout"
            )
    elif algo != "megatron_cp_algo":
        algo = "ulysses_cp_algo"  # without CP the engine packs samples to 2*tp only for megatron_cp_algo, else to tp
    return RouterTokenLayout(
        tp_size=tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        cp_size=cp,
        cp_rank=parallel_state.get_context_parallel_rank() if cp > 1 else 0,
        cp_algo=algo,
        sequence_parallel=bool(getattr(config, "sequence_parallel", False)),
        router_gathers_tp=getattr(config, "moe_token_dispatcher_type", None) == "alltoall_seq" and tp > 1,
        remove_padding=remove_padding,
    )


def training_spec(config: Any) -> MoEModelSpec:
    """The routing spec of the Megatron model the worker trains (HF layer numbering)."""
    for name in ("num_layers", "num_experts", "moe_router_topk"):
        if getattr(config, name, None) is None:
            raise RoutingError(f"routing replay needs megatron_training.{name}; it is not set")
    return spec_from_megatron(
        int(config.num_layers),
        int(config.num_experts),
        int(config.moe_router_topk),
        noop_layers=parse_noop_layers(getattr(config, "noop_layers", None)),
        moe_layer_freq=getattr(config, "moe_layer_freq", 1) or 1,
        first_k_dense_replace=getattr(config, "first_k_dense_replace", None),
    )


@dataclass
class MicroBatchFeed:
    """What one pass needs to queue each micro-batch's replay ids."""

    state: RouterReplayState
    layout: RouterTokenLayout
    spec: MoEModelSpec
    trace_layers: list[int]
    layer_numbers: list[int]

    def load(self, batch: dict[str, Any]) -> None:
        column = batch.pop(ROUTED_EXPERTS, None)
        if column is None:
            raise RoutingError(
                "this pass replays routing but the micro-batch has no routed_experts column; the dispatch did not "
                "fetch it (is the mindspeed_rl_r3 dispatch patch installed in this worker?)"
            )
        traces = micro_batch_traces(
            column, batch["prompt_length"], batch["response_length"], spec=self.spec, input_ids=batch["input_ids"]
        )
        seq_lens = (batch["prompt_length"] + batch["response_length"]).reshape(-1).cpu()
        padded = None if self.layout.remove_padding else int(batch["input_ids"].shape[1])
        replay = layout_micro_batch(
            traces,
            seq_lens,
            self.layout,
            layers=self.trace_layers,
            layer_numbers=self.layer_numbers,
            padded_len=padded,
        )
        self.state.load(replay)


def replay_state(engine: Any, runtime: IntegrationRuntime) -> RouterReplayState:
    """The model's replay state, binding its routers the first time (one state per Megatron model)."""
    chunks = list(engine.model)
    if len(chunks) != 1:
        raise RoutingError(
            f"routing replay supports one model chunk per rank; this model has {len(chunks)} (virtual pipeline "
            "parallelism): unset num_layers_per_virtual_pipeline_stage"
        )
    state = getattr(chunks[0], REPLAY_STATE, None)
    if state is None:
        from mindspeed_rl_r3.patches import megatron_router

        device = next(chunks[0].parameters()).device
        state = RouterReplayState(runtime.config.r3.replay, device=device)
        register_router_replay()  # no-op when setup_distributed_rank registered them; routers look routing up per call
        megatron_router.bind_replay(chunks, state)
        setattr(chunks[0], REPLAY_STATE, state)
    return state


def _open_feed(engine: Any, runtime: IntegrationRuntime, state: RouterReplayState) -> MicroBatchFeed:
    config = engine.megatron_config
    spec = training_spec(config)
    trace_layers, numbers = moe_layers_on_stage(
        spec, state.layer_numbers, parse_noop_layers(getattr(config, "noop_layers", None))
    )
    if sorted(numbers) != sorted(state.layer_numbers):
        raise RoutingError(
            f"routers bound at layers {list(state.layer_numbers)} but the model spec puts MoE layers at "
            f"{numbers} on this stage (num_layers / noop_layers / moe_layer_freq mismatch)"
        )
    layout = router_layout(config, _parallel_state(), bool(getattr(engine, "use_remove_padding", False)))
    return MicroBatchFeed(state, layout, spec, trace_layers, numbers)


@contextmanager
def _stage_context(stage: str, temperature: float) -> Iterator[None]:
    global _stage, _temperature
    previous, _stage, _temperature = (_stage, _temperature), stage, temperature
    try:
        yield
    finally:
        _stage, _temperature = previous


def forward_backward_batch_replay_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def _forward_backward_batch(self: Any, batch: Any, forward_only: bool = False) -> Any:
        runtime = active()
        stage = None if runtime is None else stage_of(self, forward_only)
        if stage is None:
            return fn(self, batch, forward_only)
        action = action_for(runtime.config.r3.replay, stage)
        noise = actor_noise(self.model)
        quiet = noise.disabled() if noise is not None and stage == "reference" else contextlib.nullcontext()
        with _stage_context(stage, float(getattr(self, "temperature", 1.0) or 1.0)), quiet:
            if action is RouterAction.NATIVE:
                return fn(self, batch, forward_only)
            state = replay_state(self, runtime)
            feed = _open_feed(self, runtime, state)
            state.begin_pass(action)
            setattr(self, FEED, feed)
            try:
                out = fn(self, batch, forward_only)
            except BaseException:
                with contextlib.suppress(RoutingError):
                    state.end_pass()  # close the pass; the original error is the one to report
                raise
            finally:
                setattr(self, FEED, None)
            runtime.add_metrics(alignment_entries(stage, state.end_pass()))
            return out

    return _forward_backward_batch


def get_forward_batch_info_replay_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def _get_forward_batch_info(self: Any, batch_iter: Any) -> Any:
        feed = getattr(self, FEED, None)
        if feed is None:
            return fn(self, batch_iter)
        batch = next(batch_iter)
        feed.load(batch)
        return fn(self, iter([batch]))

    return _get_forward_batch_info


def compute_log_probs_mismatch_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def compute_log_probs(self: Any, output: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        result = fn(self, output, batch, *args, **kwargs)
        runtime = active()
        if runtime is None or _stage not in ("old_log_prob", "update") or ROLLOUT_LOG_PROBS not in batch:
            return result
        train = result[0].detach().float()
        if _temperature != 1.0:
            # vLLM reports raw log-probs (its logprobs_mode "raw_logprobs": before temperature); the engine hands
            # the loss logits divided by the temperature. Compare like with like: the same upstream computation on
            # the undivided logits (a logits-sized copy, for the metric only).
            with torch.no_grad():
                train = fn(self, output.detach() * _temperature, batch, *args, **kwargs)[0].float()
        rollout = batch[ROLLOUT_LOG_PROBS].to(train.device).float()
        width = min(train.shape[-1], rollout.shape[-1])
        lengths = batch["response_length"].reshape(-1, 1).to(train.device)
        mask = torch.arange(width, device=train.device).unsqueeze(0) < lengths
        runtime.add_metrics(mismatch_entries(_stage, train[:, :width], rollout[:, :width], mask))
        return result

    return compute_log_probs


def register_router_replay() -> list[str]:
    """Register the router wrappers after MindSpeed-LLM's patches (or install them on plain megatron-core).

    Nothing to do where ``TopKRouter.routing`` already carries them (a second worker role in the same process).
    """
    from mindspeed_rl_r3.patches import megatron_router

    if megatron_router.is_wrapped(megatron_router._router_routing()):
        return []
    try:
        importlib.import_module("mindspeed.patch_utils")
    except ImportError:
        return megatron_router.apply()
    from mindspeed_rl_r3.patches import mindspeed_llm_router

    return mindspeed_llm_router.apply()


def setup_distributed_rank_router_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def setup_distributed_rank(self: Any) -> Any:
        out = fn(self)  # initialize_megatron: MindSpeed-LLM has registered and applied its patches now
        runtime = active()
        if runtime is not None and runtime.config.r3.enabled:
            register_router_replay()
        return out

    return setup_distributed_rank


def patch_engine_module(module: ModuleType) -> list[str]:
    cls = module.BaseTrainingEngine
    done = [
        PATCHES.wrap(cls, "_forward_backward_batch", forward_backward_batch_replay_wrapper),
        PATCHES.wrap(cls, "_get_forward_batch_info", get_forward_batch_info_replay_wrapper),
    ]
    return [p for p in done if p]


def patch_loss_module(module: ModuleType) -> list[str]:
    done = PATCHES.wrap(module.BaseLossFunc, "compute_log_probs", compute_log_probs_mismatch_wrapper)
    return [done] if done else []


def patch_worker_module(module: ModuleType) -> list[str]:
    done = PATCHES.wrap(module.BaseWorker, "setup_distributed_rank", setup_distributed_rank_router_wrapper)
    return [done] if done else []


MODULE_PATCHES = {
    ENGINE_MODULE: patch_engine_module,
    LOSS_MODULE: patch_loss_module,
    WORKER_MODULE: patch_worker_module,
}


def apply() -> list[str]:
    return [p for name, patch in MODULE_PATCHES.items() for p in patch(importlib.import_module(name))]


def undo() -> list[str]:
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    return [t.check(None) for t in TARGETS]
