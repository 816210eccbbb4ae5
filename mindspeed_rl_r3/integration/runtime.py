"""The integration state of one process: the sections it runs with and the metrics waiting to be reported.

Every patch consults :func:`active` at call time and behaves exactly like the upstream code when it returns
``None``, so installing the patches in a process whose job has no ``r3`` / ``aqn`` / ``lora_extras`` sections
changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mindspeed_rl_r3.config import IntegrationConfig, load_sections
from mindspeed_rl_r3.integration.metrics import merge_entries
from mindspeed_rl_r3.integration.settings import ColumnPlan


@dataclass
class IntegrationRuntime:
    sections: dict[str, Any]
    config: IntegrationConfig
    columns: ColumnPlan
    pending_metrics: dict[str, list[float]] = field(default_factory=dict)

    def add_metrics(self, entries: Mapping[str, list[float]]) -> None:
        merge_entries(self.pending_metrics, entries)

    def take_metrics(self) -> dict[str, list[float]]:
        taken, self.pending_metrics = self.pending_metrics, {}
        return taken


_runtime: IntegrationRuntime | None = None


def activate(sections: Mapping[str, Any]) -> IntegrationRuntime:
    """Validate the sections and make them this process's integration state (replacing any earlier one)."""
    global _runtime
    raw = dict(sections)
    config = load_sections(raw)
    _runtime = IntegrationRuntime(raw, config, ColumnPlan.from_config(config))
    return _runtime


def active() -> IntegrationRuntime | None:
    return _runtime


def deactivate() -> None:
    global _runtime
    _runtime = None
