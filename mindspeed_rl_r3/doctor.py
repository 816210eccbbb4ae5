"""``mindspeed-rl-r3 doctor``: installed versions and, for every patch target, found / signature compatible / version
known; by import where that is safe, by reading the source with ``ast`` otherwise (no import), so it also runs on a
CPU machine against upstream checkouts (``--upstream DIR``).

Where a target's answer comes from, in order:

1. an ``--upstream`` directory holding the target's module (a MindSpeed-RL, MindSpeed, MindSpeed-LLM or
   vllm-ascend checkout, or the package directory itself): parsed source, ``source = "upstream:<file>"``;
2. the patch module's own ``check()`` (which imports the target), when importing its packages is safe;
3. the installed package's source, parsed without import (``source = "installed-source:<file>"``), when importing
   is unsafe (torch_npu installed without an Ascend runtime would crash or hang) or when the import failed.

Importing torch_npu, vllm, vllm_ascend, mindspeed, mindspeed_llm or mindspeed_rl is considered safe when
torch_npu is absent (nothing can load NPU libraries; CPU builds import fine), is the CPU backend's stand-in
(:mod:`mindspeed_rl_r3.patches.cpu_backend` installed), or an Ascend toolkit is present (``ASCEND_HOME_PATH`` /
``ASCEND_TOOLKIT_HOME`` or ``/usr/local/Ascend/ascend-toolkit``). Versions are read
from package metadata first, ``__version__`` second, and for those six packages never by import.

Which targets must be found depends on the job: ``profile="npu"`` (the MindSpeed-RL job) requires the Megatron
router, the MindSpeed-LLM router registration, the vllm-ascend capture and the MindSpeed-RL LoRA weight-sync targets;
``profile="cpu"`` (the CPU reference pipeline) requires the Megatron router, transformers' Qwen3-MoE block and the
peft-on-Megatron repairs. Other targets are optional: reported, never failing. ``ok`` = every found target is
compatible and every required one is found.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from mindspeed_rl_r3.patches import PATCH_MODULES

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
# Packages whose version a target's `versions` tuple refers to (by top-level module).
VERSION_OF = {"megatron": "megatron", "vllm_ascend": "vllm_ascend", "transformers": "transformers"}
# Patch modules a job cannot run without; every other module in PATCH_MODULES is optional for that profile.
# (mindspeed_rl_lora / peft_megatron count once they are registered in PATCH_MODULES.)
REQUIRED = {
    "npu": frozenset(
        {
            "megatron_router",
            "mindspeed_llm_router",
            "vllm_ascend_capture",
            "mindspeed_rl_lora",
            "mindspeed_rl_trainer",
            "mindspeed_rl_worker",
            "mindspeed_rl_rollout",
            "mindspeed_rl_aqn",
            "mindspeed_rl_replay",
        }
    ),
    "cpu": frozenset({"megatron_router", "hf_qwen3_moe", "peft_megatron"}),
}
_ASCEND_DIRS = ("/usr/local/Ascend/ascend-toolkit", "/usr/local/Ascend/cann")


# ------------------------------------------------------------------------------------------------------ versions


def _module_spec(name: str):
    try:
        return importlib.util.find_spec(name)  # top-level names only: this never imports a parent package
    except (ImportError, ValueError):
        return None


def _package_dir(top: str) -> Path | None:
    """Directory of an importable top-level package (or the file of a module), found without importing it."""
    spec = _module_spec(top)
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


def _source_version(package_dir: Path) -> str | None:
    """``__version__`` (or megatron's MAJOR.MINOR.PATCH) from the package's source files, without importing."""
    if package_dir.is_file():
        return _literal_assignments(package_dir).get("__version__")
    for relative in ("__init__.py", "version.py", "_version.py", "core/package_info.py"):
        values = _literal_assignments(package_dir / relative)
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
    package_dir = _package_dir(top)
    if package_dir is None:
        return None
    if may_import:
        try:
            version = getattr(importlib.import_module(top), "__version__", None)
            if version:
                return str(version)
        except Exception:  # a broken install is reported as unknown, not raised
            pass
    return _source_version(package_dir) or "unknown"


def ascend_runtime_present() -> bool:
    if any(os.environ.get(v) for v in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")):
        return True
    return any(Path(d).is_dir() for d in _ASCEND_DIRS)


def import_is_safe(top: str) -> bool:
    """Whether importing top-level package ``top`` cannot pull a torch_npu without its runtime into this process."""
    if top not in NPU_PACKAGES:
        return True
    return _module_spec("torch_npu") is None or ascend_runtime_present() or _cpu_backend_installed()


def _cpu_backend_installed() -> bool:
    """torch_npu is :mod:`mindspeed_rl_r3.patches.cpu_backend`'s stand-in, which loads no NPU library."""
    backend = sys.modules.get("mindspeed_rl_r3.patches.cpu_backend")
    return backend is not None and backend.installed()


# ----------------------------------------------------------------------------------------------- reading source


def _git_commit(directory: Path) -> str | None:
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


class SourceIndex:
    """Finds a dotted target in Python source files under some roots, by ``ast`` only.

    A root is a directory that contains top-level packages (a checkout, or ``site-packages``); a directory that *is*
    a package (``.../vllm_ascend``) is accepted and its parent used. Follows ``from x import name`` re-exports,
    ``name = other`` aliases and base classes (within the indexed sources), up to a small depth.
    """

    def __init__(self, roots: Iterable[Path]):
        self.roots: list[Path] = []
        for root in roots:
            root = Path(root)
            if (root / "__init__.py").is_file() and not (root / root.name).is_dir():
                root = root.parent
            if root not in self.roots:
                self.roots.append(root)
        self._trees: dict[Path, ast.Module | None] = {}

    def module_file(self, module: str) -> Path | None:
        relative = Path(*module.split("."))
        for root in self.roots:
            for candidate in (root / relative.with_suffix(".py"), root / relative / "__init__.py"):
                if candidate.is_file():
                    return candidate
        return None

    def _tree(self, path: Path) -> ast.Module | None:
        if path not in self._trees:
            try:
                self._trees[path] = ast.parse(path.read_text(encoding="utf-8", errors="replace"), str(path))
            except (OSError, SyntaxError):
                self._trees[path] = None
        return self._trees[path]

    def locate(self, dotted: str) -> tuple[Path, str] | None:
        """(file, attribute path inside it) for the longest module prefix of ``dotted`` found under the roots."""
        parts = dotted.split(".")
        for split in range(len(parts) - 1, 0, -1):
            path = self.module_file(".".join(parts[:split]))
            if path is not None:
                return path, ".".join(parts[split:])
        return None

    def resolve(self, dotted: str) -> tuple[ast.AST, Path, bool] | str:
        """``(definition node, file, is_method)`` for a dotted target, or a string saying what is missing."""
        located = self.locate(dotted)
        if located is None:
            return f"no module of {dotted} under {[str(r) for r in self.roots]}"
        path, attrs = located
        return self._resolve_in(path, attrs.split("."), depth=0)

    def _resolve_in(self, path: Path, attrs: list[str], depth: int) -> tuple[ast.AST, Path, bool] | str:
        tree = self._tree(path)
        if tree is None:
            return f"{path} does not parse"
        if depth > 6:
            return f"{'.'.join(attrs)}: too many re-exports (last {path})"
        name, rest = attrs[0], attrs[1:]
        node = _find_top_level(tree.body, name)
        if node is None:
            return f"{name} is not defined in {path}"
        if isinstance(node, ast.ImportFrom | ast.Import):
            target = _import_target(node, name, path, self)
            if target is None:
                return f"{name} is imported in {path} from a module outside the indexed sources"
            module_path, original = target
            return self._resolve_in(module_path, [original, *rest], depth + 1)
        if isinstance(node, ast.Assign):  # alias: name = other_name
            if isinstance(node.value, ast.Name):
                return self._resolve_in(path, [node.value.id, *rest], depth + 1)
            return f"{name} in {path} is assigned from an expression; cannot read its signature without import"
        if not rest:
            return node, path, False
        if not isinstance(node, ast.ClassDef):
            return f"{name} in {path} is not a class, so it has no attribute {rest[0]}"
        return self._resolve_member(node, path, rest, depth)

    def _resolve_member(
        self, cls: ast.ClassDef, path: Path, rest: list[str], depth: int
    ) -> tuple[ast.AST, Path, bool] | str:
        member = _find_top_level(cls.body, rest[0])
        if member is not None and not isinstance(member, ast.ImportFrom | ast.Import):
            if len(rest) == 1:
                return member, path, isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(member, ast.ClassDef):
                return self._resolve_member(member, path, rest[1:], depth)
            return f"{cls.name}.{rest[0]} in {path} is not a class"
        for base in cls.bases:  # inherited: look in base classes we can see
            base_name = (
                base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            )
            if base_name is None or base_name == cls.name:
                continue
            found = self._resolve_in(path, [base_name, *rest], depth + 1)
            if not isinstance(found, str):
                return found
        return f"{cls.name}.{'.'.join(rest)} is not defined in {path} (nor in base classes found in the sources)"


def _binds(node: ast.stmt, name: str) -> bool:
    """Whether a top-level statement binds ``name`` (def, class, plain assignment or import)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.ImportFrom | ast.Import):
        return any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names)
    return False


def _find_top_level(body: list[ast.stmt], name: str) -> ast.stmt | None:
    """The last statement of a body (descending into if/try blocks) that binds ``name``."""
    found = None
    for node in body:
        if _binds(node, name):
            found = node
        elif isinstance(node, ast.If | ast.Try):
            blocks = [node.body, node.orelse]
            if isinstance(node, ast.Try):
                blocks += [node.finalbody, *[h.body for h in node.handlers]]
            for block in blocks:
                inner = _find_top_level(block, name)
                if inner is not None:
                    found = inner
    return found


def _import_target(
    node: ast.ImportFrom | ast.Import, name: str, path: Path, index: SourceIndex
) -> tuple[Path, str] | None:
    if isinstance(node, ast.Import):
        return None  # `import a.b as name` binds a module, not a callable target
    for alias in node.names:
        if (alias.asname or alias.name) != name:
            continue
        module = node.module or ""
        if node.level:  # relative import: resolve against this file's package
            package = path.parent
            for _ in range(node.level - 1):
                package = package.parent
            base = package / Path(*module.split(".")) if module else package
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate, alias.name
            return None  # `from . import name` where name is a submodule: a module, not a callable
        module_path = index.module_file(module)
        return (module_path, alias.name) if module_path is not None else None
    return None


def _parameters(node: ast.AST, is_method: bool) -> tuple[str, ...]:
    """Parameter names as ``inspect.signature`` reports them for the attribute looked up on its owner."""
    if isinstance(node, ast.ClassDef):
        init = _find_top_level(node.body, "__init__")
        if not isinstance(init, ast.FunctionDef | ast.AsyncFunctionDef):
            return ()
        return _parameters(init, True)[1:]  # a class's signature is __init__ without self
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return ()
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    if args.vararg:
        names.append(args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append(args.kwarg.arg)
    decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}
    if is_method and "classmethod" in decorators:
        names = names[1:]  # bound to the class when looked up on it
    return tuple(names)


def check_target_in_source(target: Any, index: SourceIndex, versions: Sequence[str] = ()) -> dict[str, Any]:
    """``PatchTarget.check``'s result computed from source: ``{"name", "found", "compatible", "version_known",
    "detail", "source", "versions", "installed"}``; ``versions`` are the candidate version strings of the
    source (package version, git commit)."""
    result: dict[str, Any] = {
        "name": target.path,
        "versions": list(target.versions),
        "installed": next(iter(versions), None),
    }
    found = index.resolve(target.path)
    known = any(str(c).startswith(v) for c in versions if c for v in target.versions)
    if isinstance(found, str):
        return result | {"found": False, "compatible": False, "version_known": known, "detail": found, "source": None}
    node, path, is_method = found
    params = _parameters(node, is_method)
    compatible = params[: len(target.parameters)] == tuple(target.parameters)
    detail = (
        "" if compatible else f"expected parameters {tuple(target.parameters)}, found {params} ({path}:{node.lineno})"
    )
    return result | {
        "found": True,
        "compatible": compatible,
        "version_known": known,
        "detail": detail,
        "source": str(path),
    }


# ------------------------------------------------------------------------------------------------------ targets


def _targets_of(module: Any) -> tuple[Any, ...]:
    targets = getattr(module, "TARGETS", ())
    return tuple(targets() if callable(targets) else targets)


def _top(path: str) -> str:
    return path.split(".", 1)[0]


def _upstream_versions(directory: Path, top: str) -> list[str]:
    """Candidate versions of package ``top`` inside an upstream checkout: source version, then git commit."""
    candidates = []
    package_dir = directory / top if (directory / top).is_dir() else directory
    version = _source_version(package_dir) if package_dir.exists() else None
    if version:
        candidates.append(version)
    commit = _git_commit(directory)
    if commit:
        candidates.append(commit)
    return candidates


def _relevant_megatron(results: list[dict[str, Any]], index: SourceIndex) -> list[dict[str, Any]]:
    """Mirror megatron_router.check(): core 0.16+ (``router_replay`` hook) vs 0.12 targets, decided from source."""
    hook = next((r for r in results if r["name"].endswith("topk_routing_with_score_function")), None)
    native = False
    if hook is not None and hook["found"]:
        found = index.resolve(hook["name"])
        native = not isinstance(found, str) and "router_replay" in _parameters(found[0], found[2])
    return [
        r
        for r in results
        if r["name"].endswith("TopKRouter.routing") or r["name"].endswith("topk_routing_with_score_function") == native
    ]


def _module_results(name: str, upstream: SourceIndex, upstream_dirs: list[Path]) -> list[dict[str, Any]]:
    """Check every target of one patch module; see the module docstring for the order of sources."""
    try:
        module = importlib.import_module(f"mindspeed_rl_r3.patches.{name}")
    except Exception as err:  # a broken patch module is a failed check, not a crash of doctor
        return [_failure(f"mindspeed_rl_r3.patches.{name}", f"patch module does not import: {err!r}", name)]
    targets = _targets_of(module)

    # 1. upstream checkouts: when they hold any of the module's targets, judge the whole module from source
    from_upstream: dict[str, dict[str, Any]] = {}
    for target in targets:
        located = upstream.locate(target.path)
        if located is None:
            continue
        owner = next((d for d in upstream_dirs if located[0].is_relative_to(d)), located[0].parent)
        result = check_target_in_source(target, upstream, _upstream_versions(owner, _top(target.path)))
        result["source"] = f"upstream:{result['source'] or located[0]}"
        from_upstream[target.path] = result

    results: list[dict[str, Any]] = []
    if not from_upstream and all(import_is_safe(_top(t.path)) for t in targets):
        # 2. the module's own check(), which imports; an import failure falls back to the installed source
        check = getattr(module, "check", None)
        try:
            own = list(check()) if callable(check) else [t.check(_installed_version(t.path)) for t in targets]
        except Exception as err:
            own = [_failure(f"mindspeed_rl_r3.patches.{name}.check", f"check() raised {err!r}", name)]
        by_name = {t.path: t for t in targets}
        for result in own:
            result = {"source": "import" if result.get("found") else None, **result}
            target = by_name.get(result["name"])
            # check() may add rows beyond its PatchTargets (e.g. a name-mapping probe of the unpatched upstream):
            # reported as diagnostics; doctor runs without patches applied, so they do not decide `ok`
            result["kind"] = (
                "target" if target is not None or result["name"].startswith("mindspeed_rl_r3.") else "diagnostic"
            )
            if not result.get("found") and target is not None and _package_dir(_top(target.path)) is not None:
                fallback = _installed_source_check(target)  # the import failed but the source is there: read it
                if fallback["found"]:
                    fallback["detail"] = f"{fallback['detail']} (import failed: {result.get('detail', '')})".strip()
                    result = fallback
            results.append(result)
    else:
        # 3. source only: upstream where given, the installed package's files otherwise
        for target in targets:
            if target.path in from_upstream:
                results.append(from_upstream[target.path])
            elif _package_dir(_top(target.path)) is not None:
                results.append(_installed_source_check(target))
            else:
                results.append(_missing(target))
        if name == "megatron_router":
            results = _relevant_megatron(results, SourceIndex([*upstream.roots, *_install_roots(targets)]))
    for result in results:
        result["module"] = name
        result.setdefault("kind", "target")
    return results


def _install_roots(targets: Iterable[Any]) -> list[Path]:
    roots = []
    for target in targets:
        package_dir = _package_dir(_top(target.path))
        if package_dir is not None:
            roots.append(package_dir.parent)
    return roots


def _installed_version(path: str) -> str | None:
    top = _top(path)
    if top in PACKAGES:
        version = package_version(top)
        return None if version == "unknown" else version
    try:
        return metadata.version(top)
    except metadata.PackageNotFoundError:
        return None


def _installed_source_check(target: Any) -> dict[str, Any]:
    index = SourceIndex(_install_roots([target]))
    version = _installed_version(target.path)
    result = check_target_in_source(target, index, [version] if version else [])
    if result["found"]:
        result["source"] = f"installed-source:{result['source']}"
    return result


def _missing(target: Any) -> dict[str, Any]:
    return {
        "name": target.path,
        "versions": list(target.versions),
        "installed": None,
        "found": False,
        "compatible": False,
        "version_known": False,
        "detail": f"package {_top(target.path)} is not installed and no --upstream directory holds it",
        "source": None,
    }


def _failure(name: str, detail: str, module: str) -> dict[str, Any]:
    return {
        "name": name,
        "found": False,
        "compatible": False,
        "version_known": False,
        "detail": detail,
        "source": None,
        "module": module,
    }


# ---------------------------------------------------------------------------------------------------------- run


def run_doctor(
    upstream_dirs: Sequence[str | os.PathLike] = (),
    as_json: bool = False,
    *,
    profile: str = "auto",
    modules: Sequence[str] | None = None,
    quiet: bool = False,
    stream: Any = None,
) -> dict[str, Any]:
    """Versions and patch-target checks; prints the report (JSON with ``as_json``) unless ``quiet``.

    ``upstream_dirs`` are source checkouts to read instead of the installed packages. ``profile`` is ``"npu"``,
    ``"cpu"`` or ``"auto"`` (npu when torch_npu is installed or upstream directories are given). ``modules``
    restricts the check to some of ``PATCH_MODULES`` (default: all; an unknown name raises ValueError). Returns
    ``{"versions", "targets": [{"name", "found", "compatible", "version_known", "detail", "source", "module",
    "required", "kind"}], "upstream", "profile", "missing_required", "missing_optional", "incompatible",
    "diagnostics_failed", "ok"}``. ``kind`` is ``"target"`` for a declared PatchTarget (or a patch module that fails
    to import / check) and ``"diagnostic"`` for extra rows a module's ``check()`` adds; only targets decide ``ok``.
    Raises FileNotFoundError naming an upstream directory that does not exist.
    """
    dirs = [Path(d).expanduser().resolve() for d in upstream_dirs]
    for directory in dirs:
        if not directory.is_dir():
            raise FileNotFoundError(f"upstream directory not found: {directory}")
    if profile == "auto":
        profile = "npu" if dirs or _module_spec("torch_npu") is not None else "cpu"
    if profile not in REQUIRED:
        raise ValueError(f"profile must be 'npu', 'cpu' or 'auto', got {profile!r}")
    selected = list(PATCH_MODULES) if modules is None else list(modules)
    unknown = sorted(set(selected) - set(PATCH_MODULES))
    if unknown:
        raise ValueError(f"unknown patch modules {unknown}; known: {sorted(PATCH_MODULES)}")
    index = SourceIndex(dirs)
    targets: list[dict[str, Any]] = []
    for name in selected:
        for result in _module_results(name, index, dirs):
            result["required"] = name in REQUIRED[profile]
            targets.append(result)
    versions = {name: package_version(name) for name in PACKAGES}
    checked = [t for t in targets if t["kind"] == "target"]
    missing_required = [t["name"] for t in checked if t["required"] and not t["found"]]
    incompatible = [t["name"] for t in checked if t["found"] and not t["compatible"]]
    report = {
        "versions": versions,
        "targets": targets,
        "upstream": [{"dir": str(d), "commit": _git_commit(d)} for d in dirs],
        "profile": profile,
        "missing_required": missing_required,
        "missing_optional": [t["name"] for t in checked if not t["required"] and not t["found"]],
        "incompatible": incompatible,
        "diagnostics_failed": [t["name"] for t in targets if t["kind"] == "diagnostic" and not t.get("compatible")],
        "ok": not missing_required and not incompatible,
    }
    if not quiet:
        out = stream or sys.stdout
        print(json.dumps(report, indent=2, default=str) if as_json else format_doctor(report), file=out)
    return report


def format_doctor(report: dict[str, Any]) -> str:
    """Human-readable report of :func:`run_doctor`."""
    lines = ["versions:"]
    lines += [f"  {name:<14}{version or '-'}" for name, version in report["versions"].items()]
    for up in report["upstream"]:
        lines.append(f"upstream {up['dir']} @ {up['commit'] or 'no git commit'}")
    lines.append(f"patch targets (profile {report['profile']}):")
    for t in report["targets"]:
        if t.get("kind") == "diagnostic":
            state = "diagnostic ok" if t.get("compatible") else "diagnostic: fails before patching"
        elif t["found"]:
            state = "ok" if t["compatible"] else "INCOMPATIBLE"
        else:
            state = "MISSING" if t["required"] else "missing (optional)"
        known = "version known" if t.get("version_known") else "version unknown"
        lines.append(f"  [{state}] {t['name']}  ({t.get('module')}, {known}, {t.get('source') or 'not found'})")
        if t.get("detail") and not (t["found"] and t["compatible"]):
            lines.append(f"      {t['detail']}")
    lines.append("doctor ok" if report["ok"] else "doctor FAILED")
    return "\n".join(lines)
