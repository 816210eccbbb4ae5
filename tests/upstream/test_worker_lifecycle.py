"""How the integration reaches MindSpeed-RL 05a90d77's real modules: the import hook patches a module as it is
imported (and leaves jobs without sections alone), the LoRA fixes follow the sections and are undone, and in a Ray
worker process the job's setup hook patches the real ``ActorHybridWorker`` before Ray binds its methods."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from tests.upstream.support import R3_SECTIONS

REPO = str(Path(__file__).resolve().parents[2])
LOSS_MODULE = "mindspeed_rl.models.loss.base_loss_func"


def test_import_hook_patches_on_import_and_leaves_plain_jobs_alone(integration, monkeypatch):
    """The real module is imported afresh with the hook installed, before and after the sections are published;
    the session's own module object is put back afterwards."""
    from mindspeed_rl.models import loss

    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.env import ENV_DISABLE

    monkeypatch.setitem(sys.modules, LOSS_MODULE, sys.modules[LOSS_MODULE])  # restored at teardown
    monkeypatch.setattr(loss, "base_loss_func", loss.base_loss_func)
    autopatch.install()  # no sections in the environment yet
    sys.modules.pop(LOSS_MODULE)
    plain = importlib.import_module(LOSS_MODULE)
    assert not getattr(plain.BaseLossFunc.compute_log_probs, "__r3_mindspeed_rl_replay__", False)

    sys.modules.pop(LOSS_MODULE)
    integration()  # sections published; install() again is a no-op for the hook itself
    reloaded = importlib.import_module(LOSS_MODULE)
    assert reloaded is not plain
    assert getattr(reloaded.BaseLossFunc.compute_log_probs, "__r3_mindspeed_rl_replay__", False)
    assert sum(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path) == 1
    assert "class BaseLossFunc" in reloaded.__loader__.get_source(LOSS_MODULE)  # loader delegation
    monkeypatch.setenv(ENV_DISABLE, "1")
    assert autopatch.install() is False


def test_lora_fixes_follow_the_sections_and_are_undone(integration, monkeypatch):
    import peft
    from mindspeed_rl.workers import integrated_worker
    from mindspeed_rl.workers.resharding import weight_adaptor

    from mindspeed_rl_r3.patches import mindspeed_rl_integration

    monkeypatch.setattr(peft, "get_peft_model", peft.get_peft_model)
    original = peft.get_peft_model
    worker = integrated_worker.IntegratedWorker.__ray_actor_class__
    adaptor = weight_adaptor.Qwen3MoeMVWeightAdaptor
    mark = "__r3_mindspeed_rl_lora__"
    integration({"r3": {"mode": "R3"}, "lora_extras": {"lora_router_trainable": True}})
    assert getattr(worker.compute_ref_log_prob, mark, False)
    assert getattr(adaptor.replace_name_i2t, mark, False)
    assert peft.get_peft_model.router_trainable is True
    mindspeed_rl_integration.undo()
    assert peft.get_peft_model is original
    assert not getattr(adaptor.replace_name_i2t, mark, False)
    assert not getattr(worker.compute_ref_log_prob, mark, False)


class _Raise:
    """A sharding manager whose ``enter_infer_mode`` (the first thing ``generate_sequences`` does) reports what the
    patched method set on the engine."""

    def __init__(self, engine):
        self.engine = engine

    def enter_infer_mode(self):
        raise RuntimeError(f"actor_rollout={getattr(self.engine, '_r3_actor_rollout', None)}")


def _probe_class():
    """The real ``ActorHybridWorker`` actor class with a constructor that builds nothing (upstream's reads the Ray
    NPU accelerator ids and builds Megatron and vLLM). Its methods stay the ones of the worker's own import."""
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorker

    class Probe(ActorHybridWorker.__ray_actor_class__):
        def __init__(self):
            from types import SimpleNamespace

            from mindspeed_rl.config_cls.rl_config import RLConfig

            self.rl_config = RLConfig({})
            self.inference_model = SimpleNamespace()
            self.sharding_manager = _Raise(self.inference_model)
            self.enable_partial_rollout = False

        def where(self):
            from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase

            from mindspeed_rl_r3.integration.runtime import active

            method = ActorHybridWorkerBase.generate_sequences
            return os.getpid(), active() is not None, bool(getattr(method, "__r3_mindspeed_rl_worker__", False))

    return Probe


def test_worker_processes_patch_before_ray_binds_actor_methods(ray_cluster):
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase

    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.env import ENV_SECTIONS
    from mindspeed_rl_r3.integration.runtime import active

    # the driver runs unpatched: whatever the worker shows, it did itself
    assert active() is None and not autopatch.installed()
    assert not getattr(ActorHybridWorkerBase.generate_sequences, "__r3_mindspeed_rl_worker__", False)
    env = {ENV_SECTIONS: json.dumps(R3_SECTIONS), "PYTHONPATH": os.pathsep.join([REPO, *sys.path])}
    probe = ray_cluster.remote(_probe_class()).options(runtime_env={"env_vars": env}).remote()
    try:
        pid, is_active, patched = ray_cluster.get(probe.where.remote(), timeout=120)
        assert pid != os.getpid() and is_active and patched
        with pytest.raises(ray_cluster.exceptions.RayTaskError, match="actor_rollout=True"):
            ray_cluster.get(probe.generate_sequences.remote(), timeout=60)  # the patched method Ray bound
    finally:
        ray_cluster.kill(probe)
    assert not getattr(ActorHybridWorkerBase.generate_sequences, "__r3_mindspeed_rl_worker__", False)
