"""Run MindSpeed-RL's own modules on a machine without an Ascend NPU: the one place that stands in for the device.

Tests (and the CPU runs of MindSpeed-RL's flow) import the real MindSpeed-RL, MindSpeed, MindSpeed-LLM and vllm-ascend
sources. What cannot load on a CPU machine is replaced here, and nothing else:

- ``torch_npu`` (with ``torch_npu.contrib.transfer_to_npu``), ``torchair`` and ``acl``: catch-all modules. Every
  attribute is another catch-all kept on its parent (never put into ``sys.modules``: MindSpeed's patch loop scans
  every module there per patch, and self-registering children make it grow without bound); calling one with a single
  function or class returns it unchanged (decorators such as torchair's ``register_fx_node_ge_converter``), any other
  call returns a catch-all. They answer imports and module-level attribute reads; a device op actually called on a
  CPU path fails loudly (a catch-all is not a tensor).
- ``torch.npu``: the CPU as device 0 (``current_device`` / ``set_device`` / ``device_count`` / ``synchronize`` /
  ``empty_cache`` / memory counters), for MindSpeed-RL's worker setup and offload code.
- ``Tensor.npu``: identity (MindSpeed-RL's loss functions move masks with ``.npu()``).
- ``torch.tensor`` / ``zeros`` / ``ones`` with ``device='npu'`` or ``'cuda'``: on the CPU, as transfer_to_npu
  sends ``'cuda'`` to the NPU (MindSpeed-RL's seqlen_balancing / context_parallel, megatron-core's schedules).
- megatron-core's CUDA assumptions: :mod:`mindspeed_rl_r3.patches.megatron_cpu` (RNG trackers, ``current_device``,
  the bf16 optimizer's ``torch.cuda.*`` type names).
- ``torch.cuda`` streams (transfer_to_npu's redirection to ``torch.npu``); HCCL process groups created as gloo.
- Fix-ups run right after an upstream module is imported (``AFTER_IMPORT``), each answering one call of MindSpeed-RL's
  GRPO flow (``cli/train_grpo.py`` with ``mindspeed_rl_r3.train --cpu-backend``): ``initialize_megatron`` on one CPU
  "device"; MindSpeed's CANN ``reuse_data_ptr`` and ``npu_gmm``; vLLM's one-rank EP/DP groups at world size 1; the
  Megatron-to-vLLM weight load (``weight_loader_v2``); vLLM's CPU kernels reading live weights, the experts in
  vllm-ascend's layout (the one MindSpeed-RL's sync writes megatron's bytes in).
- Ray: :func:`ray_local_cluster` declares the "NPU" resource MindSpeed-RL's workers request; :func:`activate` (also
  at interpreter start with ``MINDSPEED_RL_R3_CPU_BACKEND=1`` after ``mindspeed-rl-r3 apply``) and
  :func:`fix_entry_script` let MindSpeed-RL's own ``cli/train_grpo.py`` run unchanged.

:func:`install` refuses when a real ``torch_npu`` is importable: on an NPU machine nothing here is ever active.
:func:`upstream_paths` returns the pinned upstream folders (``../shared/upstream`` beside a checkout, or
``MINDSPEED_RL_R3_UPSTREAM``) in the order they go on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STANDIN_ROOTS = ("torch_npu", "torchair", "acl")
MARK = "__mindspeed_rl_r3_standin__"  # attribute on every stand-in module
ENV_UPSTREAM = "MINDSPEED_RL_R3_UPSTREAM"
# Folders of the pinned upstream tree; MindSpeed-RL first (its ``cli`` / ``mindspeed_rl``), the rest appended.
UPSTREAM_FOLDERS = ("MindSpeed-RL", "vllm-ascend", "MindSpeed-LLM", "MindSpeed", "Megatron-LM")


class CpuBackendError(RuntimeError):
    """The CPU backend cannot be installed here (a real NPU stack is present, or the upstream tree is missing)."""


class AnyModule(types.ModuleType):
    """A module whose every attribute is another such module (see the module docstring)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__: list[str] = []
        setattr(self, MARK, True)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        child = AnyModule(f"{self.__name__}.{name}")
        object.__setattr__(self, name, child)  # kept on the parent, never in sys.modules
        return child

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], (types.FunctionType, type)):
            return args[0]  # a decorator: leave the function alone
        return AnyModule(f"{self.__name__}()")

    def __iter__(self) -> Any:
        return iter(())

    def __bool__(self) -> bool:
        return False  # feature probes such as ``if torch_npu.some_flag`` take the plain path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _standin_named, (self.__name__,)  # Ray pickles remote functions by value, globals included


