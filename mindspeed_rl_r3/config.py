"""The package's own config sections, validated in one place: ``r3:``, ``aqn:`` and ``lora_extras:``.

They sit at the top level of a MindSpeed-RL hydra config, beside ``megatron_training``, ``actor_config``,
``rl_config`` and ``generate_config``: MindSpeed-RL's config classes reject unknown keys inside their own sections,
so :func:`split_config` takes ours out before the rest reaches MindSpeed-RL. A config without them runs exactly as
MindSpeed-RL would.

This module checks each section on its own (keys, types, ranges); whether the sections can run together with the
rest of a config is decided by :mod:`mindspeed_rl_r3.config_rules`. Torch-free: ``plan`` imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mindspeed_rl_r3.aqn.config import AQNConfig
from mindspeed_rl_r3.replay.modes import ReplayConfig, ReplayMode

SECTIONS = ("r3", "aqn", "lora_extras")
CAPTURE_VERSIONS = ("0.11.0", "0.9.1", "native")


class ConfigError(ValueError):
    """A bad value in one of the package's config sections; the message names ``section.key``."""


@dataclass(frozen=True)
class R3Config:
    """``r3:``: the training-side replay settings plus how the rollout captures and ships routing."""

    replay: ReplayConfig = field(default_factory=ReplayConfig)
    vllm_ascend: str = "0.11.0"  # capture layout: "0.11.0" (MindSpeed-RL master), "0.9.1" (2.3.0), "native"
    group_dedupe: bool = True  # store a GRPO group's shared prompt rows once on the wire

    @property
    def enabled(self) -> bool:
        return self.replay.mode is not ReplayMode.DISABLED

    @property
    def capture(self) -> bool:
        """The rollout records routing when training replays it (R3) or measures against it (observe); R2 records
        its own in training."""
        return self.replay.mode in (ReplayMode.R3, ReplayMode.OBSERVE)


@dataclass(frozen=True)
class LoraExtras:
    """``lora_extras:``: what MindSpeed's LoRA does not offer by itself."""

    lora_router_trainable: bool = False


@dataclass(frozen=True)
class IntegrationConfig:
    r3: R3Config = field(default_factory=R3Config)
    aqn: AQNConfig = field(default_factory=AQNConfig)
    lora_extras: LoraExtras = field(default_factory=LoraExtras)


def _plain(section: Any, name: str) -> dict[str, Any]:
    if section is None:
        return {}
    if type(section).__module__.startswith("omegaconf"):  # DictConfig / ListConfig: plain containers, resolved
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(section, resolve=True)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {type(section).__name__}")
    return dict(section)


def _r3(section: Mapping[str, Any]) -> R3Config:
    replay_keys = {f.name for f in fields(ReplayConfig)}
    own_keys = {"vllm_ascend", "group_dedupe"}
    unknown = set(section) - replay_keys - own_keys
    if unknown:
        raise ConfigError(f"r3: unknown keys {sorted(unknown)}; allowed {sorted(replay_keys | own_keys)}")
    try:
        replay = ReplayConfig(**{k: v for k, v in section.items() if k in replay_keys})
    except ValueError as err:
        raise ConfigError(str(err) if str(err).startswith("r3.") else f"r3: {err}") from None
    version = str(section.get("vllm_ascend", "0.11.0"))
    if version not in CAPTURE_VERSIONS:
        raise ConfigError(f"r3.vllm_ascend must be one of {CAPTURE_VERSIONS}, got {version!r}")
    dedupe = section.get("group_dedupe", True)
    if not isinstance(dedupe, bool):
        raise ConfigError(f"r3.group_dedupe must be true or false, got {dedupe!r}")
    return R3Config(replay=replay, vllm_ascend=version, group_dedupe=dedupe)


def _lora_extras(section: Mapping[str, Any]) -> LoraExtras:
    unknown = set(section) - {"lora_router_trainable"}
    if unknown:
        raise ConfigError(f"lora_extras: unknown keys {sorted(unknown)}; allowed ['lora_router_trainable']")
    value = section.get("lora_router_trainable", False)
    if not isinstance(value, bool):
        raise ConfigError(f"lora_extras.lora_router_trainable must be true or false, got {value!r}")
    return LoraExtras(value)


def load_sections(config: Mapping[str, Any] | Any) -> IntegrationConfig:
    """Validate the ``r3`` / ``aqn`` / ``lora_extras`` sections of a whole config (absent sections: defaults)."""
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    r3 = _r3(_plain(get("r3", None), "r3"))
    try:
        aqn = AQNConfig.from_dict(_plain(get("aqn", None), "aqn") or None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    extras = _lora_extras(_plain(get("lora_extras", None), "lora_extras"))
    return IntegrationConfig(r3=r3, aqn=aqn, lora_extras=extras)


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], IntegrationConfig]:
    """``(MindSpeed-RL's part, ours)``: the input without our sections, and our sections validated."""
    plain = _plain(config, "config")
    ours = load_sections(plain)
    return {k: v for k, v in plain.items() if k not in SECTIONS}, ours
