"""Routing capture inside vllm-ascend's rollout worker (MindSpeed-RL's vLLM engine runs in-process).

Where the ids are taken, and why: *before* ``moe_comm_method.prepare()``. By the time ``select_experts`` runs inside
``quant_method.apply``, the rows are no longer this step's tokens: AllGather pads to ``max_tokens_across_dp`` and
gathers every DP rank, MC2 and All2All pad and keep only this TP rank's slice. Undoing that needs per-step DP
metadata, which is frozen into a captured ACL graph. Instead the wrapper of ``AscendFusedMoE.forward_impl`` calls
the same ``select_experts`` binding, with the layer's own routing arguments, on the unprepared router logits: one
extra top-k per layer, rows exactly the step's (padded) tokens, logical ids (EPLB's ``log2phy`` is applied later),
and only in-graph tensor ops plus the recorder's slice write, so it stays valid under ACL graph capture.

Step boundaries wrap ``NPUModelRunner.execute_model``: before it, requests the scheduler reports finished are read
out of the slot store (their blocks may be reused in this step); after it, the step's real tokens go to the store
at their KV slots. ``_dummy_run`` and profile runs never pass through ``execute_model``, so their routing is ignored.

Torchair graph mode uses a different MoE class and selector (``torchair_select_experts``); it is refused with a
clear error rather than silently recording nothing. vllm-ascend sequence parallelism (``sp_enabled``) splits the
step's tokens over TP ranks before the MoE layer and is refused too.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget
from mindspeed_rl_r3.routing.capture import RoutingRecorder, capture_buffer, record
from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError, RoutingTrace

RUNNER_MODULE = "vllm_ascend.worker.model_runner_v1"
SELECT_PARAMS = ("hidden_states", "router_logits", "top_k", "use_grouped_topk", "renormalize")
# Rows the capture buffer holds beyond the engine's token budget: graph / TP padding of a step's tokens.
CAPTURE_SLACK_TOKENS = 256


@dataclass(frozen=True)
class CaptureLayout:
    """Where one vllm-ascend line keeps its MoE layer, the pre-``prepare`` entry point and the selector binding."""

    name: str
    moe_class: str  # module.Class of the MoE layer
    entry: str  # method taking (self, hidden_states, router_logits, ...) before any DP/TP token exchange
    selector: str  # module.attribute of the select_experts binding the layer's apply uses

    @property
    def targets(self) -> tuple[PatchTarget, ...]:
        return (
            PatchTarget(self.selector, versions=(self.name,), parameters=SELECT_PARAMS),
            PatchTarget(f"{self.moe_class}.{self.entry}", versions=(self.name,), parameters=("self", "hidden_states")),
            PatchTarget(
                f"{RUNNER_MODULE}.NPUModelRunner.execute_model",
                versions=(self.name,),
                parameters=("self", "scheduler_output"),
            ),
            PatchTarget(f"{RUNNER_MODULE}.NPUModelRunner.capture_model", versions=(self.name,), parameters=("self",)),
        )


LAYOUTS = {
    # MindSpeed-RL master: vllm-ascend v0.11.0-dev (1b16c01).
    "0.11.0": CaptureLayout(
        "0.11.0",
        "vllm_ascend.ops.common_fused_moe.AscendFusedMoE",
        "forward_impl",
        "vllm_ascend.ops.common_fused_moe.select_experts",
    ),
    # MindSpeed-RL 2.3.0: vllm-ascend v0.9.1-dev (8c7bc45); MindSpeed-RL's own fused_moe module binds the selector
    # its replacement apply() calls.
    "0.9.1": CaptureLayout(
        "0.9.1",
        "vllm_ascend.ops.fused_moe.AscendFusedMoE",
        "forward",
        "mindspeed_rl.models.rollout.vllm_adapter.fused_moe.select_experts",
    ),
}
TARGETS = LAYOUTS["0.11.0"].targets
PATCHES = PatchSet("__r3_vllm_ascend_capture__")


class CaptureSession:
    """Process-global capture state of this rollout worker.

    ``buffer`` is the device buffer every MoE layer writes into. It is reserved once, before the engine captures
    its first graph, and kept at the same address for the engine's life: a captured graph replays its write into the
    tensor it saw at capture time, so a buffer replaced later would never see a graph-replayed step. ``recorder``
    (the host-side slot store, re-created when the KV cache is) reads steps from that buffer; ``enabled`` says
    whether steps are recorded (actor rollouts), decided per step on the host, outside any graph.
    """

    buffer: torch.Tensor | None = None
    spec: MoEModelSpec | None = None
    graphs_captured: bool = False  # the engine captured graphs around the current buffer: it may not change
    recorder: RoutingRecorder | None = None
    enabled: bool = False

    @classmethod
    def reserve(cls, spec: MoEModelSpec, *, max_tokens: int, device: Any) -> torch.Tensor:
        """The device buffer for ``spec`` and ``max_tokens`` rows a step: the current one where it serves, else a new
        one, which is refused once graphs were captured around the current buffer."""
        buffer = cls.buffer
        if cls._buffer_serves(spec, max_tokens=max_tokens, device=device):
            return buffer
        if cls.graphs_captured:
            raise RoutingError(
                f"the capture buffer ({tuple(buffer.shape)} on {buffer.device}) was reserved before the engine "
                f"captured its graphs and cannot serve {spec} with {max_tokens} tokens a step on {device}; a new "
                "buffer would be invisible to graph-replayed steps"
            )
        cls.spec, cls.buffer, cls.recorder = spec, capture_buffer(spec, max_tokens, device), None
        return cls.buffer

    @classmethod
    def _buffer_serves(cls, spec: MoEModelSpec, *, max_tokens: int, device: Any) -> bool:
        buffer = cls.buffer
        return (
            buffer is not None
            and cls.spec == spec
            and buffer.shape[1] >= max_tokens
            and buffer.device == torch.device(device)
        )

    @classmethod
    def start(cls, spec: MoEModelSpec, *, max_tokens: int, num_slots: int, block_size: int, device: Any) -> None:
        """A new slot store reading steps from the reserved buffer (reserved here if none serves yet)."""
        buffer = cls.reserve(spec, max_tokens=max_tokens, device=device)
        cls.recorder = RoutingRecorder(
            spec, max_tokens=max_tokens, num_slots=num_slots, block_size=block_size, buffer=buffer
        )
        cls.enabled = False

    @classmethod
    def fits(cls, spec: MoEModelSpec, *, max_tokens: int, num_slots: int, block_size: int, device: Any) -> bool:
        """Whether the current recorder can serve an engine of this shape (its slot store may then be kept)."""
        recorder = cls.recorder
        return (
            recorder is not None
            and recorder.buffer is cls.buffer
            and cls._buffer_serves(spec, max_tokens=max_tokens, device=device)
            and recorder.host.shape[0] == num_slots
            and recorder.block_size == block_size
        )

    @classmethod
    def trace_layer(cls, hf_layer_index: int) -> int:
        """Trace layer of a decoder-layer index, for the spec the buffer was reserved for."""
        moe_layers = list(cls.spec.moe_layers) if cls.spec else []
        if hf_layer_index not in moe_layers:
            raise RoutingError(f"decoder layer {hf_layer_index} has no router in this model (MoE layers {moe_layers})")
        return moe_layers.index(hf_layer_index)

    @classmethod
    def stop(cls) -> None:
        """Stop recording and drop the slot store; the buffer stays while captured graphs write into it."""
        cls.recorder, cls.enabled = None, False
        if not cls.graphs_captured:
            cls.buffer, cls.spec = None, None

    @classmethod
    def release(cls) -> None:
        """Drop everything, buffer included: the engine (and its graphs) is gone."""
        cls.buffer, cls.spec, cls.graphs_captured, cls.recorder, cls.enabled = None, None, False, None, False


def _layer_index(layer: Any) -> int:
    """Decoder-layer index from ``layer.layer_name`` ("model.layers.17.mlp.experts" -> 17)."""
    name = getattr(layer, "layer_name", None) or getattr(layer, "prefix", "")
    numbers = [int(part) for part in str(name).split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise RoutingError(f"cannot tell the decoder layer of MoE layer {name!r}; expected one integer in its name")
    return numbers[0]


def _routing_kwargs(layer: Any) -> dict[str, Any]:
    """The routing arguments ``AscendUnquantizedFusedMoEMethod.apply`` passes to ``select_experts``."""
    return dict(
        top_k=layer.top_k,
        use_grouped_topk=layer.use_grouped_topk,
        renormalize=layer.renormalize,
        topk_group=layer.topk_group,
        num_expert_group=layer.num_expert_group,
        custom_routing_function=layer.custom_routing_function,
        scoring_func=layer.scoring_func,
        e_score_correction_bias=layer.e_score_correction_bias,
        global_num_experts=layer.global_num_experts,
    )


def forward_impl_capture_wrapper(
    fn: Callable, selector: Callable[[], Callable], routing_owner: Callable[[Any], Any] = lambda layer: layer
) -> Callable:
    """Wrap ``forward_impl(self, hidden_states, router_logits)``: record top-k ids before ``prepare()``.

    ``routing_owner(self)`` is the object holding the routing attributes (``top_k``, ``renormalize``, ...): the layer
    itself, or in vLLM >= 0.2x the ``MoERunner``'s ``routed_experts``."""

    @functools.wraps(fn)
    def forward_impl(self, hidden_states, router_logits, *args, **kwargs):
        # Python here runs once per graph under graph capture: the only decision is whether a buffer is reserved,
        # which it is from before the first graph capture (capture_model_reserve_wrapper) for the engine's life.
        buffer = CaptureSession.buffer
        if buffer is not None:
            layer = getattr(self, "_r3_trace_layer", None)
            if layer is None:
                _refuse_sequence_parallel()
                layer = self._r3_trace_layer = CaptureSession.trace_layer(_layer_index(self))
            routing = _routing_kwargs(routing_owner(self))
            if kwargs.get("top_k"):  # v0.9.1 forward() may override the layer's top_k per call
                routing["top_k"] = kwargs["top_k"]
            _, topk_ids = selector()(hidden_states=hidden_states, router_logits=router_logits, **routing)
            record(buffer, layer, topk_ids)
        return fn(self, hidden_states, router_logits, *args, **kwargs)

    return forward_impl


