"""Ray actor classes hold their own copies of a worker class's methods; refresh the copies a patch made stale.

``@ray.remote`` on a class builds the actor class and copies every method into it, inherited ones included (Ray's
tracing wrappers, ``ray.util.tracing.tracing_helper._inject_tracing_into_class``), when the decorated class is
defined. MindSpeed-RL decorates its workers inside the modules that define their bases (``ActorHybridWorker`` in
``actor_hybrid_worker``), and the package patches a module only after it has executed, so the actor class keeps the
unpatched methods, and the process that creates the actors pickles those copies to them. After each patch, every
actor class of a loaded MindSpeed-RL module gets its stale copies re-made from the patched methods, through Ray's
own wrapper where it exists.
"""

from __future__ import annotations

import inspect
import sys

UPSTREAM_PREFIX = "mindspeed_rl."


def _actor_classes() -> list[type]:
    classes = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(UPSTREAM_PREFIX):
            continue
        for value in list(vars(module).values()):
            modified = getattr(getattr(value, "__ray_metadata__", None), "modified_class", None)
            if isinstance(modified, type) and modified not in classes:
                classes.append(modified)
    return classes


def _stale(actor: type) -> list[str]:
    """Copied methods whose source is no longer what the actor's original class resolves the name to."""
    original = actor.__ray_actor_class__
    stale = []
    for attr, copied in list(vars(actor).items()):
        source = inspect.getattr_static(original, attr, None)  # a plain function of the worker class or its bases
        traced = getattr(copied, "__ray_tracing_wrapped__", False)
        if traced and inspect.isfunction(source) and getattr(copied, "__wrapped__", None) is not source:
            stale.append(attr)
    return stale


def _rewrap(actor: type, names: list[str]) -> None:
    try:
        from ray.util.tracing.tracing_helper import _inject_tracing_into_class
    except ImportError:  # a Ray without the helper: the plain patched methods (tracing off is Ray's default)
        for attr in names:
            setattr(actor, attr, getattr(actor.__ray_actor_class__, attr))
        return
    for attr in names:
        delattr(actor, attr)  # now resolved through the patched class; Ray wraps it as at decoration
    _inject_tracing_into_class(actor)


def refresh() -> list[str]:
    """Re-make stale method copies in every loaded MindSpeed-RL actor class; returns ``Class.method`` refreshed."""
    refreshed: list[str] = []
    for actor in _actor_classes():
        names = _stale(actor)
        if names:
            _rewrap(actor, names)
            refreshed += [f"{actor.__name__}.{attr}" for attr in names]
    return refreshed


def stale_methods() -> list[str]:
    """``Class.method`` of every actor-class copy that differs from its patched source (``[]``: none)."""
    return [f"{actor.__name__}.{attr}" for actor in _actor_classes() for attr in _stale(actor)]


