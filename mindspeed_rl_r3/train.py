"""``python -m mindspeed_rl_r3.train --config-name NAME [--config-path DIR] [key=value ...]``: GRPO with R3 and AQN.

The flow is MindSpeed-RL's ``cli/train_grpo.py``, whose functions do the work; this entry adds what it cannot:

1. compose the hydra config and split off the ``r3`` / ``aqn`` / ``lora_extras`` sections (MindSpeed-RL's config
   classes reject unknown keys inside their own sections; the top-level ones they never read);
2. start Ray as ``cli/train_grpo.py::main`` does (its ``runtime_env`` file, ``VLLM_DP_SIZE``, ``IS_MULTIMODAL``,
   ``HCCL_BUFFSIZE``), plus the sections in the job's environment and :mod:`mindspeed_rl_r3.autopatch` as the
   worker setup hook: every Ray worker process, on every node, patches MindSpeed-RL's modules as it imports them,
   before Ray binds the actor methods; the router wrappers go in after ``initialize_megatron`` has installed
   MindSpeed-LLM's patches (:mod:`mindspeed_rl_r3.patches.mindspeed_rl_replay`);
3. run MindSpeed-RL's own remote ``train`` task (``cli.train_grpo.train``) on the MindSpeed-RL part of the config.

The MindSpeed-RL checkout must be importable (``cli`` and ``mindspeed_rl`` on ``PYTHONPATH`` of the driver and the
Ray nodes), as ``examples/qwen3_30b_lora_r3_aqn.sh`` arranges.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mindspeed_rl_r3 import config_rules
from mindspeed_rl_r3.cli.train_options import add_arguments  # torch-free, for the CLI's train --help
from mindspeed_rl_r3.config import SECTIONS, ConfigError
from mindspeed_rl_r3.integration.env import ENV_SECTIONS
from mindspeed_rl_r3.patches import mindspeed_rl_entry
from mindspeed_rl_r3.shipped_configs import shipped_configs_dir

REPO_CONFIGS = shipped_configs_dir()  # the repository's configs/, from a checkout or an installed wheel


def compose_config(
    config_name: str, config_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The composed hydra config as plain data. ``config_path`` defaults to this repository's ``configs/``.

    Raises FileNotFoundError for a missing config, ConfigError (one line naming the file or override) for malformed
    YAML, a bad override, a non-mapping ``r3`` / ``aqn`` / ``lora_extras`` section or a missing hydra-core.
    """
    from mindspeed_rl_r3.planning.compose import compose_hydra

    directory = Path(config_path).resolve() if config_path is not None else REPO_CONFIGS
    name = config_name[: -len(".yaml")] if config_name.endswith(".yaml") else config_name
    if not (directory / f"{name}.yaml").is_file():
        available = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        raise FileNotFoundError(f"config {name!r} not found in {directory} (available: {available})")
    return compose_hydra(directory, name, overrides, job_name="mindspeed_rl_r3_train", error=ConfigError)


