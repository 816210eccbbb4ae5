"""Run megatron-core on a CPU-only machine (tests and the CPU demo). Refuses to act where an accelerator exists.

megatron-core assumes CUDA in a handful of places (RNG tracker states, ``torch.cuda.current_device()`` in
constructors, Transformer-Engine names referenced unguarded in core 0.16). This module redirects exactly those to the
CPU, once per process; model code is unchanged. Use the allgather dispatcher: the alltoall one creates CUDA streams.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from contextlib import contextmanager
from typing import Any

import torch

_ENABLED = False

# Transformer-Engine entry points that megatron-core 0.16 moe_utils references without a guard.
_TE_NAMES = (
    "te_general_gemm",
    "fused_topk_with_score_function",
    "fused_permute",
    "fused_unpermute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_moe_aux_loss",
    "fused_compute_score_for_moe_aux_loss",
)


def _refuse_on_accelerators() -> None:
    from mindspeed_rl_r3.patches import cpu_backend

    npu = cpu_backend.real_torch_npu_present() if cpu_backend.installed() else importlib.util.find_spec("torch_npu")
    if npu or torch.cuda.is_available():
        raise RuntimeError(
            "megatron_cpu redirects CUDA calls to the CPU and is only for machines without NPU/GPU; "
            "torch_npu or CUDA is present here"
        )


def enable_megatron_on_cpu() -> None:
    """Install the CPU redirections (idempotent)."""
    global _ENABLED
    if _ENABLED:
        return
    _refuse_on_accelerators()

    def cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_cpu_rng_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        torch.set_rng_state(state)

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.get_rng_state = cpu_rng_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_cpu_rng_state  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda *_a, **_k: None  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = cpu_rng_state
    mcore_random._set_cuda_rng_state = set_cpu_rng_state

    _cuda_type_names_in(_float16_optimizer_class())

    from megatron.core.transformer.moe import moe_utils

    for name in _TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
    _ENABLED = True


def _float16_optimizer_class() -> Any:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    return Float16OptimizerWithFloat16Params


def _cuda_named(real_type: Any) -> Any:
    def cuda_named_type(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = real_type(tensor, *args, **kwargs)
        if args or kwargs or tensor.device.type != "cpu":
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    return cuda_named_type


def _cuda_type_names_in(cls: Any) -> None:
    """``cls.__init__`` sees CPU tensors' ``type()`` as ``torch.cuda.*`` (megatron's bf16 optimizer accepts only
    those names, as transfer_to_npu makes NPU tensors report them); everywhere else ``type()`` is untouched."""
    real_init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # MindSpeed patches ``type`` on Parameter as well as on Tensor: rename on each class that defines it
        owners = [c for c in (torch.nn.Parameter, torch.Tensor) if "type" in c.__dict__]
        saved = [(c, c.__dict__["type"]) for c in owners]
        for owner, real_type in saved:
            owner.type = _cuda_named(real_type)  # type: ignore[method-assign]
        try:
            real_init(self, *args, **kwargs)
        finally:
            for owner, real_type in saved:
                owner.type = real_type  # type: ignore[method-assign]

    cls.__init__ = __init__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def megatron_cpu_session(seed: int = 1234):
    """A one-process gloo group with Megatron's model-parallel state (all sizes 1) and seeded RNG trackers."""
    enable_megatron_on_cpu()
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            torch.distributed.destroy_process_group()
