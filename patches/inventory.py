"""The patch inventory, ``patches/README.md``, generated from :mod:`mindspeed_rl_r3.patches.registry`.

``python -m mindspeed_rl_r3.patches.inventory --write`` regenerates it; ``--check`` exits 1 when it is stale (a test
does the same, so CI fails on a stale inventory).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.patches.registry import RECORDS, PatchRecord

README = Path(__file__).with_name("README.md")
COMMAND = "python -m mindspeed_rl_r3.patches.inventory --write"
PINS = (
    ("MindSpeed-RL", pins.MINDSPEED_RL),
    ("MindSpeed", pins.MINDSPEED),
    ("MindSpeed-LLM", pins.MINDSPEED_LLM),
    ("vllm-ascend", f"{pins.VLLM_ASCEND} ({pins.VLLM_ASCEND_LINE})"),
    ("vLLM", pins.VLLM),
    ("megatron-core", pins.MEGATRON_CORE),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _record(record: PatchRecord) -> list[str]:
    lines = [f"## `{record.name}` ({record.kind})", ""]
    lines.append(f"- **Upstream:** {record.upstream}")
    lines.append(f"- **Changes:** {record.changes}")
    lines.append(f"- **Why:** {record.why}")
    lines.append(f"- **Remove when:** {record.remove_when}")
    if record.upstream_fix:
        lines.append(f"- **Fix upstream would need:** {record.upstream_fix}")
    required = ", ".join(sorted(record.required_for)) or "none (optional)"
    lines.append(f"- **Required by doctor for:** {required}; **undo:** {'yes' if record.reversible else 'no'}")
    if record.hooks:
        lines.append(f"- **Applied on import of:** {', '.join(f'`{m}`' for m in record.hooks)}")
    targets = record.targets()
    if targets:
        lines += ["", "| target | upstream versions | leading parameters |", "|---|---|---|"]
        for target in targets:
            params = ", ".join(target.parameters) or "-"
            lines.append(f"| `{_cell(target.path)}` | {', '.join(target.versions)} | {_cell(params)} |")
    return [*lines, ""]


def render() -> str:
    """The inventory's Markdown text."""
    lines = [
        "# Patch inventory",
        "",
        f"Generated from `patches/registry.py` by `{COMMAND}`; do not edit by hand.",
        "Only the modules listed here touch upstream code. Each declares its targets, `apply()` and `undo()`;",
        "`mindspeed-rl-r3 doctor` checks every target against the installed or given upstream.",
        "",
        "| upstream | pinned |",
        "|---|---|",
        *(f"| {name} | `{pin}` |" for name, pin in PINS),
        "",
    ]
    for record in RECORDS:
        lines += _record(record)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``--write``: regenerate README.md; ``--check``: 1 when it is stale; neither: print the inventory."""
    parser = argparse.ArgumentParser(prog="python -m mindspeed_rl_r3.patches.inventory", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {README.name}")
    group.add_argument("--check", action="store_true", help=f"exit 1 when {README.name} is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        README.write_text(text, encoding="utf-8")
        print(f"wrote {README}")
    elif args.check:
        current = README.read_text(encoding="utf-8") if README.is_file() else ""
        if current != text:
            print(f"{README} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
