"""Ray's ``@ray.remote`` copies a class's methods, inherited ones included, into the actor class it builds; a patch
installed after the decoration (as the package's post-import hook does, since MindSpeed-RL decorates its workers in
the modules that define their bases) must reach those copies. Real Ray, no cluster: decoration needs none."""

from __future__ import annotations

import sys
import types

import pytest

ray = pytest.importorskip("ray")

from mindspeed_rl_r3.patches import ray_actor_methods  # noqa: E402
from mindspeed_rl_r3.patches.patch_set import PatchSet  # noqa: E402

MODULE = "mindspeed_rl.r3_test_workers"  # scanned like MindSpeed-RL's own worker modules


@pytest.fixture
def worker_module():
    """A module shaped like ``actor_hybrid_worker``: a base class, and a Ray actor decorated from a subclass."""
    module = types.ModuleType(MODULE)

    class Base:
        def dispatch(self) -> str:
            return "upstream"

        def other(self) -> str:
            return "untouched"

    class Worker(Base):
        pass

    Base.__module__ = Worker.__module__ = MODULE
    module.Base, module.Worker = Base, ray.remote(Worker)
    sys.modules[MODULE] = module
    patches = PatchSet("__r3_test_actor_methods__")
    yield module, patches
    patches.undo()
    del sys.modules[MODULE]


def _actor_instance(module):
    return module.Worker.__ray_metadata__.modified_class()


def test_ray_copies_methods_at_decoration(worker_module):
    module, patches = worker_module
    patches.wrap(module.Base, "dispatch", lambda fn: lambda self: "patched")
    assert module.Base().dispatch() == "patched"
    assert _actor_instance(module).dispatch() == "upstream"  # the defect: the actor keeps the old method
    assert ray_actor_methods.stale_methods() == ["Worker.dispatch"]


def test_refresh_remakes_only_the_stale_copies(worker_module):
    module, patches = worker_module
    untouched = vars(module.Worker.__ray_metadata__.modified_class)["other"]
    patches.wrap(module.Base, "dispatch", lambda fn: lambda self: f"patched({fn(self)})")
    assert ray_actor_methods.refresh() == ["Worker.dispatch"]
    actor = _actor_instance(module)
    assert actor.dispatch() == "patched(upstream)" and actor.other() == "untouched"
    copied = vars(module.Worker.__ray_metadata__.modified_class)
    assert copied["other"] is untouched and getattr(copied["dispatch"], "__ray_tracing_wrapped__", False)
    assert ray_actor_methods.stale_methods() == [] and ray_actor_methods.refresh() == []
    patches.undo()  # undoing the patch makes the refreshed copy stale again; a refresh restores the original
    assert ray_actor_methods.refresh() == ["Worker.dispatch"] and _actor_instance(module).dispatch() == "upstream"