def _standin_named(name: str) -> Any:
    """The stand-in called ``name`` in this process (which must run the backend: a Ray worker's setup hook)."""
    if name.endswith("()"):
        return AnyModule(name)
    root, *path = name.split(".")
    module = importlib.import_module(root)
    for part in path:
        module = getattr(module, part)
    return module


class _StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``import torch_npu[.x.y]`` / ``torchair`` / ``acl`` as :class:`AnyModule`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in STANDIN_ROOTS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return AnyModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        # MindSpeed's op_builder reads torch_npu.__file__ at import; nothing is ever loaded from it.
        module.__file__ = f"/nonexistent/{module.__name__.replace('.', '/')}/__init__.py"
        for name, op in _DEVICE_OPS.get(module.__name__, {}).items():
            setattr(module, name, op)


def _npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch_npu.npu_swiglu`` (MindSpeed's ``fused_swiglu``): silu(first half) * second half along ``dim``."""
    gate, up = x.chunk(2, dim=dim)
    return torch.nn.functional.silu(gate) * up


def _cpu_gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: Any, trans_b: bool = False, **_: Any) -> torch.Tensor:
    """Grouped GEMM (``gg.ops.gmm``; MindSpeed answers it with ``npu_gmm``): rows of ``a`` split by
    ``batch_sizes``, group ``i`` times ``b[i]``."""
    counts = [int(c) for c in torch.as_tensor(batch_sizes).tolist()]
    groups = [x @ (w.t() if trans_b else w) for x, w in zip(a.split(counts), b.unbind(0), strict=True)]
    return torch.cat(groups) if groups else a.new_zeros(0, b.shape[-2 if trans_b else -1])


def _npu_moe_gating_top_k_softmax(x: torch.Tensor, finished: Any = None, k: int = 1) -> tuple[torch.Tensor, ...]:
    """``torch_npu.npu_moe_gating_top_k_softmax`` (vllm-ascend's select_experts): softmax, then top-k;
    returns (weights in x's dtype, int32 expert ids, int32 row ids ``[T, k]`` = ``j * T + t``)."""
    weights, ids = torch.softmax(x.float(), dim=-1).topk(k, dim=-1)
    rows = torch.arange(k * x.shape[0], dtype=torch.int32).view(k, -1).t().contiguous()
    return weights.to(x.dtype), ids.to(torch.int32), rows


# Device ops with a CPU implementation, per stand-in module (everything else stays a catch-all).
_DEVICE_OPS: dict[str, dict[str, Callable[..., Any]]] = {
    "torch_npu": {"npu_swiglu": _npu_swiglu, "npu_moe_gating_top_k_softmax": _npu_moe_gating_top_k_softmax},
}


def _install_grouped_gemm() -> None:
    """megatron's ``grouped_gemm_util.ops`` (MindSpeed's GroupedMatmulFeature registers npu_gmm there)."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    if gg.ops is None:
        _set(gg, "ops", types.SimpleNamespace(gmm=_cpu_gmm))
        _set(gg, "grouped_gemm_is_available", lambda: True)
        _set(gg, "assert_grouped_gemm_is_available", lambda: None)


class _InertEvent:
    """A device event on a machine where every op has already finished."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _InertStream:
    """The CPU's single stream: waits and synchronisation are no-ops; all stand-in streams compare equal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _InertEvent:
        return event if event is not None else _InertEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _InertStream)

    def __hash__(self) -> int:
        return 0


class _NoGraph:
    """``torch.npu.NPUGraph``: a type to annotate with; capturing an ACL graph needs an NPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torch.npu.NPUGraph (ACL graph capture) cannot run on the CPU backend")


