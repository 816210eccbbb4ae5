"""Reversible attribute patches: what one patch module installed, so ``apply()`` is idempotent and ``undo()`` exact.

A wrapper is marked with the patch set's name; wrapping an attribute that already carries the mark is a no-op. On a
class, the attribute must be defined by that class itself (not inherited): patching the class that defines a method
is what makes every subclass, and Ray's actor classes built from them later, see the patch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PatchError(RuntimeError):
    """An upstream target is missing or not what the patch was written against; the message names it."""


def _describe(owner: Any, attr: str) -> str:
    name = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", type(owner).__name__)
    module = getattr(owner, "__module__", None)
    if isinstance(owner, type) and module:
        return f"{module}.{name}.{attr}"
    return f"{getattr(owner, '__name__', name)}.{attr}"


class PatchSet:
    """The patches one module installs; ``mark`` tags its wrappers."""

    def __init__(self, mark: str) -> None:
        self.mark = mark
        self._installed: list[tuple[Any, str, Any, str]] = []

    def current(self, owner: Any, attr: str) -> Any:
        if isinstance(owner, type):
            if attr not in owner.__dict__:
                raise PatchError(f"{_describe(owner, attr)} is not defined by {owner.__qualname__} itself")
            return owner.__dict__[attr]
        if not hasattr(owner, attr):
            raise PatchError(f"{_describe(owner, attr)} does not exist")
        return getattr(owner, attr)

    def is_patched(self, owner: Any, attr: str) -> bool:
        return getattr(self.current(owner, attr), self.mark, False)

    def wrap(self, owner: Any, attr: str, wrapper: Callable[[Any], Any]) -> str | None:
        """Replace ``owner.attr`` by ``wrapper(original)``; returns the patched path, ``None`` if already done."""
        original = self.current(owner, attr)
        if getattr(original, self.mark, False):
            return None
        patched = wrapper(original)
        setattr(patched, self.mark, True)
        setattr(owner, attr, patched)
        path = _describe(owner, attr)
        self._installed.append((owner, attr, original, path))
        return path

    def undo(self) -> list[str]:
        """Restore every original, newest first; returns the restored paths."""
        restored = []
        while self._installed:
            owner, attr, original, path = self._installed.pop()
            setattr(owner, attr, original)
            restored.append(path)
        return restored

    @property
    def installed(self) -> list[str]:
        return [path for *_, path in self._installed]
