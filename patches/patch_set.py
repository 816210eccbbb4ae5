"""Reversible attribute patches: what one patch module installed, so ``apply()`` is idempotent and ``undo()`` exact.

A wrapper is marked with the patch set's name; wrapping an attribute whose chain of ``__wrapped__`` decorators
already carries the mark is a no-op (MindSpeed's patch manager, for one, stacks its own decorators over ours). On a
class, the attribute must be defined by that class itself (not inherited): patching the class that defines a method
is what makes every subclass, and Ray's actor classes built from them later, see the patch.

Every patch set is listed in :data:`PATCH_SETS`, so :func:`mindspeed_rl_r3.patches.installed` and
:func:`mindspeed_rl_r3.patches.undo_all` see every patch of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CHAIN_LIMIT = 64  # decorators deep; a longer chain is a cycle
_INHERITED = object()  # stands for "no attribute of the class's own" among the originals


class PatchError(RuntimeError):
    """An upstream target is missing or not what the patch was written against; the message names it."""


def _describe(owner: Any, attr: str) -> str:
    name = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", type(owner).__name__)
    module = getattr(owner, "__module__", None)
    if isinstance(owner, type) and module:
        return f"{module}.{name}.{attr}"
    return f"{getattr(owner, '__name__', name)}.{attr}"


def carries_mark(fn: Any, mark: str) -> bool:
    """Whether ``fn`` or any decorator it wraps (``__wrapped__``) carries ``mark``."""
    for _ in range(_CHAIN_LIMIT):
        if fn is None:
            return False
        if getattr(fn, mark, False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


class PatchSet:
    """The patches one module installs; ``mark`` tags its wrappers, ``name`` is the patch module's."""

    def __init__(self, mark: str, name: str | None = None) -> None:
        self.mark = mark
        self.name = name or mark.strip("_").removeprefix("r3_")
        self._installed: list[tuple[Any, str, Any, str]] = []
        PATCH_SETS.append(self)

    def current(self, owner: Any, attr: str) -> Any:
        if isinstance(owner, type):
            if attr not in owner.__dict__:
                raise PatchError(f"{_describe(owner, attr)} is not defined by {owner.__qualname__} itself")
            return owner.__dict__[attr]
        if not hasattr(owner, attr):
            raise PatchError(f"{_describe(owner, attr)} does not exist")
        return getattr(owner, attr)

    def is_patched(self, owner: Any, attr: str) -> bool:
        return carries_mark(self.current(owner, attr), self.mark)

    def wrap(self, owner: Any, attr: str, wrapper: Callable[[Any], Any], *, inherited: bool = False) -> str | None:
        """Replace ``owner.attr`` by ``wrapper(original)``; returns the patched path, ``None`` if already done.

        ``inherited=True`` patches one class only, over a method it inherits (undo deletes the override again).
        """
        if inherited and isinstance(owner, type) and attr not in owner.__dict__:
            original, restore = getattr(owner, attr), _INHERITED
        else:
            original = restore = self.current(owner, attr)
        if carries_mark(original, self.mark):
            return None
        patched = wrapper(original)
        setattr(patched, self.mark, True)
        setattr(owner, attr, patched)
        path = _describe(owner, attr)
        self._installed.append((owner, attr, restore, path))
        return path

    def undo(self) -> list[str]:
        """Restore every original, newest first; returns the restored paths."""
        restored = []
        while self._installed:
            owner, attr, original, path = self._installed.pop()
            if original is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
            restored.append(path)
        return restored

    @property
    def installed(self) -> list[str]:
        return [path for *_, path in self._installed]


# Every patch set of the process, in creation order (patch modules create theirs at import).
PATCH_SETS: list[PatchSet] = []