def split_sections(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(MindSpeed-RL's part, our sections)``; the sections are validated (ConfigError names section.key)."""
    from mindspeed_rl_r3.integration.settings import encode_sections, present_sections

    ours = present_sections(config)
    if ours:
        encode_sections(ours)
    return {k: v for k, v in config.items() if k not in SECTIONS}, ours


def _runtime_env_file(path: str, config_dir: Path) -> Path:
    candidates = [Path(path)] if os.path.isabs(path) else [config_dir.parent / path, Path.cwd() / path]
    if not os.path.isabs(path):
        checkout = mindspeed_rl_entry.checkout_dir()
        if checkout is not None:
            candidates.append(checkout / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"rl_config.runtime_env_path {path!r} not found; looked at {[str(c) for c in candidates]}")


def upstream_configs(config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """MindSpeed-RL's own ``(RLConfig, actor MegatronConfig, GenerateConfig)`` of a config, built as
    ``cli/train_grpo.py::parse_training_config`` builds them (before its Ray-dependent ``validate_rl_args``)."""
    _import_upstream_entry()
    RLConfig, MegatronConfig, GenerateConfig = mindspeed_rl_entry.config_classes()

    section = upstream_config(config)
    megatron = MegatronConfig({**section.get("megatron_training"), **section.get("actor_config")}, section.get("model"))
    return RLConfig(section.get("rl_config")), megatron, GenerateConfig(section.get("generate_config"))


def job_runtime_env(rl_config: Any, generate_config: Any, config_dir: Path) -> dict[str, Any]:
    """The Ray job's runtime_env as ``cli/train_grpo.py::main`` builds it, plus the sections and the setup hook."""
    import yaml

    from mindspeed_rl_r3 import autopatch

    with open(_runtime_env_file(rl_config.runtime_env_path, config_dir), encoding="utf-8") as handle:
        runtime_env = yaml.safe_load(handle) or {}
    env_vars = dict(runtime_env.get("env_vars") or {})
    if getattr(generate_config, "enable_expert_parallel", None):
        env_vars["VLLM_DP_SIZE"] = str(generate_config.infer_expert_parallel_size)
    env_vars["IS_MULTIMODAL"] = str(rl_config.is_multimodal)
    env_vars["HCCL_BUFFSIZE"] = str(rl_config.hccl_buffersize)
    runtime_env["env_vars"] = env_vars
    return autopatch.job_runtime_env(runtime_env)


def check_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, Any, Any]]:
    """``(MindSpeed-RL part, our sections, (RLConfig, MegatronConfig, GenerateConfig))`` of a composed config.

    The run's check, the one ``plan`` shares: the sections are validated, MindSpeed-RL builds its config objects
    (its unknown-key ValueError), and :func:`mindspeed_rl_r3.config_rules.check` applies every rule; a refused
    config raises ConfigError naming each broken rule. Starts nothing.
    """
    msrl_config, sections = split_sections(config)
    upstream = upstream_configs(msrl_config)
    problems = [f.message for f in config_rules.check(*upstream, sections) if f.severity == "error"]
    if problems:
        raise ConfigError(config_rules.refusal_message(problems))
    return msrl_config, sections, upstream


def prepare_job(
    config_name: str, config_path: str | None = None, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(MindSpeed-RL config, Ray runtime_env)``; publishes the sections in this process's environment.

    Raises ConfigError / ValueError / FileNotFoundError for a config that cannot run, before anything starts.
    """
    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.settings import encode_sections

    config = compose_config(config_name, config_path, overrides)
    # Publish the sections and install the import hook before anything imports MindSpeed-RL (check_config does):
    # Ray's @ray.remote copies every method of a worker class, inherited ones included, into the actor class when
    # the worker module is imported, so a patch installed later never reaches the actors.
    _, sections = split_sections(config)
    if sections:
        os.environ[ENV_SECTIONS] = encode_sections(sections)
    else:
        os.environ.pop(ENV_SECTIONS, None)
        print("mindspeed_rl_r3.train: no r3 / aqn / lora_extras sections: plain MindSpeed-RL GRPO", file=sys.stderr)
    autopatch.install()
    msrl_config, sections, (rl_config, _, generate_config) = check_config(config)
    config_dir = Path(config_path).resolve() if config_path is not None else REPO_CONFIGS
    return msrl_config, job_runtime_env(rl_config, generate_config, config_dir)


def upstream_config(msrl_config: Mapping[str, Any]) -> Any:
    """The config object MindSpeed-RL's ``train`` task receives: a hydra ``DictConfig``, as its own ``main`` passes.

    MindSpeed-RL reads nested sections by attribute (``rl_config.actor_resource.num_npus`` in ``validate_rl_args``),
    which a plain dict does not allow.
    """
    from omegaconf import OmegaConf

    return OmegaConf.create(dict(msrl_config))


def _import_upstream_entry() -> Any:
    try:
        return mindspeed_rl_entry.import_entry()
    except ImportError as err:
        raise ConfigError(
            f"cannot import MindSpeed-RL's {mindspeed_rl_entry.ENTRY} ({err}): put the MindSpeed-RL checkout on "
            "PYTHONPATH (or run from it)"
        ) from None


def run_job(msrl_config: Mapping[str, Any], runtime_env: Mapping[str, Any]) -> None:
    """Start Ray with ``runtime_env`` and run MindSpeed-RL's remote GRPO ``train`` task to the end."""
    import ray

    from mindspeed_rl_r3 import autopatch

    autopatch.install()
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; the job's runtime_env cannot carry the patches")
    from mindspeed_rl_r3.patches import cpu_backend

    upstream = _import_upstream_entry()
    local = cpu_backend.ray_local_cluster(msrl_config) if cpu_backend.runs_jobs() else {}
    ray.init(runtime_env=dict(runtime_env), **local)
    ray.get(upstream.train.remote(upstream_config(msrl_config)))


def run_training(config_name: str, config_path: str | None = None, overrides: Sequence[str] = ()) -> None:
    """:func:`prepare_job` then :func:`run_job` (what ``mindspeed-rl-r3 train`` runs)."""
    run_job(*prepare_job(config_name, config_path, overrides))


def use_cpu_backend() -> None:
    """Install the CPU backend and put the pinned upstream sources on ``sys.path`` (``--cpu-backend``)."""
    from mindspeed_rl_r3.patches import cpu_backend

    try:
        cpu_backend.activate()
    except cpu_backend.CpuBackendError as err:  # a real torch_npu here, or no / an incomplete upstream tree
        raise ConfigError(f"--cpu-backend: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    prog, description = "python -m mindspeed_rl_r3.train", __doc__.split("\n", 1)[0]
    return add_arguments(argparse.ArgumentParser(prog=prog, description=description))


def run_from_args(args: argparse.Namespace) -> int:
    """0: training finished; 2: the config could not be composed or validated (message on stderr). Errors during
    training propagate with their traceback."""
    try:
        if getattr(args, "cpu_backend", False):
            use_cpu_backend()
        job = prepare_job(args.config_name, args.config_path, args.overrides)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, MindSpeed-RL's unknown-key ValueError
        print(f"mindspeed_rl_r3.train: {err}", file=sys.stderr)
        return 2
    run_job(*job)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mindspeed_rl_r3.train``; exit codes as :func:`run_from_args`."""
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    # Run through the importable module so Ray pickles nothing from __main__ by value.
    from mindspeed_rl_r3 import train as _entry

    sys.exit(_entry.main())
