"""How the ``r3:`` / ``aqn:`` / ``lora_extras:`` sections reach every process, and which TransferDock columns follow.

The driver reads the sections from the hydra config and puts them, as JSON, into the environment variable
:data:`ENV_SECTIONS` of the Ray job (``ray.init(runtime_env={"env_vars": ...})``); Ray hands a job's ``env_vars`` to
every worker process and merges them into each actor's own ``env_vars``, so every worker of the job, on every node,
reads the same sections. A process without the variable (or with :data:`ENV_DISABLE` set) runs MindSpeed-RL
unchanged. :data:`ENV_CONFIG_FILE` names a YAML file to read the sections from instead, for drivers that are not
hydra scripts.

Columns are a pure function of the sections, so the rollout (which puts them) and every consumer (which asks for
them) agree; a consumer asking for a column nobody puts would wait in the TransferDock forever.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mindspeed_rl_r3.config import SECTIONS, ConfigError, IntegrationConfig, load_sections
from mindspeed_rl_r3.config_rules import R2_UNSUPPORTED
from mindspeed_rl_r3.integration.env import ENV_CONFIG_FILE, ENV_DISABLE, ENV_SECTIONS
from mindspeed_rl_r3.replay.state import ReplayMode

ROUTED_EXPERTS = "routed_experts"
ROLLOUT_LOG_PROBS = "rollout_log_probs"

# TransferDock consumer stages (GRPOTransferDock.experience_consumers at 05a90d77) that read our columns.
ROLLOUT_STAGE = "actor_rollout"
OLD_LOG_PROB_STAGE = "actor_log_prob"
UPDATE_STAGE = "actor_train"
REFERENCE_STAGE = "ref_log_prob"


def _plain(value: Any) -> Any:
    if type(value).__module__.startswith("omegaconf"):  # DictConfig / ListConfig (they pass as Mappings)
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def present_sections(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The package's sections present at the top level of a whole config, as plain data (``{}`` if none)."""
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    found = {}
    for name in SECTIONS:
        value = get(name, None)
        if value is not None:
            found[name] = _plain(value)
    return found


def encode_sections(sections: Mapping[str, Any]) -> str:
    """Validate the sections and serialise them for :data:`ENV_SECTIONS`."""
    load_sections(sections)
    try:
        return json.dumps(dict(sections), sort_keys=True)
    except TypeError as err:
        raise ConfigError(
            f"r3/aqn/lora_extras sections must hold plain values (numbers, strings, lists): {err}"
        ) from None


def decode_sections(text: str, source: str = ENV_SECTIONS) -> tuple[dict[str, Any], IntegrationConfig]:
    """``(raw sections, validated config)`` from :func:`encode_sections` output; errors name ``source``."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON ({err}); it is written by the mindspeed_rl_r3 driver") from None
    if not isinstance(raw, dict) or set(raw) - set(SECTIONS):
        raise ConfigError(f"{source} must be a JSON object with keys among {list(SECTIONS)}, got {text[:200]!r}")
    try:
        return raw, load_sections(raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def read_sections_file(path: str) -> dict[str, Any]:
    """The sections at the top level of a YAML config file (hydra defaults are not composed: put them there)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as err:
        raise ConfigError(f"{ENV_CONFIG_FILE}={path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{ENV_CONFIG_FILE}={path}: expected a YAML mapping at the top level")
    return present_sections(data)


def sections_from_environment(
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], IntegrationConfig] | None:
    """The sections this process runs with, or ``None`` (plain MindSpeed-RL)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes"):
        return None
    text = env.get(ENV_SECTIONS)
    if text:
        return decode_sections(text)
    path = env.get(ENV_CONFIG_FILE)
    if path:
        raw = read_sections_file(path)
        return (raw, load_sections(raw)) if raw else None
    return None


@dataclass(frozen=True)
class ColumnPlan:
    """Which extra TransferDock columns exist, who puts them and who reads them.

    ``routed_experts``: capture is on (``r3.mode: R3`` or ``observe``): the rollout puts each sample's encoded trace.
    ``rollout_log_probs``: always with the integration active: vLLM's log-probs of the sampled tokens, kept so
    every step can report the train / rollout mismatch.
    """

    routed_experts: bool
    rollout_log_probs: bool = True
    replay_reference: bool = False

    @classmethod
    def from_config(cls, config: IntegrationConfig) -> ColumnPlan:
        if config.r3.replay.mode is ReplayMode.R2:
            raise ConfigError(R2_UNSUPPORTED)  # the driver refuses it first (config_rules); a foreign driver here
        return cls(routed_experts=config.r3.capture, replay_reference=config.r3.replay.replay_reference)

    def transfer_dock_columns(self) -> list[str]:
        return [
            c for c, on in ((ROUTED_EXPERTS, self.routed_experts), (ROLLOUT_LOG_PROBS, self.rollout_log_probs)) if on
        ]

    def consumer_columns(self, stage: str, partial_rollout: bool = False) -> list[str]:
        """Extra columns a consumer stage asks the TransferDock for."""
        if stage in (OLD_LOG_PROB_STAGE, UPDATE_STAGE):
            return self.transfer_dock_columns()
        if stage == REFERENCE_STAGE:
            return [ROUTED_EXPERTS] if self.routed_experts and self.replay_reference else []
        if stage == ROLLOUT_STAGE and partial_rollout:
            return self.transfer_dock_columns()  # the routing and log-probs of the segments generated so far
        return []
