"""MindSpeed-RL's job entry as :mod:`mindspeed_rl_r3.train` uses it: ``cli/train_grpo.py`` and its config classes.

Nothing is patched here; the module exists so that only ``patches/`` imports MindSpeed-RL.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.patches.targets import PatchTarget

ENTRY = "cli.train_grpo"  # a module of the MindSpeed-RL checkout, beside the mindspeed_rl package
CONFIG_CLASSES = (
    "mindspeed_rl.config_cls.rl_config.RLConfig",
    "mindspeed_rl.config_cls.megatron_config.MegatronConfig",
    "mindspeed_rl.config_cls.generate_config.GenerateConfig",
)
TARGETS = tuple(PatchTarget(path, (pins.MINDSPEED_RL,)) for path in CONFIG_CLASSES)


def import_entry() -> ModuleType:
    """``cli.train_grpo`` (its remote ``train`` task); raises ImportError when the checkout is not importable."""
    return importlib.import_module(ENTRY)


def checkout_dir() -> Path | None:
    """The MindSpeed-RL checkout holding the importable ``mindspeed_rl`` package, or ``None``."""
    try:
        import mindspeed_rl
    except ImportError:
        return None
    return Path(mindspeed_rl.__file__).resolve().parent.parent


def config_classes() -> tuple[Any, Any, Any]:
    """``(RLConfig, MegatronConfig, GenerateConfig)``."""
    classes = []
    for path in CONFIG_CLASSES:
        module, _, name = path.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes[0], classes[1], classes[2]
