"""MindSpeed-RL's vLLM engine (``VLLMInferEngine.generate_sequences``): token prompts, routing capture, log-probs.

Since ``cb82020`` MindSpeed-RL decodes each prompt to text (``skip_special_tokens=True``) and lets vLLM tokenize it
again, which can drop chat special tokens: the rollout would route other tokens than the ``input_ids`` training
sees. The replacement sends the token ids themselves (a ``TokensPrompt``: ``{"prompt_token_ids": ids}``), as
MindSpeed-RL 2.3.0 did; multimodal prompts keep the upstream path.

During an actor rollout (the worker's ``generate_sequences`` marks the engine) it records routing through
:mod:`mindspeed_rl_r3.patches.vllm_ascend_capture` (``r3.mode: R3``) and keeps vLLM's log-probs of the sampled
tokens, which MindSpeed-RL drops, as ``engine._r3_last_rollout`` for the worker to put into the TransferDock. Any
other generate call (validation, chat) records nothing and runs on clean weights: AQN noise is taken off first.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.integration.env import loaded_cpu_backend
from mindspeed_rl_r3.integration.rollout_columns import GeneratedSample, completion_log_probs, runner_request_id
from mindspeed_rl_r3.integration.runtime import IntegrationRuntime, active
from mindspeed_rl_r3.patches import vllm_ascend_capture
from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget
from mindspeed_rl_r3.routing.capture import RoutingRecorder
from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError

ENGINE_MODULE = "mindspeed_rl.models.rollout.vllm_engine"
RL_VERSIONS = (pins.MINDSPEED_RL,)
TARGETS = (
    PatchTarget(f"{ENGINE_MODULE}.VLLMInferEngine.__init__", RL_VERSIONS, ("self", "tokenizer_name_or_path")),
    PatchTarget(f"{ENGINE_MODULE}.VLLMInferEngine.generate_sequences", RL_VERSIONS, ("self", "idx_list")),
    PatchTarget(f"{ENGINE_MODULE}.VLLMInferEngine._post_process_outputs", RL_VERSIONS, ("self", "request_outputs")),
    PatchTarget(f"{ENGINE_MODULE}.VLLMInferEngine.update_sampling_params", RL_VERSIONS, ("self",)),
    PatchTarget(f"{ENGINE_MODULE}.VLLMInferEngine.init_cache_engine", RL_VERSIONS, ("self",)),
    PatchTarget(f"{ENGINE_MODULE}.VLLMInferEngine.free_cache_engine", RL_VERSIONS, ("self",)),
)
PATCHES = PatchSet("__r3_mindspeed_rl_rollout__")

ACTOR_ROLLOUT = "_r3_actor_rollout"  # engine attribute: True while the worker's actor rollout runs
LAST_ROLLOUT = "_r3_last_rollout"  # engine attribute: the GeneratedRollout of the last actor generate call
ROLLOUT_NOISE = "_r3_rollout_noise"  # engine attribute: its RolloutNoise, taken off for non-actor generates
_capture_installed: set[str] = set()


@dataclass
class GeneratedRollout:
    """One actor generate call: ``samples[i * n + j]`` is completion ``j`` of prompt ``i``, MindSpeed-RL's order."""

    samples: list[GeneratedSample]
    n: int


def _is_multimodal() -> bool:
    try:
        from mindspeed_rl.utils.utils import is_multimodal
    except ImportError:
        return False
    return bool(is_multimodal())


def _kv_slots(engine: Any) -> tuple[int, int]:
    """``(num_slots, block_size)`` of the KV cache that ``init_cache_engine`` just allocated."""
    llm_engine = engine.llm.llm_engine
    cache = llm_engine.vllm_config.cache_config
    blocks = None
    core = getattr(getattr(llm_engine, "engine_core", None), "engine_core", None)
    configs = getattr(core, "kv_cache_configs", None)
    if configs:
        blocks = getattr(configs[0], "num_blocks", None)
    blocks = blocks or getattr(cache, "num_gpu_blocks", None)
    if not blocks:
        raise RoutingError("routing capture cannot size its slot store: the vLLM KV cache reports no block count")
    return int(blocks) * int(cache.block_size), int(cache.block_size)


def install_capture(runtime: IntegrationRuntime) -> bool:
    """Install capture for the configured vllm-ascend line (once); ``True`` if this call installed it."""
    version = runtime.config.r3.vllm_ascend
    if version == "native":
        raise RoutingError(
            "r3.vllm_ascend 'native' (CompletionOutput.routed_experts) needs vllm-ascend >= 0.15; MindSpeed-RL "
            "05a90d77 pins v0.11.0-dev: use r3.vllm_ascend '0.11.0'"
        )
    if version in _capture_installed:
        return False
    if loaded_cpu_backend() is not None:  # the engine is vLLM's own CPU FusedMoE / model runner, not vllm-ascend's
        from mindspeed_rl_r3.patches import vllm_capture

        vllm_capture.apply()
    else:
        vllm_ascend_capture.apply(version)
    _capture_installed.add(version)
    return True


