"""Fake quantization of weights (quantize, then dequantize to the input dtype), to measure what 4-bit post-training
quantization does to a policy AQN was meant to make robust.

- ``nvfp4``: NVIDIA's NVFP4 layout: 4-bit E2M1 values (magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6) in blocks of 16
  along the input dimension, each block scaled by an FP8 E4M3 factor, and one fp32 factor per tensor that maps the
  largest block scale into E4M3's range (``amax / (6 * 448)``). Values round to the nearest grid point (ties away
  from zero here; hardware rounds ties to even, which differs only on exact midpoints).
- ``int4``: symmetric integers -8..7 in groups of 32 along the input dimension, one fp32 scale per group
  (``amax / 7``), the usual weight-only INT4 (GPTQ / AWQ layout without zero points).

Weights are ``[..., out, in]`` (``nn.Linear`` and fused-expert layouts): blocks run along the last dimension, which
must be a multiple of the block size. All math is in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

FP4_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
NVFP4_BLOCK = 16
INT4_GROUP = 32
FORMATS = ("nvfp4", "int4")


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    if weight.dim() < 2 or weight.shape[-1] % block:
        raise ValueError(
            f"fake quantization needs a [..., out, in] weight with in a multiple of {block}, got {tuple(weight.shape)}"
        )
    return weight.float().reshape(*weight.shape[:-1], weight.shape[-1] // block, block)


def round_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (sign kept, magnitudes clamped to 6); ``x`` is already divided by its block scale."""
    grid = torch.tensor(FP4_E2M1_GRID, dtype=torch.float32)
    mag = x.abs().clamp(max=FP4_MAX)
    # midpoints between neighbouring grid values; bucketize gives the index of the nearest one (ties go up)
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.sign(x) * grid[torch.bucketize(mag, mids, right=True)]


def fake_quant_nvfp4(weight: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``weight`` (same shape and dtype)."""
    w = _blocks(weight, block)
    amax = w.abs().amax(dim=-1, keepdim=True)
    tensor_scale = (amax.max() / (FP4_MAX * FP8_E4M3_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
    block_scale = (amax / FP4_MAX / tensor_scale).to(torch.float8_e4m3fn).float() * tensor_scale
    safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    q = torch.where(block_scale > 0, round_to_fp4(w / safe) * block_scale, torch.zeros_like(w))
    return q.reshape(weight.shape).to(weight.dtype)


def fake_quant_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Symmetric INT4 (-8..7) quantize-dequantize of ``weight`` with one scale per group (same shape and dtype)."""
    w = _blocks(weight, group)
    scale = w.abs().amax(dim=-1, keepdim=True) / 7.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / safe), -8, 7) * scale
    return q.reshape(weight.shape).to(weight.dtype)


def fake_quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "nvfp4":
        return fake_quant_nvfp4(weight)
    if fmt == "int4":
        return fake_quant_int4(weight)
    raise ValueError(f"unknown quantization format {fmt!r}; expected one of {FORMATS}")


def fake_quantize_state(
    state: Mapping[str, torch.Tensor], fmt: str, select: Callable[[str], bool]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A copy of ``state`` with every tensor whose name ``select`` accepts fake-quantized to ``fmt``.

    Returns the new state and stats: ``quantized_tensors``, ``quantized_fraction`` (of all elements) and
    ``relative_error`` (``||W_q - W|| / ||W||`` over the quantized tensors together).
    """
    out, err, norm, count, total = {}, 0.0, 0.0, 0, 0
    chosen = 0
    for name, value in state.items():
        total += value.numel()
        if not select(name):
            out[name] = value
            continue
        q = fake_quantize(value, fmt)
        err += float((q.float() - value.float()).pow(2).sum())
        norm += float(value.float().pow(2).sum())
        count += value.numel()
        chosen += 1
        out[name] = q
    if chosen == 0:
        raise ValueError(f"no tensor selected for {fmt} fake quantization among {sorted(state)[:5]}...")
    stats = {
        "quantized_tensors": chosen,
        "quantized_fraction": count / max(total, 1),
        "relative_error": (err / norm) ** 0.5 if norm else 0.0,
    }
    return out, stats
