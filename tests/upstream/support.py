"""Shared pieces of the tests against the real MindSpeed-RL: activation through the import hook (the way a Ray
worker is activated), a local Ray cluster whose workers run on the CPU backend, and the undo after each test."""

from __future__ import annotations

import json
from typing import Any

import pytest

R3_SECTIONS = {
    "r3": {"mode": "R3", "alarm_min_rows": 10**9, "group_dedupe": True},
    "aqn": {"enabled": True, "num_stages": 2, "sigma_start": 0.05, "sigma_end": 0.01, "precision": "fp32"},
}


def reset_integration() -> None:
    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration import runtime
    from mindspeed_rl_r3.patches import (
        mindspeed_rl_integration,
        mindspeed_rl_rollout,
        vllm_ascend_capture,
        vllm_capture,
    )

    mindspeed_rl_integration.undo()
    vllm_ascend_capture.undo()
    vllm_capture.undo()  # what install_capture attaches on the CPU backend
    vllm_ascend_capture.CaptureSession.release()
    mindspeed_rl_rollout._capture_installed.clear()
    autopatch.uninstall()
    runtime.deactivate()


@pytest.fixture
def integration(monkeypatch):
    """``integration(sections=None)`` activates with :data:`R3_SECTIONS` (or ``sections``) the way a Ray worker does:
    sections in the environment, import hook installed (it patches the already imported real modules)."""
    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.env import ENV_SECTIONS

    def start(sections: dict[str, Any] | None = None) -> None:
        monkeypatch.setenv(ENV_SECTIONS, json.dumps(R3_SECTIONS if sections is None else sections))
        autopatch.install()

    yield start
    reset_integration()


@pytest.fixture(scope="session")
def ray_cluster(upstream_sources):
    """A fresh local Ray instance (never an existing cluster or ``RAY_ADDRESS``) whose worker processes run on the
    CPU backend with the upstream sources importable. Tests that need the integration in the workers put the
    sections into an actor's ``runtime_env`` ``env_vars``."""
    import os

    import ray

    from mindspeed_rl_r3.patches import cpu_backend

    if ray.is_initialized():  # each test module importing this fixture gets its own session instance: share one
        yield ray
        return
    saved = os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        address="local",
        num_cpus=16,  # logical: MindSpeed-RL asks num_cpus=10 for its TransferDock actor
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=cpu_backend.ray_runtime_env(upstream_sources),
    )
    yield ray
    ray.shutdown()
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved
