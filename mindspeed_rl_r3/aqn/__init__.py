"""Adaptive quantization noise (AQN, QeRL): staged channel-wise noise on RMSNorm scales for the rollout policy."""

from mindspeed_rl_r3.aqn.config import AQNConfig, AQNError

# noise and schedule import torch: loaded on first use, so the config rules and `plan` stay torch-free.
_LAZY = {
    **dict.fromkeys(
        ("ActorNoise", "NoiseTarget", "RolloutNoise", "actor_stage_uses_noise", "aqn_metrics", "draw_channel_noise",
         "draw_noise", "layer_index", "name_matches", "noise_seed", "norm_slot", "perturbed_weight", "select_targets"),
        "mindspeed_rl_r3.aqn.noise",
    ),
    **dict.fromkeys(
        ("aqn_schedule", "aqn_sigma", "aqn_stage", "sigma_table", "stage_sigma"), "mindspeed_rl_r3.aqn.schedule"
    ),
}  # fmt: skip


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