def _slot_mapping_np(block_table: Any) -> Any:
    """The host (numpy) slot mapping of the step: vllm-ascend's ``BlockTable`` keeps it as ``slot_mapping_np``, vLLM
    0.11's as ``slot_mapping.np`` (a ``CpuGpuBuffer``)."""
    if hasattr(block_table, "slot_mapping_np"):
        return block_table.slot_mapping_np
    return block_table.slot_mapping.np


def _runner_step(runner: Any, scheduler_output: Any) -> tuple[int, torch.Tensor, dict[str, tuple[list[int], int]]]:
    """Real token count, CPU slot mapping and per-request (block ids, computed tokens) of the step just run."""
    total = int(scheduler_output.total_num_scheduled_tokens)
    block_table = runner.input_batch.block_table[0]
    slots = torch.from_numpy(_slot_mapping_np(block_table)[:total].copy())
    requests = {}
    for row, req_id in enumerate(runner.input_batch.req_ids):
        scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
        if not scheduled:
            continue
        computed = int(runner.input_batch.num_computed_tokens_cpu[row]) + int(scheduled)
        requests[req_id] = (list(runner.requests[req_id].block_ids[0]), computed)
    return total, slots, requests


def execute_model_capture_wrapper(fn: Callable) -> Callable:
    """Wrap ``NPUModelRunner.execute_model``: step boundaries for the recorder."""

    @functools.wraps(fn)
    def execute_model(self, scheduler_output, *args, **kwargs):
        recorder = CaptureSession.recorder
        if recorder is None or not CaptureSession.enabled:
            return fn(self, scheduler_output, *args, **kwargs)
        num_tokens = int(scheduler_output.total_num_scheduled_tokens)
        recorder.begin_step(getattr(scheduler_output, "finished_req_ids", ()) or (), num_tokens=num_tokens)
        output = fn(self, scheduler_output, *args, **kwargs)
        if num_tokens > 0:
            recorder.end_step(*_runner_step(self, scheduler_output))
        return output

    return execute_model