class _CpuNpu(types.ModuleType):
    """``torch.npu`` on a CPU machine: one device, index 0, that is the CPU."""

    def __init__(self) -> None:
        super().__init__("torch.npu")
        setattr(self, MARK, True)
        self._device = 0
        self.config = types.SimpleNamespace(allow_internal_format=False)  # model_runner_v1 sets it at import

    def is_available(self) -> bool:
        return False

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return self._device

    def set_device(self, device: Any) -> None:
        self._device = 0

    def synchronize(self, device: Any = None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def memory_allocated(self, device: Any = None) -> int:
        return 0

    def max_memory_allocated(self, device: Any = None) -> int:
        return 0

    def memory_reserved(self, device: Any = None) -> int:
        return 0

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        pass

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return 0, 0  # (free, total); NPUModelRunner.capture_model reports the graphs' memory from it

    def manual_seed(self, seed: int) -> None:
        pass

    def manual_seed_all(self, seed: int) -> None:
        pass

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return importlib.import_module, ("torch.npu",)

    # Streams and events: one inert CPU stream (vllm-ascend creates them at import and in layer constructors).
    Stream = _InertStream
    NPUGraph = _NoGraph  # vllm-ascend's acl_graph.py annotates with torch.npu.NPUGraph at import
    Event = _InertEvent
    ExternalEvent = _InertEvent  # vllm-ascend's acl_graph.py GraphParams annotation

    def current_stream(self, device: Any = None) -> _InertStream:
        return _InertStream()

    def stream(self, stream: Any = None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a fix-up on an upstream module right after it is imported (``AFTER_IMPORT``)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        fixup = AFTER_IMPORT.get(fullname)
        if fixup is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            real_exec(module)
            fixup(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


@contextlib.contextmanager
def _one_cpu_device() -> Any:
    """For MindSpeed-RL's ``_initialize_distributed``: it initialises megatron's model-parallel state only when
    ``torch.cuda.device_count() > 0`` and then selects the Ray "NPU" with ``torch.cuda.set_device``;
    ``_compile_dependencies`` (MindSpeed's) runs ``make`` on megatron's C++ dataset helpers, which the registry wheel
    does not ship and MindSpeed-RL's datasets never use."""
    from megatron.core.datasets import utils as dataset_utils

    saved = torch.cuda.device_count, torch.cuda.set_device, dataset_utils.compile_helpers
    torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda device: None)
    dataset_utils.compile_helpers = lambda: None
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device, dataset_utils.compile_helpers = saved


def _fix_train_grpo(module: types.ModuleType) -> None:
    """``cli/train_grpo.py``: its ``initialize_megatron`` (what every worker's ``setup_distributed_rank`` calls) with
    ``allow_no_cuda=True`` on one CPU "device"."""
    real = module.initialize_megatron

    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        with _one_cpu_device():
            return real(*args, **{**kwargs, "allow_no_cuda": True})

    initialize_megatron.__wrapped__ = real  # type: ignore[attr-defined]
    module.initialize_megatron = initialize_megatron


def fix_entry_script(module: types.ModuleType | None) -> None:
    """MindSpeed-RL's ``cli/train_grpo.py`` run as a script (``__main__``): :func:`_fix_train_grpo` as for the
    imported ``cli.train_grpo``, before Ray pickles the script's ``train`` task (and with it, by value, the
    script's ``initialize_megatron``). The driver's hydra wrapper calls it with the task function's module."""
    entry = getattr(module, "initialize_megatron", None)
    script = Path(getattr(module, "__file__", "") or "").name
    if entry is not None and script == "train_grpo.py" and not hasattr(entry, "__wrapped__"):
        _fix_train_grpo(module)


def _reuse_data_ptr(dst: torch.Tensor, src: torch.Tensor, offset: int) -> None:
    """MindSpeed's CANN ``reuse_data_ptr(dst, src, offset)``: ``dst`` becomes a view of ``src``'s memory from
    element ``offset`` (in ``dst``'s dtype), as MindSpeed-RL's offloader re-points parameters at flat buffers."""
    flat = src.detach().reshape(-1)
    if flat.dtype != dst.dtype:
        flat = flat.view(dst.dtype)
    dst.data = flat[offset : offset + dst.numel()].view(dst.shape)


def _fix_algorithm_builder(module: types.ModuleType) -> None:
    """``AlgorithmOpBuilder().load()`` (MindSpeed-RL's ``MegatronOffLoader.__init__``) compiles a CANN extension: the
    CPU answer to its one op instead."""
    module.AlgorithmOpBuilder.load = lambda self, *a, **k: types.SimpleNamespace(reuse_data_ptr=_reuse_data_ptr)


def _fix_vllm_parallel_state(module: types.ModuleType) -> None:
    """MindSpeed-RL's world-size-1 ``initialize_model_parallel`` builds vLLM's TP and PP groups only; vLLM's own
    ``Qwen3MoeSparseMoeBlock`` (the CPU platform's model; vllm-ascend's NPU layers never ask) reads ``get_ep_group()``
    and ``get_dp_group()``, and ``get_dp_range_indexes(use_vllm=True)`` reads ``_TP_GROUP_RANKS``: one-rank ones."""
    real = module.initialize_model_parallel

    def initialize_model_parallel(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        from vllm.distributed import parallel_state as ps

        backend = torch.distributed.get_backend(ps.get_world_group().device_group)
        local_rank = ps.get_world_group().local_rank
        ranks = [list(range(torch.distributed.get_world_size()))]
        for name in ("_DP", "_EP"):
            if getattr(ps, name, None) is None:
                setattr(ps, name, ps.init_model_parallel_group(ranks, local_rank, backend, group_name=name[1:].lower()))
        if module._TP_GROUP_RANKS is None:
            module._TP_GROUP_RANKS = ranks

    module.initialize_model_parallel = initialize_model_parallel


def _fix_megatron_weight_loaders(module: types.ModuleType) -> None:
    """vLLM's CPU linear method binds ``weight_loader_v2``; MindSpeed-RL replaces ``weight_loader`` (the name
    vllm-ascend's NPU method binds) with its Megatron loader. (The loader's expert re-layout
    ``w.copy_(w.view(E, H, -1))`` is a same-shape self-copy, as on the device, once the CPU MoE holds vllm-ascend's
    layout: :func:`_fix_vllm_cpu_fused_moe`.)"""
    real_update = module.update_megatron_weight_loader

    def update_megatron_weight_loader() -> None:
        # vLLM's CPU linear method (UnquantizedLinearMethod) binds weight_loader_v2, vllm-ascend's NPU one the
        # weight_loader MindSpeed-RL replaces here: give both names the Megatron loader
        real_update()
        from vllm.model_executor.layers import linear

        for cls in vars(linear).values():
            if isinstance(cls, type) and issubclass(cls, linear.LinearBase) and "weight_loader_v2" in vars(cls):
                cls.weight_loader_v2 = cls.weight_loader

    module.update_megatron_weight_loader = update_megatron_weight_loader


def _live_cpu_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    """vLLM's ``dispatch_cpu_unquantized_gemm``: a plain linear on the live ``weight``, kept in place."""
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


def _fix_vllm_layer_utils(module: types.ModuleType) -> None:
    """vLLM's CPU linears pack a oneDNN copy of each weight at load and drop the parameter; MindSpeed-RL's weight sync
    re-points the parameters afterwards (vllm-ascend's layers read them at call time): read the live ones."""
    module.dispatch_cpu_unquantized_gemm = _live_cpu_linear


_ASCEND_MOE_LAYOUT = "_mindspeed_rl_r3_ascend_moe_layout"  # on a vLLM FusedMoE layer whose experts were transposed


def _fix_vllm_cpu_fused_moe(module: types.ModuleType) -> None:
    """vLLM's x86 fused MoE (IPEX ``GatedMLPMOE`` / SGL) packs the expert weights at load, so synced experts would be
    ignored; its plain ``CPUFusedMOE`` reads ``w13_weight`` / ``w2_weight`` at call time, as vllm-ascend's does.

    The layout is vllm-ascend's too: its ``AscendUnquantizedFusedMoEMethod.process_weights_after_loading`` stores
    ``w13_weight`` as ``[E, hidden, 2 * ffn]`` and ``w2_weight`` as ``[E, ffn, hidden]`` (vLLM's own are
    ``[E, 2 * ffn, hidden]`` / ``[E, hidden, ffn]``), which is megatron's GroupedMLP ``weight1.view(E, hidden, -1)`` /
    ``weight2.view(E, -1, hidden)``: MindSpeed-RL's weight buffers take the vLLM parameters' shapes and receive
    megatron's bytes unchanged. Built right after the load (in ``process_weights_after_loading``), the layer's
    experts are transposed once into that layout and read back transposed at call time."""
    plain = module.CPUFusedMOE
    if getattr(plain, MARK, False):
        return

    class AscendLayoutCPUFusedMOE(plain):  # type: ignore[misc, valid-type]
        def __init__(self, layer: torch.nn.Module) -> None:
            if not getattr(layer, _ASCEND_MOE_LAYOUT, False):
                for name in ("w13_weight", "w2_weight"):
                    weight = getattr(layer, name).data.transpose(1, 2).contiguous()
                    setattr(layer, name, torch.nn.Parameter(weight, requires_grad=False))
                setattr(layer, _ASCEND_MOE_LAYOUT, True)
            super().__init__(layer)

        def __call__(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
            native = types.SimpleNamespace(
                w13_weight=layer.w13_weight.transpose(1, 2), w2_weight=layer.w2_weight.transpose(1, 2)
            )
            return super().__call__(native, *args, **kwargs)

    setattr(AscendLayoutCPUFusedMOE, MARK, True)
    module.CPUFusedMOE = module.IPEXFusedMOE = module.SGLFusedMOE = AscendLayoutCPUFusedMOE


def _fix_mindspeed_grouped_matmul(module: types.ModuleType) -> None:
    """MindSpeed's ``Ops.gmm`` (megatron's ``grouped_gemm_util.ops`` with grouped GEMM on; MindSpeed-LLM's LoRA
    experts call it) runs the CANN ``npu_gmm``: the CPU grouped GEMM instead, same rows-per-expert contract."""
    module.Ops.gmm = staticmethod(_cpu_gmm)


def _fix_vllm_gpu_model_runner(module: types.ModuleType) -> None:
    """MindSpeed-RL's ``initialize_kv_cache`` patch keeps ``NPUModelRunner``'s attention backends when
    ``init_cache_engine`` re-allocates the KV cache each iteration; on the CPU the runner is vLLM's ``GPUModelRunner``,
    which asserts they are built once: the same guard there."""
    build = module.GPUModelRunner.__dict__["initialize_attn_backend"]
    if getattr(build, MARK, False):
        return

    def initialize_attn_backend(self: Any, kv_cache_config: Any) -> None:
        return None if self.attn_groups else build(self, kv_cache_config)

    setattr(initialize_attn_backend, MARK, True)
    _set(module.GPUModelRunner, "initialize_attn_backend", initialize_attn_backend)


AFTER_IMPORT: dict[str, Callable[[types.ModuleType], None]] = {
    "vllm.v1.worker.gpu_model_runner": _fix_vllm_gpu_model_runner,
    "mindspeed.core.fusions.grouped_matmul": _fix_mindspeed_grouped_matmul,
    "vllm.model_executor.layers.utils": _fix_vllm_layer_utils,
    "vllm.model_executor.layers.fused_moe.cpu_fused_moe": _fix_vllm_cpu_fused_moe,
    "mindspeed_rl.models.rollout.vllm_adapter.megatron_weight_loaders": _fix_megatron_weight_loaders,
    "mindspeed_rl.models.rollout.vllm_adapter.vllm_parallel_state": _fix_vllm_parallel_state,
    "cli.train_grpo": _fix_train_grpo,
    "mindspeed.op_builder.algorithm_builder": _fix_algorithm_builder,
}

_finder: _StandinFinder | None = None
_after_import: _AfterImport | None = None
_originals: list[tuple[Any, str, Any]] = []


def real_torch_npu_present() -> bool:
    """Whether a real ``torch_npu`` is importable (looked up without the stand-in finder)."""
    return any(
        finder is not _finder and getattr(finder, "find_spec", None) and finder.find_spec("torch_npu", None)
        for finder in sys.meta_path
    )


def is_standin(module: Any) -> bool:
    return bool(getattr(module, MARK, False)) if isinstance(module, types.ModuleType) else False


def installed() -> bool:
    return _finder is not None


_MISSING = object()


def _set(owner: Any, name: str, value: Any) -> None:
    _originals.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, value)


def install() -> None:
    """Install every stand-in and megatron-core's CPU redirections (idempotent)."""
    global _finder
    if _finder is not None:
        return
    if real_torch_npu_present() or torch.cuda.is_available():
        raise CpuBackendError(
            "the MindSpeed-RL CPU backend stands in for torch_npu and must never run on an accelerator machine: "
            + ("a real torch_npu is importable here" if real_torch_npu_present() else "CUDA is available here")
        )
    for name in [m for m in sys.modules if m.split(".")[0] in STANDIN_ROOTS]:
        if not is_standin(sys.modules[name]):
            raise CpuBackendError(f"{name} is already imported and is not a stand-in; install the backend first")
    _finder = _StandinFinder()
    sys.meta_path.insert(0, _finder)
    global _after_import
    _after_import = _AfterImport()
    sys.meta_path.insert(0, _after_import)
    for name, fixup in AFTER_IMPORT.items():  # already imported (a test session): fix it now
        if name in sys.modules:
            fixup(sys.modules[name])
    _set(torch, "npu", _CpuNpu())
    sys.modules["torch.npu"] = torch.npu
    _set(torch.Tensor, "npu", _identity_move)
    _set(torch.Tensor, "cuda", _identity_move)  # transfer_to_npu's .cuda(): BaseWorker.broadcast_data_hccl
    # transfer_to_npu sends torch.cuda's stream calls to torch.npu (megatron's alltoall_seq dispatcher syncs one)
    for name in ("current_stream", "Stream", "stream", "synchronize"):
        _set(torch.cuda, name, getattr(torch.npu, name))
    # HCCL groups (vllm-ascend's GroupCoordinator, MindSpeed-RL's vLLM parallel state): gloo carries them on CPU
    for name in ("new_group", "init_process_group"):
        _set(torch.distributed, name, _gloo_for_hccl(getattr(torch.distributed, name)))
    for factory in ("tensor", "zeros", "ones"):  # 'npu' / 'cuda' device strings in MindSpeed-RL and megatron-core
        _set(torch, factory, _device_on_cpu(getattr(torch, factory)))

    from mindspeed_rl_r3.patches.megatron_cpu import enable_megatron_on_cpu

    enable_megatron_on_cpu()
    _install_grouped_gemm()
    # MindSpeed-LLM's LoRA (megatron_adaptor's get_peft_model) on this environment's peft 0.21, not its 0.7.1 pin
    if importlib.util.find_spec("peft") is not None:
        from mindspeed_rl_r3.patches import peft_megatron

        peft_megatron.apply()


def _gloo_for_hccl(real: Callable[..., Any]) -> Callable[..., Any]:
    def create(*args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("backend", "")).lower() == "hccl":
            kwargs["backend"] = "gloo"
            kwargs.pop("pg_options", None)  # HCCL options (torch_npu's) mean nothing to gloo
        return real(*args, **kwargs)

    create.__doc__ = real.__doc__
    return create


def _identity_move(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _device_on_cpu(real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A tensor factory that puts ``device='npu'`` / ``'cuda'`` tensors on the CPU, as transfer_to_npu puts 'cuda'
    ones on the NPU (``torch.tensor(..., device='npu')`` in MindSpeed-RL's seqlen_balancing / context_parallel,
    ``device="cuda"`` in megatron-core's schedules and ``get_default_causal_mask``)."""

    def factory(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if isinstance(device, str | torch.device) and str(device).split(":")[0] in ("npu", "cuda"):
            device = "cpu"
        return real(*args, device=device, **kwargs)

    factory.__doc__ = real.__doc__
    return factory


def uninstall() -> None:
    """Remove the stand-ins (megatron-core's CPU redirections stay: they are process-wide and harmless on CPU)."""
    global _finder
    if _finder is None:
        return
    global _after_import
    sys.meta_path.remove(_finder)
    _finder = None
    if _after_import is not None:
        sys.meta_path.remove(_after_import)
        _after_import = None
    for name in [m for m in sys.modules if m.split(".")[0] in STANDIN_ROOTS or m == "torch.npu"]:
        sys.modules.pop(name)
    while _originals:
        owner, name, value = _originals.pop()
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)


def upstream_root(start: str | os.PathLike | None = None) -> Path | None:
    """The pinned upstream tree: ``$MINDSPEED_RL_R3_UPSTREAM``, else ``shared/upstream`` beside the checkout."""
    env = os.environ.get(ENV_UPSTREAM)
    if env:
        return Path(env).resolve()
    here = Path(start) if start is not None else Path(__file__).resolve().parents[1]  # patches/ in the checkout
    candidate = here.parent / "shared" / "upstream"
    return candidate if (candidate / "MindSpeed-RL" / "mindspeed_rl").is_dir() else None


def upstream_paths(root: str | os.PathLike) -> list[Path]:
    """The folders of ``root`` to put on ``sys.path``, MindSpeed-RL first; raises naming any that is missing."""
    base = Path(root)
    paths = [base / folder for folder in UPSTREAM_FOLDERS]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise CpuBackendError(f"upstream tree {base} lacks {missing}")
    return paths


def _vllm_ascend_build_info() -> None:
    """``vllm_ascend._build_info``, which vllm-ascend's setup.py generates at build time (``is_310p``,
    ``sleep_mode_enabled``): its defaults, SOC ASCEND910B1, no custom kernels."""
    if "vllm_ascend._build_info" not in sys.modules:
        info = types.ModuleType("vllm_ascend._build_info")
        info.__soc_version__, info.__sleep_mode_enabled__ = "ASCEND910B1", False
        sys.modules[info.__name__] = info


def use_upstream(root: str | os.PathLike) -> list[str]:
    """Put the pinned upstream sources on ``sys.path`` and make ``megatron.training`` & co. importable beside the
    registry's ``megatron-core`` (whose wheel ships only ``megatron/core``). Returns the entries added."""
    added = []
    for i, path in enumerate(upstream_paths(root)):
        entry = str(path)
        if entry in sys.path:
            continue
        if i == 0:
            sys.path.insert(0, entry)
        else:
            sys.path.append(entry)
        added.append(entry)
    _vllm_ascend_build_info()
    megatron_lm = Path(root) / "Megatron-LM" / "megatron"
    spec = importlib.util.find_spec("megatron")
    if spec is not None and spec.submodule_search_locations is not None:
        import megatron

        if str(megatron_lm) not in list(megatron.__path__):
            megatron.__path__.append(str(megatron_lm))
    return added


_runs_jobs = False  # set by activate(): this process starts CPU jobs (not only imports upstream code, as tests do)


def runs_jobs() -> bool:
    """Whether the Ray jobs this process starts are CPU jobs (:func:`activate`), whose workers need the backend."""
    return _runs_jobs and installed()


def activate(root: str | os.PathLike | None = None) -> Path:
    """Install the stand-ins and put the pinned upstream sources on ``sys.path``; the Ray jobs this process starts
    then run CPU workers (:func:`ray_runtime_env`). What ``mindspeed-rl-r3 train --cpu-backend`` does, and what the
    import hook of an applied installation does at interpreter start where ``MINDSPEED_RL_R3_CPU_BACKEND=1``.
    Returns the upstream root; raises CpuBackendError on an accelerator machine or without the upstream tree."""
    found = Path(root) if root is not None else upstream_root()
    if found is None:
        raise CpuBackendError(
            f"the CPU backend needs the pinned upstream sources: set {ENV_UPSTREAM} to a folder holding "
            f"{', '.join(UPSTREAM_FOLDERS)}"
        )
    global _runs_jobs
    install()
    use_upstream(found)
    _runs_jobs = True
    os.environ[ENV_UPSTREAM] = str(found.resolve())  # inherited by the local Ray cluster's processes
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60's token auth would lock the local workers out
    return found


def ray_worker_setup() -> None:
    """Ray ``worker_process_setup_hook`` for CPU runs of MindSpeed-RL's actors: every worker process gets the
    stand-ins, the upstream sources of ``$MINDSPEED_RL_R3_UPSTREAM`` and the package's import hook (which patches
    MindSpeed-RL's modules when the job's sections are in the environment)."""
    root = os.environ.get(ENV_UPSTREAM)
    if not root:
        raise CpuBackendError(f"ray_worker_setup needs {ENV_UPSTREAM} in the job's env_vars")
    install()
    use_upstream(root)
    from mindspeed_rl_r3 import autopatch

    autopatch.install()


def ray_runtime_env(root: str | os.PathLike, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """A Ray ``runtime_env`` whose workers run :func:`ray_worker_setup` on ``root``."""
    return {
        "worker_process_setup_hook": f"{__name__}.ray_worker_setup",
        "env_vars": {ENV_UPSTREAM: str(Path(root).resolve()), "RAY_AUTH_MODE": "disabled", **(env_vars or {})},
    }


def ray_local_cluster(msrl_config: Any) -> dict[str, Any]:
    """``ray.init`` arguments of a CPU run: a fresh local cluster that declares the "NPU"s MindSpeed-RL's workers
    request (``rl_config.actor_resource.num_npus``; Ray maps its "NPU" resource to ids that ``ActorHybridWorker``
    reads from ``get_accelerator_ids()["NPU"]``), and logical CPUs for its 8-CPU worker and 10-CPU TransferDock
    requests (scheduling slots, not cores)."""
    resources = (msrl_config.get("rl_config") or {}).get("actor_resource") or {}
    return {
        "address": "local",
        "num_cpus": 32,
        "resources": {"NPU": int(resources.get("num_npus", 1))},
        "include_dashboard": False,
    }
