"""Adaptive quantization noise (AQN, QeRL): staged channel-wise noise on RMSNorm scales for the rollout policy."""

from mindspeed_rl_r3.aqn.config import AQNConfig, AQNError
from mindspeed_rl_r3.aqn.noise import (
    ActorNoise,
    NoiseTarget,
    RolloutNoise,
    actor_stage_uses_noise,
    aqn_metrics,
    draw_channel_noise,
    draw_noise,
    layer_index,
    name_matches,
    noise_seed,
    norm_slot,
    perturbed_weight,
    select_targets,
)
from mindspeed_rl_r3.aqn.schedule import aqn_schedule, aqn_sigma, aqn_stage, sigma_table, stage_sigma

__all__ = [
    "AQNConfig",
    "AQNError",
    "ActorNoise",
    "NoiseTarget",
    "RolloutNoise",
    "actor_stage_uses_noise",
    "aqn_metrics",
    "aqn_schedule",
    "aqn_sigma",
    "aqn_stage",
    "draw_channel_noise",
    "draw_noise",
    "layer_index",
    "name_matches",
    "noise_seed",
    "norm_slot",
    "perturbed_weight",
    "select_targets",
    "sigma_table",
    "stage_sigma",
]
