"""In-process stand-ins for Ray actors, so fakes of MindSpeed-RL's Ray actors run in the test process.

``inline_remote(Cls)`` returns an object whose ``.remote(*a, **kw)`` builds ``Cls(*a, **kw)`` and returns a handle;
``handle.method.remote(...)`` calls the method at once and returns its result. Tests using them patch ``ray.get``
to return plain values unchanged (fixture ``inline_ray``).
"""

from __future__ import annotations

from typing import Any


class _Method:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


class InlineHandle:
    def __init__(self, instance: Any) -> None:
        self._instance = instance

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._instance, name)
        return _Method(attr) if callable(attr) else attr

    @property
    def instance(self) -> Any:
        return self._instance


class InlineActorClass:
    def __init__(self, cls: type) -> None:
        self.__ray_actor_class__ = cls
        self.__name__ = cls.__name__

    def remote(self, *args: Any, **kwargs: Any) -> InlineHandle:
        return InlineHandle(self.__ray_actor_class__(*args, **kwargs))

    def options(self, **_: Any) -> InlineActorClass:
        return self


def inline_remote(cls: type) -> InlineActorClass:
    return InlineActorClass(cls)


def plain_get(value: Any, *args: Any, **kwargs: Any) -> Any:
    """``ray.get`` for inline handles: values (and lists of them) are returned as they are."""
    return value
