"""What a patch attaches to upstream, and the check ``doctor`` runs for it."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PatchTarget:
    """One upstream attribute a patch wraps or replaces.

    ``path`` is ``package.module.Attr.sub``; ``versions`` are the upstream releases the patch was written against;
    ``parameters`` are the leading parameter names the patch relies on.
    """

    path: str
    versions: tuple[str, ...]
    parameters: tuple[str, ...] = ()

    def resolve(self) -> Any:
        """The live attribute, or raise ImportError / AttributeError."""
        parts = self.path.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for name in parts[split:]:
                obj = getattr(obj, name)
            return obj
        raise ImportError(f"no importable module in {self.path}")

    def check(self, installed_version: str | None = None) -> dict[str, Any]:
        """``{"name", "found", "compatible", "version_known", "detail"}`` for doctor."""
        result: dict[str, Any] = {"name": self.path, "versions": list(self.versions), "installed": installed_version}
        try:
            obj = inspect.unwrap(self.resolve())
        except (ImportError, AttributeError) as err:
            return result | {"found": False, "compatible": False, "version_known": False, "detail": str(err)}
        found_params: tuple[str, ...] = ()
        if callable(obj):
            try:
                found_params = tuple(inspect.signature(obj).parameters)
            except (TypeError, ValueError):
                found_params = ()
        compatible = found_params[: len(self.parameters)] == self.parameters
        detail = "" if compatible else f"expected parameters {self.parameters}, found {found_params}"
        known = installed_version is not None and any(installed_version.startswith(v) for v in self.versions)
        return result | {"found": True, "compatible": compatible, "version_known": known, "detail": detail}
