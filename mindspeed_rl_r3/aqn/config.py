"""The ``aqn:`` config section: what AQN perturbs, how strongly, where, and how the router is treated.

Defaults follow the QeRL recipe used for Qwen3-30B-A3B (sigma 1e-2 -> 1e-3 over 10 stages on the MLP-input norm).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


class AQNError(ValueError):
    """AQN cannot run as configured or asked. The message names the field, parameter or layer involved."""


ROUTER_MODES = ("perturbed", "compensated")
PRECISIONS = ("param_dtype", "fp32")
APPLY_TO = ("rollout", "rollout+actor")

# The MLP-input RMSNorm in both namings: HF / vLLM (rollout) and Megatron (actor). A model matches one of them.
DEFAULT_TARGETS = ("post_attention_layernorm", "pre_mlp_layernorm")
# Router weights [num_experts, hidden]: HF / vLLM ``mlp.gate``, Megatron ``mlp.router``.
DEFAULT_ROUTER_NAMES = ("mlp.gate", "mlp.router")


def _names(field_name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not value:
        raise AQNError(f"aqn.{field_name} must be a non-empty list of name patterns, got {value!r}")
    for v in value:
        if not isinstance(v, str) or not v.strip(".* "):
            raise AQNError(f"aqn.{field_name} entries must be non-empty name patterns, got {v!r}")
    return tuple(value)


def _apply_to(value: Any) -> str:
    # YAML may spell it as a string or as a list of places; both normalise to one of APPLY_TO.
    if isinstance(value, Sequence) and not isinstance(value, str):
        places = set(value)
        if places == {"rollout"}:
            return "rollout"
        if places == {"rollout", "actor"}:
            return "rollout+actor"
        raise AQNError(
            f"aqn.apply_to must be ['rollout'] or ['rollout', 'actor'], got {list(value)!r} "
            "(noise in the actor without the rollout would train a policy that never sampled)"
        )
    if value not in APPLY_TO:
        raise AQNError(f"aqn.apply_to must be one of {APPLY_TO}, got {value!r}")
    return value


@dataclass(frozen=True)
class AQNConfig:
    """The ``aqn:`` settings.

    ``targets``: parameter-name patterns of the RMSNorm scales to perturb (see :func:`aqn.noise.name_matches`);
    they must match at least one 1-D parameter of the model they are applied to.
    ``apply_to``: ``"rollout"`` (QeRL: only the behaviour policy samples with noise) or ``"rollout+actor"`` (the
    same noise also in the actor's old-log-prob and update forwards, through forward hooks; never the reference).
    ``router``: ``"perturbed"`` (QeRL-faithful: the router sees the noisy norm output) or ``"compensated"`` (the
    router's weight columns are rescaled by ``w / (w + z)`` so its logits, hence top-k, are unchanged).
    ``precision``: ``"param_dtype"`` writes ``w + z`` rounded to the parameter's dtype in place (QeRL; in bf16
    sigma ~1e-3 on weights near 1 mostly rounds away, see ``aqn/changed_fraction``); ``"fp32"`` leaves the weight
    alone and recomputes the norm output in fp32 with ``w + z`` in a forward hook (faithful sigma in bf16).
    ``seed``: with (step, layer, norm) it seeds the draw, so every rank draws the same noise without communication.
    """

    enabled: bool = False
    sigma_start: float = 1e-2
    sigma_end: float = 1e-3
    num_stages: int = 10
    targets: tuple[str, ...] = DEFAULT_TARGETS
    apply_to: str = "rollout"
    router: str = "perturbed"
    precision: str = "param_dtype"
    seed: int = 0
    router_names: tuple[str, ...] = DEFAULT_ROUTER_NAMES

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise AQNError(f"aqn.enabled must be true or false, got {self.enabled!r}")
        for name in ("sigma_start", "sigma_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise AQNError(f"aqn.{name} must be a positive finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.sigma_start < self.sigma_end:
            raise AQNError(
                f"aqn.sigma_start ({self.sigma_start:g}) must be >= aqn.sigma_end ({self.sigma_end:g}): the noise "
                "decays from sigma_start to sigma_end over training"
            )
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise AQNError(f"aqn.num_stages must be an integer >= 1, got {self.num_stages!r}")
        object.__setattr__(self, "targets", _names("targets", self.targets))
        for pattern in self.targets:
            if "norm" not in pattern.lower():
                raise AQNError(
                    f"aqn.targets entry {pattern!r} names no norm: AQN perturbs RMSNorm scales, e.g. "
                    f"{' or '.join(DEFAULT_TARGETS)}"
                )
        object.__setattr__(self, "router_names", _names("router_names", self.router_names))
        object.__setattr__(self, "apply_to", _apply_to(self.apply_to))
        if self.router not in ROUTER_MODES:
            raise AQNError(f"aqn.router must be one of {ROUTER_MODES}, got {self.router!r}")
        if self.precision not in PRECISIONS:
            raise AQNError(f"aqn.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise AQNError(f"aqn.seed must be a non-negative integer, got {self.seed!r}")

    @property
    def actor(self) -> bool:
        """Whether the actor's old-log-prob and update forwards see the noise too."""
        return self.apply_to == "rollout+actor"

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> AQNConfig:
        """Build from the ``aqn:`` mapping of a config file; unknown keys are an error, not ignored."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise AQNError(f"unknown aqn keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**section)
