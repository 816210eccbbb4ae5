"""``doctor``'s output: a short summary by default (environment, per-patch-module counts, problems only), every
target with ``verbose``; the same choice for the JSON form."""

from __future__ import annotations

from collections import Counter
from typing import Any

_STATES = ("ok", "INCOMPATIBLE", "MISSING", "missing (optional)", "diagnostic ok", "diagnostic failed")


def target_state(target: dict[str, Any]) -> str:
    """One of ``_STATES`` for a target row of :func:`mindspeed_rl_r3.doctor.run_doctor`."""
    if target.get("kind") == "diagnostic":
        return "diagnostic ok" if target.get("compatible") else "diagnostic failed"
    if target["found"]:
        return "ok" if target["compatible"] else "INCOMPATIBLE"
    return "MISSING" if target.get("required") else "missing (optional)"


def is_problem(target: dict[str, Any]) -> bool:
    """Whether the summary lists the row: what makes doctor fail (an optional target missing, or a diagnostic of the
    unpatched upstream, only counts)."""
    return target_state(target) in ("INCOMPATIBLE", "MISSING")


def module_counts(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Patch module -> state -> number of targets, in report order."""
    counts: dict[str, Counter[str]] = {}
    for target in report["targets"]:
        counts.setdefault(target.get("module") or "?", Counter())[target_state(target)] += 1
    return {module: {s: c[s] for s in _STATES if c[s]} for module, c in counts.items()}


def json_view(report: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    """What ``doctor --json`` prints: the whole report with ``verbose``; otherwise only the problem targets, with
    per-module counts in ``modules``."""
    view = dict(report) | {"modules": module_counts(report)}
    if not verbose:
        view["targets"] = [t for t in report["targets"] if is_problem(t)]
    return view


def _target_lines(target: dict[str, Any]) -> list[str]:
    known = "version known" if target.get("version_known") else "version unknown"
    lines = [
        f"  [{target_state(target)}] {target['name']}  "
        f"({target.get('module')}, {known}, {target.get('source') or 'not found'})"
    ]
    if target.get("detail") and target_state(target) not in ("ok", "diagnostic ok"):
        lines.append(f"      {target['detail']}")
    return lines


def format_doctor(report: dict[str, Any], verbose: bool = False) -> str:
    """Human-readable report of :func:`mindspeed_rl_r3.doctor.run_doctor`."""
    versions = report["versions"]
    if verbose:
        lines = ["versions:", *(f"  {name:<14}{version or '-'}" for name, version in versions.items())]
    else:
        lines = ["environment: " + ", ".join(f"{name} {version or '-'}" for name, version in versions.items())]
    lines += [f"upstream {up['dir']} @ {up['commit'] or 'no git commit'}" for up in report["upstream"]]
    if verbose:
        lines.append(f"patch targets (profile {report['profile']}):")
        for target in report["targets"]:
            lines += _target_lines(target)
    else:
        lines.append(f"patch modules (profile {report['profile']}):")
        for module, counts in module_counts(report).items():
            lines.append(f"  {module:<22}" + ", ".join(f"{n} {state}" for state, n in counts.items()))
        problems = [t for t in report["targets"] if is_problem(t)]
        if problems:
            lines.append("problems:")
            for target in problems:
                lines += _target_lines(target)
    verdict = "doctor ok" if report["ok"] else "doctor FAILED"
    lines.append(verdict if verbose else f"{verdict} (--verbose lists every target)")
    return "\n".join(lines)
