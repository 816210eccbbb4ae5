"""The AQN noise schedule: K equal stages over the training steps, stage 0 noise-free, then geometric decay.

With 0-based global step ``s`` of ``M`` total steps and ``K`` stages:

    stage(s) = min(K - 1, floor(s * K / M))
    sigma(0) = 0
    sigma(k) = sigma_start * (sigma_end / sigma_start) ** ((k - 1) / (K - 2))    for 1 <= k <= K - 1, K >= 3
    sigma(1) = sigma_start                                                        for K = 2
    (K = 1: the only stage is stage 0, so no noise is ever added)

Relation to the paper (QeRL, arXiv 2510.11696, Eq. 8): the paper writes
``sigma(k) = sigma_start * (sigma_end / sigma_start) ** ((k - 1) / (K - 1))`` with stage
``k = floor((step - 1) / floor(M / K))`` for 1-based steps. That exponent never reaches 1 for k <= K - 1, so the
last stage would end short of ``sigma_end``; the released code (``trl_trainer/grpo_trainer.py``) uses
``(k - 1) / (K - 2)`` and so ends exactly at ``sigma_end``, which is what this module does. The stage index is the
paper's for 0-based steps when K divides M; here it is computed with integers, so stages differ by at most one step
when it does not, and ``M < K`` cannot divide by zero. K = 2 gives the single noisy stage ``sigma_start``, which is
also what Eq. 8 gives. Everything is a function of the global step alone, so a resumed run continues the schedule.
"""

from __future__ import annotations

from mindspeed_rl_r3.aqn.config import AQNConfig, AQNError


def aqn_stage(step: int, total_steps: int, num_stages: int) -> int:
    """Stage index in ``[0, num_stages)`` of 0-based global ``step``; steps past ``total_steps`` stay in the last."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise AQNError(f"AQN total_steps must be an integer >= 1, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise AQNError(f"AQN step must be a 0-based non-negative integer, got {step!r}")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise AQNError(f"aqn.num_stages must be an integer >= 1, got {num_stages!r}")
    return min(num_stages - 1, step * num_stages // total_steps)


def stage_sigma(stage: int, num_stages: int, sigma_start: float, sigma_end: float) -> float:
    """Noise std of one stage: 0 for stage 0, geometric from ``sigma_start`` (stage 1) to ``sigma_end`` (last)."""
    if not 0 <= stage < num_stages:
        raise AQNError(f"AQN stage {stage} is outside [0, {num_stages})")
    if stage == 0:
        return 0.0
    if stage == num_stages - 1 and num_stages > 2:
        return float(sigma_end)  # exact, not via pow rounding
    if stage == 1:
        return float(sigma_start)
    return float(sigma_start * (sigma_end / sigma_start) ** ((stage - 1) / (num_stages - 2)))


def aqn_schedule(step: int, total_steps: int, config: AQNConfig) -> tuple[int, float]:
    """``(stage, sigma)`` at 0-based global ``step`` of ``total_steps``."""
    stage = aqn_stage(step, total_steps, config.num_stages)
    return stage, stage_sigma(stage, config.num_stages, config.sigma_start, config.sigma_end)


def aqn_sigma(step: int, total_steps: int, config: AQNConfig) -> float:
    """Noise std at 0-based global ``step`` of ``total_steps`` (0.0 in the noise-free first stage)."""
    return aqn_schedule(step, total_steps, config)[1]


def sigma_table(config: AQNConfig) -> list[float]:
    """Sigma of every stage, stage 0 first."""
    return [stage_sigma(k, config.num_stages, config.sigma_start, config.sigma_end) for k in range(config.num_stages)]
