"""Where the shipped hydra configs are: the repository's ``configs/``, installed as ``mindspeed_rl_r3.configs``.

pyproject.toml maps that folder into the package, so one lookup through ``importlib.resources`` finds it in an
installed wheel and through an editable install. A checkout that is only on ``sys.path`` (never installed) has no
such package; there the folder beside the package is used.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE = "mindspeed_rl_r3.configs"


def shipped_configs_dir() -> Path:
    """The folder holding the shipped configs (``grpo_*.yaml`` and their ``model/``, ``datasets/``, ``envs/``)."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:  # a checkout on sys.path, not installed
        return Path(__file__).resolve().parents[1] / "configs"
    # hydra composes from a real folder; a zipped install would need extracting, which nothing here does
    if not isinstance(root, Path):
        raise RuntimeError(f"{PACKAGE} is not a folder on disk ({root!r}); install mindspeed-rl-r3 unzipped")
    return root


def shipped_config_names() -> list[str]:
    """The names ``plan NAME`` and ``train --config-name NAME`` accept without a path, sorted."""
    return sorted(path.stem for path in shipped_configs_dir().glob("*.yaml"))