def runner_max_tokens(runner: Any) -> int:
    """Rows a step of ``runner`` can hand the MoE layers: its token budget, or its largest graph, plus TP slack."""
    sizes = getattr(runner.vllm_config.compilation_config, "cudagraph_capture_sizes", None) or [0]
    budget = int(runner.vllm_config.scheduler_config.max_num_batched_tokens)
    return max(budget, max(sizes)) + CAPTURE_SLACK_TOKENS


def capture_model_reserve_wrapper(fn: Callable) -> Callable:
    """Wrap the runner's ``capture_model``: reserve the buffer before the first graph is captured, then pin it.

    vllm-ascend captures its ACL graphs in ``compile_or_warm_up_model``, which MindSpeed-RL's first
    ``init_cache_engine`` runs; later calls replay the graphs captured then. The buffer the MoE layers write into
    must exist at that moment and stay the same tensor afterwards.
    """

    @functools.wraps(fn)
    def capture_model(self, *args, **kwargs):
        spec = MoEModelSpec.from_hf_config(self.vllm_config.model_config.hf_config)
        CaptureSession.reserve(spec, max_tokens=runner_max_tokens(self), device=self.device)
        out = fn(self, *args, **kwargs)
        CaptureSession.graphs_captured = True
        return out

    return capture_model


