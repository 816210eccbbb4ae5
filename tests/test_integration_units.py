"""Small pieces of the integration: the Megatron-side routing spec, the patch bookkeeping, the import hook."""

import importlib
import sys
import types

import pytest

from mindspeed_rl_r3.integration.feed import parse_noop_layers, spec_from_megatron
from mindspeed_rl_r3.patches.patch_set import PatchError, PatchSet
from mindspeed_rl_r3.routing import RoutingError
from tests.integration_support import fakes, integration  # noqa: F401  (fixtures)


def test_training_spec_follows_megatron_layer_numbering():
    assert spec_from_megatron(48, 128, 8).moe_layers == tuple(range(48))
    spec = spec_from_megatron(6, 8, 2, noop_layers=(0, 5))
    assert spec.num_layers == 4 and spec.moe_layers == (0, 1, 2, 3)
    assert spec_from_megatron(4, 8, 2, moe_layer_freq=2).moe_layers == (0, 2)
    assert spec_from_megatron(4, 8, 2, moe_layer_freq=[0, 1, 1, 1]).moe_layers == (1, 2, 3)
    assert spec_from_megatron(4, 8, 2, first_k_dense_replace=1).moe_layers == (1, 2, 3)
    assert parse_noop_layers("5, 95") == (5, 95) and parse_noop_layers(None) == () and parse_noop_layers([3]) == (3,)
    with pytest.raises(RoutingError, match="noop_layers must be"):
        parse_noop_layers("a,b")
    with pytest.raises(RoutingError, match="moe_layer_freq has 3 entries for 4 layers"):
        spec_from_megatron(4, 8, 2, moe_layer_freq=[1, 1, 1])


def test_patch_set_is_idempotent_reversible_and_refuses_inherited_targets():
    class Base:
        def run(self):
            return "base"

    class Child(Base):
        pass

    module = types.ModuleType("m")
    module.helper = lambda: 1
    patches = PatchSet("__test_mark__")

    def wrap(fn):
        def wrapped(*args):
            return ("wrapped", fn(*args))

        return wrapped

    assert patches.wrap(Base, "run", wrap).endswith("Base.run")
    assert patches.wrap(Base, "run", wrap) is None and Child().run() == ("wrapped", "base")
    assert patches.wrap(module, "helper", wrap) == "m.helper" and module.helper() == ("wrapped", 1)
    with pytest.raises(PatchError, match=r"not defined by .*Child itself"):
        patches.wrap(Child, "run", wrap)
    with pytest.raises(PatchError, match="does not exist"):
        patches.wrap(module, "missing", wrap)
    assert len(patches.undo()) == 2 and Base().run() == "base" and module.helper() == 1 and patches.installed == []


def test_import_hook_patches_on_import_and_leaves_plain_jobs_alone(fakes, integration, monkeypatch):  # noqa: F811
    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.env import ENV_DISABLE

    autopatch.install()  # no sections in the environment yet
    from mindspeed_rl.models.loss import base_loss_func

    assert not getattr(base_loss_func.BaseLossFunc.compute_log_probs, "__r3_mindspeed_rl_replay__", False)
    sys.modules.pop("mindspeed_rl.models.loss.base_loss_func")
    integration()  # sections published; install() again is a no-op for the hook itself
    reloaded = importlib.import_module("mindspeed_rl.models.loss.base_loss_func")

    assert getattr(reloaded.BaseLossFunc.compute_log_probs, "__r3_mindspeed_rl_replay__", False)
    assert sum(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path) == 1
    assert reloaded.__loader__.get_source("mindspeed_rl.models.loss.base_loss_func")  # loader delegation
    monkeypatch.setenv(ENV_DISABLE, "1")
    assert autopatch.install() is False


def test_lora_fixes_follow_the_sections_and_are_undone(fakes, integration, monkeypatch):  # noqa: F811
    peft = pytest.importorskip("peft")
    monkeypatch.setattr(peft, "get_peft_model", peft.get_peft_model)
    original = peft.get_peft_model
    integration({"r3": {"mode": "R3"}, "lora_extras": {"lora_router_trainable": True}})
    from mindspeed_rl.workers import integrated_worker
    from mindspeed_rl.workers.resharding import weight_adaptor

    from mindspeed_rl_r3.patches import mindspeed_rl_integration

    mark = "__r3_mindspeed_rl_lora__"
    assert getattr(integrated_worker.IntegratedWorker.__ray_actor_class__.compute_ref_log_prob, mark, False)
    assert getattr(weight_adaptor.Qwen3MoeMVWeightAdaptor.replace_name_i2t, mark, False)
    assert peft.get_peft_model.router_trainable is True
    mindspeed_rl_integration.undo()
    assert peft.get_peft_model is original
    assert not getattr(weight_adaptor.Qwen3MoeMVWeightAdaptor.replace_name_i2t, mark, False)
