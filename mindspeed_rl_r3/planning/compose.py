"""Compose a hydra config into plain data, with one-line errors: what ``plan`` and the ``train`` entry read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mindspeed_rl_r3.config import SECTIONS
from mindspeed_rl_r3.planning.sections import PlanError
from mindspeed_rl_r3.shipped_configs import shipped_configs_dir

CONFIGS_DIR = shipped_configs_dir()  # the repository's configs/, from a checkout or an installed wheel


def _one_line(err: BaseException) -> str:
    """An exception's message on one line: YAML and hydra errors span several."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:  # yaml.MarkedYAMLError: say what and where, not the parser's context lines
        return f"invalid YAML in {mark.name}, line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split()) or type(err).__name__


def _bad_override(overrides: Sequence[str]) -> str | None:
    """The first override hydra's grammar rejects, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:  # any parse failure names this override
            return override
    return None


def compose_hydra(
    config_dir: str | os.PathLike,
    name: str,
    overrides: Sequence[str] = (),
    *,
    job_name: str = "plan",
    error: type[ValueError] = PlanError,
) -> dict[str, Any]:
    """Compose ``config_dir/name.yaml`` with hydra ``overrides`` into plain data.

    Malformed YAML, an override hydra cannot parse or apply, and an interpolation that does not resolve raise
    ``error`` with one line naming the file or override; a missing hydra-core raises ``error`` too.
    """
    try:
        import yaml
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException, OverrideParseException
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError as err:
        raise error(f"composing {name} needs hydra-core (pip install hydra-core): {err}") from None
    source = Path(config_dir) / f"{name}.yaml"
    try:
        with initialize_config_dir(version_base=None, config_dir=str(Path(config_dir).resolve()), job_name=job_name):
            composed = compose(config_name=name, overrides=list(overrides))
        plain = OmegaConf.to_container(composed, resolve=True)
    except OverrideParseException as err:
        bad = _bad_override(overrides)
        where = f"override {bad!r}" if bad is not None else f"overrides {list(overrides)}"
        raise error(f"{where} is not valid hydra syntax: {_one_line(err)}") from None
    except yaml.YAMLError as err:
        raise error(_one_line(err)) from None
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, yaml.YAMLError) else err  # hydra wraps some YAML errors
        if cause is not err:
            raise error(_one_line(cause)) from None
        raise error(f"composing {source} with overrides {list(overrides)}: {_one_line(err)}") from None
    if not isinstance(plain, dict):
        raise error(f"{source}: expected a mapping at the top level, got {type(plain).__name__}")
    for section in SECTIONS:  # the package's sections: absent or a mapping
        value = plain.get(section)
        if value is not None and not isinstance(value, dict):
            raise error(f"{section}: expected a mapping, got {type(value).__name__} {value!r}")
    return plain


def load_config(config: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose a hydra config: a yaml path, or the name of a config in this repository's ``configs/``.

    ``overrides`` are hydra overrides (``actor_config.tensor_model_parallel_size=2``). Raises FileNotFoundError
    naming the path and the available configs; PlanError (one line) for malformed YAML, a bad override, a
    non-mapping ``r3`` / ``aqn`` / ``lora_extras`` section, or a missing hydra-core.
    """
    path = Path(config)
    if not path.suffix:
        candidate = path.with_suffix(".yaml")
        path = candidate if candidate.is_file() else CONFIGS_DIR / candidate.name
    if not path.is_file():
        available = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []
        raise FileNotFoundError(f"config not found: {config} (configs in {CONFIGS_DIR}: {available})")
    return compose_hydra(path.parent, path.stem, overrides, job_name="plan")