def _refuse_sequence_parallel() -> None:
    """vllm-ascend SP hands each TP rank a slice of the step's tokens before the MoE layer: not this step's rows."""
    try:
        from vllm.forward_context import get_forward_context

        sp = getattr(get_forward_context(), "sp_enabled", False)
    except (ImportError, AssertionError, AttributeError):
        return
    if sp:
        raise RoutingError("routing capture does not support vllm-ascend sequence parallelism (sp_enabled)")


def _refuse_unsupported() -> None:
    try:
        from vllm_ascend.ascend_config import get_ascend_config

        if get_ascend_config().torchair_graph_config.enabled:
            raise RoutingError(
                "routing capture does not support torchair graph mode (TorchairAscendFusedMoE selects experts with "
                "torchair_select_experts inside a compiled graph); set generate_config.torchair_graph: false"
            )
    except (ImportError, RuntimeError, AttributeError):
        pass  # no ascend config yet (before LLM init) or an older vllm-ascend without torchair


def _resolve(path: str) -> tuple[Any, str]:
    module, _, attr = path.rpartition(".")
    return importlib.import_module(module), attr


def apply(version: str = "0.11.0") -> list[str]:
    """Install capture for one vllm-ascend line (idempotent); raises naming any missing target."""
    if version not in LAYOUTS:
        raise RoutingError(f"no capture layout for vllm-ascend {version!r}; known: {sorted(LAYOUTS)}")
    layout = LAYOUTS[version]
    _refuse_unsupported()
    missing = [t.path for t in layout.targets if not t.check()["found"]]
    if missing:
        raise RoutingError(f"routing capture cannot attach, upstream targets not found: {missing}")
    moe_module, moe_class = _resolve(layout.moe_class)
    selector_module, selector_name = _resolve(layout.selector)
    runner = importlib.import_module(RUNNER_MODULE)
    selector = lambda: getattr(selector_module, selector_name)  # noqa: E731  (per call: later rebinding wins)
    owner = getattr(moe_module, moe_class)
    done = [
        PATCHES.wrap(owner, layout.entry, lambda f: forward_impl_capture_wrapper(f, selector)),
        PATCHES.wrap(runner.NPUModelRunner, "execute_model", execute_model_capture_wrapper),
        PATCHES.wrap(runner.NPUModelRunner, "capture_model", capture_model_reserve_wrapper),
    ]
    return [path for path in done if path]


def undo() -> list[str]:
    return PATCHES.undo()


def check(version: str = "0.11.0") -> list[dict[str, Any]]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        installed = installed_version("vllm_ascend")
    except PackageNotFoundError:
        installed = None
    return [t.check(installed) for t in LAYOUTS[version].targets]


def trace_from_native(
    routed_experts: Any,
    spec: MoEModelSpec,
    *,
    prompt_len: int | None = None,
    token_ids: Any = None,
) -> RoutingTrace:
    """Convert vLLM / vllm-ascend ``CompletionOutput.routed_experts`` (>= 0.15) into a trace.

    The native array is ``[num_tokens - 1, num_hidden_layers, topk]`` int32 over *all* decoder layers, with dense
    layers and unrecorded rows left at zero. Only the MoE layers are kept; a row whose k ids are all zero cannot be a
    real top-k choice (ids are distinct) and is marked missing. With top-1 routing that test is impossible, so zero
    rows are kept as expert 0.
    """
    ids = torch.as_tensor(routed_experts).to(torch.int64)
    if ids.dim() != 3 or ids.shape[2] != spec.topk or ids.shape[1] < spec.num_layers:
        raise RoutingError(
            f"native routed_experts has shape {tuple(ids.shape)}, expected [rows, {spec.num_layers} layers, "
            f"{spec.topk}]"
        )
    moe = ids[:, list(spec.moe_layers)]
    if spec.topk > 1:
        moe = torch.where((moe == 0).all(dim=-1, keepdim=True), torch.full_like(moe, -1), moe)
    layout = spec.layout_id
    return RoutingTrace.from_ids(moe, spec.num_experts, prompt_len=prompt_len, token_ids=token_ids, layout=layout)

