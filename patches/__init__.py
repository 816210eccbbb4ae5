"""Adapters to upstream frameworks. The only package that imports vllm, vllm_ascend, torch_npu, mindspeed,
mindspeed_llm or mindspeed_rl; each module declares its ``TARGETS``, ``apply`` / ``undo`` and a ``check()`` that
``doctor`` runs. :mod:`.registry` lists them; ``README.md`` beside it is the inventory generated from it.

Importing this package is cheap (no patch module, no torch): the import hook reads it at interpreter start.
"""

from __future__ import annotations

import sys

from mindspeed_rl_r3.patches.patch_set import PATCH_SETS
from mindspeed_rl_r3.patches.registry import RECORDS, checked

# Patch modules doctor checks: module name -> what it changes.
PATCH_MODULES: dict[str, str] = {r.name: r.changes for r in checked()}


def installed() -> dict[str, list[str]]:
    """What is patched in this process: patch set name -> patched attribute paths (sets with none left out)."""
    return {s.name: s.installed for s in PATCH_SETS if s.installed}


def undo_all() -> dict[str, list[str]]:
    """Undo every patch of the process, newest module first; returns patch module (or set) name -> restored paths.

    Modules never imported have nothing to undo and stay unimported. Not reversible, and left as they are: what
    MindSpeed's patch manager applied (``mindspeed_llm_router``) and the CPU stand-ins (uninstall those with
    :func:`mindspeed_rl_r3.patches.cpu_backend.uninstall`).
    """
    restored: dict[str, list[str]] = {}
    for record in reversed(RECORDS):
        module = sys.modules.get(record.module_name)
        undo = getattr(module, "undo", None)
        if module is None or not record.reversible or record.kind == "stand-in" or not callable(undo):
            continue
        paths = undo()
        if paths:
            restored[record.name] = list(paths)
    for patch_set in reversed(PATCH_SETS):  # sets no record's undo() covers
        paths = patch_set.undo()
        if paths:
            restored.setdefault(patch_set.name, []).extend(paths)
    return restored
