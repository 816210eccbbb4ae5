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
compatible and every required one is found (which modules are required: :mod:`mindspeed_rl_r3.patches.registry`).

Parts: :mod:`mindspeed_rl_r3.doctoring.versions`, :mod:`~mindspeed_rl_r3.doctoring.source_index`,
:mod:`~mindspeed_rl_r3.doctoring.report`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from mindspeed_rl_r3.doctoring.report import format_doctor, json_view
from mindspeed_rl_r3.doctoring.source_index import SourceIndex, check_target_in_source, parameters
from mindspeed_rl_r3.doctoring.versions import (
    PACKAGES,
    git_commit,
    import_is_safe,
    module_spec,
    package_dir,
    package_version,
    source_version,
)
from mindspeed_rl_r3.patches import PATCH_MODULES
from mindspeed_rl_r3.patches.registry import PROFILES, required

__all__ = [
    "PATCH_MODULES",
    "REQUIRED",
    "SourceIndex",
    "check_target_in_source",
    "format_doctor",
    "import_is_safe",
    "package_version",
    "run_doctor",
]

# Patch modules a job cannot run without (from the registry); every other module of PATCH_MODULES is optional there.
REQUIRED = {profile: required(profile) for profile in PROFILES}

# ------------------------------------------------------------------------------------------------------ targets


def _targets_of(module: Any) -> tuple[Any, ...]:
    targets = getattr(module, "TARGETS", ())
    return tuple(targets() if callable(targets) else targets)


def _top(path: str) -> str:
    return path.split(".", 1)[0]


def _upstream_versions(directory: Path, top: str) -> list[str]:
    """Candidate versions of package ``top`` inside an upstream checkout: source version, then git commit."""
    candidates = []
    top_dir = directory / top if (directory / top).is_dir() else directory
    version = source_version(top_dir) if top_dir.exists() else None
    if version:
        candidates.append(version)
    commit = git_commit(directory)
    if commit:
        candidates.append(commit)
    return candidates


def _relevant_megatron(results: list[dict[str, Any]], index: SourceIndex) -> list[dict[str, Any]]:
    """Mirror megatron_router.check(): core 0.16+ (``router_replay`` hook) vs 0.12 targets, decided from source."""
    hook = next((r for r in results if r["name"].endswith("topk_routing_with_score_function")), None)
    native = False
    if hook is not None and hook["found"]:
        found = index.resolve(hook["name"])
        native = not isinstance(found, str) and "router_replay" in parameters(found[0], found[2])
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
            if not result.get("found") and target is not None and package_dir(_top(target.path)) is not None:
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
            elif package_dir(_top(target.path)) is not None:
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
        top_dir = package_dir(_top(target.path))
        if top_dir is not None:
            roots.append(top_dir.parent)
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
    verbose: bool = False,
) -> dict[str, Any]:
    """Versions and patch-target checks; prints the report (JSON with ``as_json``) unless ``quiet``: a summary
    (environment, per-module counts, problems only), every target with ``verbose``. The returned report is complete.

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
        profile = "npu" if dirs or module_spec("torch_npu") is not None else "cpu"
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
        "upstream": [{"dir": str(d), "commit": git_commit(d)} for d in dirs],
        "profile": profile,
        "missing_required": missing_required,
        "missing_optional": [t["name"] for t in checked if not t["required"] and not t["found"]],
        "incompatible": incompatible,
        "diagnostics_failed": [t["name"] for t in targets if t["kind"] == "diagnostic" and not t.get("compatible")],
        "ok": not missing_required and not incompatible,
    }
    if not quiet:
        out = stream or sys.stdout
        if as_json:
            print(json.dumps(json_view(report, verbose), indent=2, default=str), file=out)
        else:
            print(format_doctor(report, verbose), file=out)
    return report
