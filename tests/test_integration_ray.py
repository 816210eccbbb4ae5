"""On a real local Ray cluster: a job started with the integration's runtime_env patches MindSpeed-RL (fake) in
every worker process as the modules are imported, before Ray binds the remote methods of an actor class; the driver
itself installs nothing."""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.integration_support import FAKES, R3_SECTIONS, drop_fake_modules

REPO = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def ray_job(monkeypatch):
    ray = pytest.importorskip("ray")
    import json

    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.env import ENV_SECTIONS

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    drop_fake_modules()
    monkeypatch.syspath_prepend(FAKES)
    monkeypatch.setenv(ENV_SECTIONS, json.dumps(R3_SECTIONS))
    runtime_env = autopatch.job_runtime_env({"env_vars": {"PYTHONPATH": os.pathsep.join([FAKES, REPO, *sys.path])}})
    monkeypatch.delenv(ENV_SECTIONS)  # the driver runs unpatched: whatever the worker shows, it did itself
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
    yield ray
    ray.shutdown()
    drop_fake_modules()


class _Raise:
    def __init__(self, engine):
        self.engine = engine

    def enter_infer_mode(self):
        raise RuntimeError(f"actor_rollout={getattr(self.engine, '_r3_actor_rollout', None)}")


def test_worker_processes_patch_before_ray_binds_actor_methods(ray_job):
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase

    assert not getattr(ActorHybridWorkerBase.generate_sequences, "__r3_mindspeed_rl_worker__", False)

    class Probe(ActorHybridWorkerBase):
        def __init__(self):
            self.inference_model = SimpleNamespace()
            self.sharding_manager = _Raise(self.inference_model)
            self.enable_partial_rollout = False

        def where(self):
            from mindspeed_rl_r3.integration.runtime import active

            return os.getpid(), active() is not None

    probe = ray_job.remote(Probe).remote()
    pid, active = ray_job.get(probe.where.remote())
    assert pid != os.getpid() and active
    with pytest.raises(ray_job.exceptions.RayTaskError, match="actor_rollout=True"):
        ray_job.get(probe.generate_sequences.remote())  # Ray called the patched method it bound at load
