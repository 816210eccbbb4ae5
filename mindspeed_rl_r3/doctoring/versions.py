"""Installed versions for ``doctor``, read without importing what must not be imported.

Versions come from package metadata first, ``__version__`` second (imported only for harmless packages), the package
source third. torch_npu, vllm, vllm_ascend, mindspeed, mindspeed_llm and mindspeed_rl are never imported for a
version; importing them at all is safe only when torch_npu is absent, is the CPU backend's stand-in, or an Ascend
toolkit is present (:func:`import_is_safe`). Upstream checkouts name their commit in ``.git`` or a ``COMMIT`` file.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from mindspeed_rl_r3.integration.env import loaded_cpu_backend

# Reported package -> (distribution names, top-level module, may be imported for __version__).
PACKAGES: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "torch": (("torch",), "torch", True),
    "torch_npu": (("torch_npu", "torch-npu"), "torch_npu", False),
    "vllm": (("vllm",), "vllm", False),
    "vllm_ascend": (("vllm_ascend", "vllm-ascend"), "vllm_ascend", False),
    "megatron": (("megatron-core", "megatron_core", "megatron-lm"), "megatron", False),
    "mindspeed": (("mindspeed",), "mindspeed", False),
    "mindspeed_llm": (("mindspeed_llm", "mindspeed-llm"), "mindspeed_llm", False),
    "mindspeed_rl": (("mindspeed_rl", "mindspeed-rl"), "mindspeed_rl", False),
    "ray": (("ray",), "ray", True),
    "hydra": (("hydra-core", "hydra_core"), "hydra", True),
}
NPU_PACKAGES = frozenset({"torch_npu", "vllm", "vllm_ascend", "mindspeed", "mindspeed_llm", "mindspeed_rl"})
ASCEND_DIRS = ("/usr/local/Ascend/ascend-toolkit", "/usr/local/Ascend/cann")


def module_spec(name: str):
    try:
        return importlib.util.find_spec(name)  # top-level names only: this never imports a parent package
    except (ImportError, ValueError):
        return None


def package_dir(top: str) -> Path | None:
    """Directory of an importable top-level package (or the file of a module), found without importing it."""
    spec = module_spec(top)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else None


def _literal_assignments(path: Path) -> dict[str, Any]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError):
        return {}
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    with contextlib.suppress(ValueError, TypeError, SyntaxError):  # not a literal: skip it
                        values[target.id] = ast.literal_eval(node.value)
    return values


def source_version(directory: Path) -> str | None:
    """``__version__`` (or megatron's MAJOR.MINOR.PATCH) from the package's source files, without importing."""
    if directory.is_file():
        return _literal_assignments(directory).get("__version__")
    for relative in ("__init__.py", "version.py", "_version.py", "core/package_info.py"):
        values = _literal_assignments(directory / relative)
        if isinstance(values.get("__version__"), str):
            return values["__version__"]
        if isinstance(values.get("version"), str):
            return values["version"]
        if {"MAJOR", "MINOR", "PATCH"} <= values.keys():
            return f"{values['MAJOR']}.{values['MINOR']}.{values['PATCH']}"
    return None


def package_version(name: str) -> str | None:
    """Installed version of a reported package: metadata, then ``__version__`` (import only where harmless),
    then the package source; ``"unknown"`` when importable but unversioned; None when not installed."""
    dists, top, may_import = PACKAGES[name]
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    directory = package_dir(top)
    if directory is None:
        return None
    if may_import:
        try:
            version = getattr(importlib.import_module(top), "__version__", None)
            if version:
                return str(version)
        except Exception:  # a broken install is reported as unknown, not raised
            pass
    return source_version(directory) or "unknown"


def ascend_runtime_present() -> bool:
    if any(os.environ.get(v) for v in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")):
        return True
    return any(Path(d).is_dir() for d in ASCEND_DIRS)


def import_is_safe(top: str) -> bool:
    """Whether importing top-level package ``top`` cannot pull a torch_npu without its runtime into this process."""
    if top not in NPU_PACKAGES:
        return True
    # with the CPU backend installed, torch_npu is its stand-in, which loads no NPU library
    return module_spec("torch_npu") is None or ascend_runtime_present() or loaded_cpu_backend() is not None


def git_commit(directory: Path) -> str | None:
    """HEAD commit of the checkout containing ``directory``, read from ``.git`` files (no git process); for a
    source export without ``.git``, the hash its ``COMMIT`` file records (as ``../shared/upstream/*`` have)."""
    with contextlib.suppress(OSError, IndexError):
        return (directory / "COMMIT").read_text(encoding="utf-8").split()[0]
    for parent in (directory, *directory.parents):
        git = parent / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            text = git.read_text(encoding="utf-8", errors="replace").strip()
            git = (parent / text.split(":", 1)[1].strip()) if text.startswith("gitdir:") else git
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text(encoding="utf-8").strip()
        except OSError:
            return None
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        for refs_dir in (git, _common_dir(git)):
            ref_file = refs_dir / ref
            if ref_file.is_file():
                return ref_file.read_text(encoding="utf-8").strip() or None
            packed = refs_dir / "packed-refs"
            if packed.is_file():
                for line in packed.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.endswith(f" {ref}"):
                        return line.split()[0]
        return None
    return None


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    if common.is_file():
        return (git / common.read_text(encoding="utf-8").strip()).resolve()
    return git
