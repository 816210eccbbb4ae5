"""Import one real MindSpeed-LLM module without running ``mindspeed_llm/__init__.py``.

That package initialiser runs MindSpeed-LLM's whole feature adaptor on import: it parses ``sys.argv`` as training
arguments and applies every MindSpeed patch to megatron-core (NPU kernels included), which would change megatron for
every later test of the session. The modules under test (the MoE router, the LoRA grouped experts) are plain source
files; their parent packages are registered here as path-only packages, so only the module's own source (and what it
imports) runs. On exit ``sys.modules`` holds the ``mindspeed_llm`` entries it held before.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = "mindspeed_llm"


def _bare_package(name: str, folder: Path) -> types.ModuleType:
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__file__ = str(folder / "__init__.py")
    return package


@contextlib.contextmanager
def mindspeed_llm_modules(upstream: Path, *names: str) -> Iterator[list[Any]]:
    """The real ``mindspeed_llm`` modules ``names`` (dotted), imported with path-only parent packages."""
    saved = {m: sys.modules.pop(m) for m in [m for m in sys.modules if m == ROOT or m.startswith(f"{ROOT}.")]}
    base = Path(upstream) / "MindSpeed-LLM"
    try:
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if package not in sys.modules:
                    sys.modules[package] = _bare_package(package, base.joinpath(*parts[:i]))
        yield [importlib.import_module(name) for name in names]
    finally:
        for name in [m for m in sys.modules if m == ROOT or m.startswith(f"{ROOT}.")]:
            sys.modules.pop(name)
        sys.modules.update(saved)
