"""The ``r3:`` replay settings the training side reads, without torch: the rules module and ``plan`` import them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ReplayMode(str, Enum):
    DISABLED = "disabled"
    R2 = "R2"  # record routing in the old-log-prob forward, replay it in every update mini-batch
    R3 = "R3"  # replay the rollout's routing in the old-log-prob forward and in every update mini-batch
    # capture the rollout's routing and measure the training router against it, but route natively: the R3-off arm
    # of a comparison, with the same telemetry (agreement, dispatched-routing mismatch) as R3
    OBSERVE = "observe"


class ReplayConfigError(ValueError):
    """A bad ``r3:`` replay setting; the message names ``r3.<key>``."""


@dataclass(frozen=True)
class ReplayConfig:
    """The ``r3:`` settings that the training side reads.

    ``replay_reference``: under R3, the reference (KL) forward replays the rollout's routing too, so the KL term
    measures the weights' change rather than a routing difference. Off here (the reference needs the routing column
    only when asked); the shipped cluster configs turn it on, for the reasons measured in ``docs/replay.md``.
    ``aux_loss_routing``: whether the load-balancing loss counts the replayed selection or the one the live router
    would make. Default ``native``: the loss shapes the router's own preferences, as Megatron 0.16's built-in replay
    does; ``replayed`` (counts the experts that really process the tokens) is available on megatron-core 0.12.x.
    """

    mode: ReplayMode = ReplayMode.DISABLED
    replay_reference: bool = False
    aux_loss_routing: str = "native"
    on_misaligned: str = "raise"
    alarm_overlap: float | None = None
    alarm_min_rows: int = 64

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", ReplayMode(self.mode))
        except ValueError:
            choices = [m.value for m in ReplayMode]
            raise ReplayConfigError(f"r3.mode must be one of {choices}, got {self.mode!r}") from None
        if not isinstance(self.replay_reference, bool):
            raise ReplayConfigError(f"r3.replay_reference must be true or false, got {self.replay_reference!r}")
        if self.replay_reference and self.mode is ReplayMode.OBSERVE:
            raise ReplayConfigError("r3.replay_reference replays routing: it needs mode R3, not observe")
        if self.aux_loss_routing not in ("native", "replayed"):
            raise ReplayConfigError(
                f"r3.aux_loss_routing must be 'native' or 'replayed', got {self.aux_loss_routing!r}"
            )
        if self.on_misaligned not in ("raise", "warn"):
            raise ReplayConfigError(f"r3.on_misaligned must be 'raise' or 'warn', got {self.on_misaligned!r}")
        overlap = self.alarm_overlap
        if overlap is not None and (
            isinstance(overlap, bool) or not isinstance(overlap, int | float) or not 0.0 <= overlap <= 1.0
        ):
            raise ReplayConfigError(f"r3.alarm_overlap must be null or a number in [0, 1], got {overlap!r}")
        rows = self.alarm_min_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ReplayConfigError(f"r3.alarm_min_rows must be an integer >= 0, got {rows!r}")
