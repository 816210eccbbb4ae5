"""The patch registry drives every list of patch modules; the generated inventory is current; every patch undoes
through its PatchSet, and ``patches.undo_all()`` restores the process exactly."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from mindspeed_rl_r3 import autopatch, pins
from mindspeed_rl_r3.doctor import REQUIRED
from mindspeed_rl_r3.patches import PATCH_MODULES, installed, inventory, registry, undo_all
from mindspeed_rl_r3.patches.patch_set import PatchError, PatchSet

PATCHES_DIR = Path(registry.__file__).parent
HELPERS = {"__init__", "patch_set", "targets", "registry", "inventory", "mindspeed_rl_integration", "ray_actor_methods"}


def test_inventory_is_up_to_date():
    assert inventory.README.read_text(encoding="utf-8") == inventory.render(), (
        f"patches/README.md is stale: run `{inventory.COMMAND}`"
    )
    assert inventory.main(["--check"]) == 0


def test_inventory_names_every_target_and_the_upstream_fixes():
    text = inventory.render()
    for record in registry.RECORDS:
        assert f"## `{record.name}`" in text
        for target in record.targets():
            assert f"`{target.path}`" in text
    assert ".base_layer" in text and "prompt_token_ids" in text and "weight1/weight2" in text
    assert pins.MINDSPEED_RL in text and pins.VLLM_ASCEND in text


def test_every_patch_module_is_a_record():
    modules = {p.stem for p in PATCHES_DIR.glob("*.py")}
    assert modules - HELPERS == set(registry.BY_NAME)


def test_lists_derive_from_the_registry():
    assert "vllm_capture" in PATCH_MODULES and "driver" in PATCH_MODULES
    assert set(PATCH_MODULES) == {r.name for r in registry.RECORDS if r.kind != "stand-in"}
    assert REQUIRED["cpu"] == {"megatron_router", "hf_qwen3_moe", "peft_megatron"}
    assert {"vllm_ascend_capture", "mindspeed_rl_lora", "mindspeed_rl_replay"} <= REQUIRED["npu"]
    from mindspeed_rl_r3.patches import mindspeed_rl_integration

    assert sorted(autopatch.TARGET_MODULES) == sorted(mindspeed_rl_integration.MODULE_PATCHES)
    assert autopatch.DRIVER_TRIGGER == "mindspeed_rl"


@pytest.mark.parametrize("record", registry.checked(), ids=lambda r: r.name)
def test_record_module_declares_targets_and_undo(record):
    module = record.load()
    assert module.TARGETS, record.name
    if record.kind == "patch":
        assert callable(module.apply)
        # a record says it cannot be undone only where the module has no undo() to offer
        assert callable(getattr(module, "undo", None)) == record.reversible, record.name


def test_pins_are_not_repeated_in_patch_modules():
    hashes = (pins.MINDSPEED_RL, pins.MINDSPEED, pins.MINDSPEED_LLM[:7], pins.VLLM_ASCEND)
    for path in PATCHES_DIR.glob("*.py"):
        literals = re.findall(r"""["']([0-9a-f]{7,40})["']""", path.read_text(encoding="utf-8"))
        assert not [h for h in literals if h.startswith(hashes)], f"{path.name} repeats a pinned commit"


def test_undo_all_restores_every_patch_exactly():
    import hydra
    import ray
    from megatron.core.transformer.moe import router
    from peft.tuners.lora import model as lora_model
    from peft.tuners.lora import tp_layer

    from mindspeed_rl_r3.patches import driver, megatron_router, peft_megatron

    previously = installed()  # e.g. the session's megatron fixture: re-applied at the end
    undo_all()
    def attach_points() -> tuple:
        return (
            router.TopKRouter.__dict__["routing"],
            router.topk_softmax_with_capacity,
            tp_layer.LoraParallelLinear.__dict__["update_layer"],
            getattr(lora_model, "dispatch_megatron", None),
            hydra.main,
            ray.init,
        )

    before = attach_points()
    assert megatron_router.apply() and peft_megatron.apply() and driver.apply() == ["hydra.main", "ray.init"]
    assert megatron_router.apply() == [] and driver.apply() == []  # idempotent
    now = installed()
    assert now["megatron_router"] == [
        "megatron.core.transformer.moe.router.TopKRouter.routing",
        "megatron.core.transformer.moe.router.topk_softmax_with_capacity",
    ]
    assert now["driver"] == ["hydra.main", "ray.init"] and "peft_megatron" in now
    assert hydra.main is not before[4] and megatron_router.is_wrapped(router.TopKRouter.routing)

    restored = undo_all()
    assert set(restored) >= {"megatron_router", "peft_megatron", "driver"}
    assert all(a is b for a, b in zip(attach_points(), before, strict=True))
    assert installed() == {} and undo_all() == {}
    for name in previously:
        importlib.import_module(f"mindspeed_rl_r3.patches.{name}").apply()


class _Base:
    def method(self) -> str:
        return "base"


def test_patch_set_inherited_override_is_deleted_on_undo():
    class Child(_Base):
        pass

    patches = PatchSet("__r3_test_inherited__")
    with pytest.raises(PatchError, match="not defined by"):
        patches.wrap(Child, "method", lambda f: f)
    path = patches.wrap(Child, "method", lambda f: lambda self: f"patched {f(self)}", inherited=True)
    assert path.endswith("Child.method") and Child().method() == "patched base" and _Base().method() == "base"
    assert patches.wrap(Child, "method", lambda f: f, inherited=True) is None  # marked: idempotent
    assert patches.undo() == [path] and "method" not in Child.__dict__ and Child().method() == "base"


def test_patch_set_sees_its_mark_under_other_decorators():
    import functools

    class Owner:
        def method(self) -> int:
            return 1

    patches = PatchSet("__r3_test_chain__")
    patches.wrap(Owner, "method", lambda f: functools.wraps(f)(lambda self: f(self) + 1))
    inner = Owner.__dict__["method"]
    Owner.method = functools.wraps(inner)(lambda self: inner(self) * 10)  # someone else's decorator on top
    assert patches.is_patched(Owner, "method") and patches.wrap(Owner, "method", lambda f: f) is None
    assert Owner().method() == 20
    patches.undo()
