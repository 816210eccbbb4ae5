"""Small pieces of the integration: the Megatron-side routing spec and the patch bookkeeping. The import hook and
the LoRA fixes on the real MindSpeed-RL run in tests/upstream/test_worker_lifecycle.py."""

import types

import pytest

from mindspeed_rl_r3.integration.feed import parse_noop_layers, spec_from_megatron
from mindspeed_rl_r3.patches.patch_set import PatchError, PatchSet
from mindspeed_rl_r3.routing import RoutingError


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