def engine_init_capture_wrapper(fn: Any) -> Any:
    """Wrap ``VLLMInferEngine.__init__``: with R3 capture, install it before vLLM exists, hence before any graph."""

    @functools.wraps(fn)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        runtime = active()
        if runtime is not None and runtime.columns.routed_experts:
            install_capture(runtime)
        fn(self, *args, **kwargs)

    return __init__


def start_capture(engine: Any, runtime: IntegrationRuntime) -> RoutingRecorder:
    """Make sure capture is installed and (re)start the recorder for this generate call."""
    if install_capture(runtime) and not engine.llm.llm_engine.vllm_config.model_config.enforce_eager:
        raise RoutingError(
            "routing capture was installed after the rollout engine was built in graph mode: its captured graphs "
            "run the MoE layers without the capture; build the engine with the package active (mindspeed_rl_r3 "
            "autopatch) or set generate_config.enforce_eager: true"
        )
    spec = MoEModelSpec.from_hf_config(engine.hf_config)
    num_slots, block_size = _kv_slots(engine)
    max_tokens = int(engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    shape = dict(
        max_tokens=max_tokens + vllm_ascend_capture.CAPTURE_SLACK_TOKENS,
        num_slots=num_slots,
        block_size=block_size,
        device=next(engine.model.parameters()).device,
    )
    session = vllm_ascend_capture.CaptureSession
    if session.fits(spec, **shape):
        session.recorder.reset()  # init_cache_engine re-allocated the KV cache and reset vLLM's prefix cache
    else:
        session.start(spec, **shape)  # a new slot store on the buffer reserved before graph capture
    session.enabled = True
    return session.recorder


def collect_generation(
    request_outputs: Sequence[Any], prompts: Sequence[Sequence[int]], n: int, recorder: RoutingRecorder | None
) -> GeneratedRollout:
    """Log-probs and (with ``recorder``) routing of every completion, in the order MindSpeed-RL stacks them."""
    if len(request_outputs) != len(prompts):
        raise RoutingError(f"vLLM returned {len(request_outputs)} request outputs for {len(prompts)} prompts")
    known_ids: set[str] = set()
    if recorder is not None:
        recorder.finish_all()
        known_ids = recorder.request_ids()
    samples = []
    for i, (request, prompt) in enumerate(zip(request_outputs, prompts, strict=True)):
        for completion in request.outputs:
            where = f"prompt {i} completion {completion.index}"
            token_ids = list(completion.token_ids)
            log_probs = completion_log_probs(token_ids, completion.logprobs, where)
            trace = None
            if recorder is not None:
                rid = runner_request_id(str(request.request_id), int(completion.index), n, known_ids)
                trace = recorder.pop_trace(rid, num_tokens=len(prompt) + len(token_ids), prompt_len=len(prompt))
            samples.append(GeneratedSample(trace, log_probs))
    return GeneratedRollout(samples, n)


def generate_sequences_token_prompts_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def generate_sequences(self: Any, idx_list: Any, **kwargs: Any) -> Any:
        runtime = active()
        if runtime is None or _is_multimodal():
            return fn(self, idx_list, **kwargs)
        actor_rollout = bool(getattr(self, ACTOR_ROLLOUT, False))
        noise = getattr(self, ROLLOUT_NOISE, None)
        if not actor_rollout and noise is not None:
            noise.restore()  # validation and other generates sample from the clean policy
        self.init_cache_engine()
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in idx_list]
        recorder = start_capture(self, runtime) if actor_rollout and runtime.columns.routed_experts else None
        # update_sampling_params restores the overridden values only after a clean exit (no try/finally upstream)
        saved = {k: getattr(self.sampling_params, k) for k in kwargs if hasattr(self.sampling_params, k)}
        try:
            with self.update_sampling_params(**kwargs):
                outputs = self.llm.generate(prompts=prompts, sampling_params=self.sampling_params, use_tqdm=False)
                if actor_rollout:
                    n = int(self.sampling_params.n)
                    setattr(self, LAST_ROLLOUT, collect_generation(outputs, idx_list, n, recorder))
                result = self._post_process_outputs(outputs)
        except BaseException:
            for key, value in saved.items():
                setattr(self.sampling_params, key, value)
            raise
        finally:
            vllm_ascend_capture.CaptureSession.enabled = False
        self.free_cache_engine()
        return result

    return generate_sequences


def patch_engine_module(module: ModuleType) -> list[str]:
    done = [
        PATCHES.wrap(module.VLLMInferEngine, "__init__", engine_init_capture_wrapper),
        PATCHES.wrap(module.VLLMInferEngine, "generate_sequences", generate_sequences_token_prompts_wrapper),
    ]
    return [path for path in done if path]


MODULE_PATCHES = {ENGINE_MODULE: patch_engine_module}


def apply() -> list[str]:
    return patch_engine_module(importlib.import_module(ENGINE_MODULE))


def undo() -> list[str]:
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    return [t.check(None) for t in TARGETS]


def take_last_rollout(engine: Any) -> GeneratedRollout | None:
    rollout = getattr(engine, LAST_ROLLOUT, None)
    if rollout is not None:
        setattr(engine, LAST_ROLLOUT, None)
    return rollout
