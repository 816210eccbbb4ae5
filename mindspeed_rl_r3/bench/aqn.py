"""AQN benchmark: time to draw and apply one step's noise at Qwen3-30B-A3B shapes, on one CPU core.

The rollout stand-in holds 48 ``post_attention_layernorm`` scales of 2048 channels in bf16 near 1 (and, for the
compensated variant, 48 bf16 routers of 128 x 2048). Each repetition re-syncs the clean weights (untimed, as
MindSpeed-RL's weight sync would) and times :meth:`RolloutNoise.apply`: 48 seeded draws, the fp32 add, the cast,
the in-place write, and the ``aqn/changed_fraction`` metric with its one host read. Best of N.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mindspeed_rl_r3.aqn.config import AQNConfig
from mindspeed_rl_r3.aqn.noise import RolloutNoise, draw_noise


@dataclass(frozen=True)
class AQNBenchConfig:
    layers: int = 48
    channels: int = 2048
    num_experts: int = 128
    sigma: float = 1e-3
    weight_spread: float = 0.05  # norm scales ~ 1 + spread * N(0, 1)
    repeats: int = 50
    seed: int = 0


class _Layer(nn.Module):
    def __init__(self, channels: int, num_experts: int) -> None:
        super().__init__()
        self.post_attention_layernorm = nn.RMSNorm(channels, eps=1e-6)
        if num_experts:
            self.mlp = nn.Module()
            self.mlp.gate = nn.Linear(channels, num_experts, bias=False)


class _Rollout(nn.Module):
    def __init__(self, cfg: AQNBenchConfig, routers: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg.channels, cfg.num_experts if routers else 0) for _ in range(cfg.layers))


def _rollout(cfg: AQNBenchConfig, routers: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(cfg.seed)
    model = _Rollout(cfg, routers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1 + cfg.weight_spread * torch.randn(p.shape, generator=g))
    model = model.to(torch.bfloat16)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def _best_apply_ms(cfg: AQNBenchConfig, aqn: AQNConfig, routers: bool, repeats: int) -> tuple[float, float]:
    model, clean = _rollout(cfg, routers)
    params = dict(model.named_parameters())
    noise = RolloutNoise(model, aqn, total_steps=2 * (repeats + 1))
    times, fraction = [], 0.0
    for i in range(repeats + 1):
        with torch.no_grad():  # the weight sync, not timed
            for name, value in clean.items():
                params[name].copy_(value)
        start = time.perf_counter()
        fraction = noise.apply(repeats + 1 + i)["aqn/changed_fraction"]
        if i:  # the first round warms up allocator and kernels
            times.append(time.perf_counter() - start)
    return min(times) * 1e3, fraction


def run_aqn_bench(cfg: AQNBenchConfig | None = None) -> dict:
    """``apply_ms``: best time to draw and apply one step's noise (target < 5 ms), plus the bf16 rounding effect."""
    cfg = cfg or AQNBenchConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Stage 1 of 2 for every timed step: sigma is cfg.sigma throughout.
        base = dict(enabled=True, sigma_start=cfg.sigma, sigma_end=cfg.sigma, num_stages=2, seed=cfg.seed)
        apply_ms, changed_bf16 = _best_apply_ms(cfg, AQNConfig(**base), False, cfg.repeats)
        fp32_ms, changed_fp32 = _best_apply_ms(cfg, AQNConfig(**base, precision="fp32"), False, cfg.repeats)
        compensated_ms, _ = _best_apply_ms(
            cfg, AQNConfig(**base, router="compensated"), True, max(3, cfg.repeats // 10)
        )
        model, _ = _rollout(cfg, False)
        targets = RolloutNoise(model, AQNConfig(**base), 2).targets
        draws = []
        for i in range(cfg.repeats):
            start = time.perf_counter()
            draw_noise(targets, cfg.seed, i, cfg.sigma)
            draws.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {
        "config": asdict(cfg),
        "threads": 1,
        "apply_ms": round(apply_ms, 3),
        "draw_ms": round(min(draws) * 1e3, 3),
        "apply_fp32_ms": round(fp32_ms, 3),
        "apply_compensated_ms": round(compensated_ms, 3),
        "changed_fraction_bf16": round(changed_bf16, 4),
        "changed_fraction_fp32": round(changed_fp32, 4),
    }
