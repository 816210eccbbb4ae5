"""The job driver: ``hydra.main`` and ``ray.init`` wrappers that carry the config's sections to every Ray worker.

MindSpeed-RL's ``cli/train_grpo.py`` starts the job with a hydra task function and ``ray.init``. When the task
function receives a config with ``r3`` / ``aqn`` / ``lora_extras`` sections, :func:`publish_sections` validates them
and puts them in this process's environment; the wrapped ``ray.init`` then passes them, and the import hook as the
worker setup hook, in the job's ``runtime_env`` (:func:`job_runtime_env`). :mod:`mindspeed_rl_r3.autopatch` applies
this when ``mindspeed_rl`` is imported; :func:`undo` restores both.

On the CPU backend (:func:`mindspeed_rl_r3.patches.cpu_backend.activate` ran in this process) the job's workers get the
backend's setup hook instead, and a ``ray.init`` that starts a local cluster declares the "NPU"s the config's workers
request: MindSpeed-RL's own script then runs unchanged on a CPU machine.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from mindspeed_rl_r3.integration.env import ENV_SECTIONS, loaded_cpu_backend
from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget

SETUP_HOOK = "mindspeed_rl_r3.autopatch.install"
TARGETS = (
    PatchTarget("hydra.main", ("1.3",), ("config_path", "config_name")),
    PatchTarget("ray.init", ("2.",), ()),
)
PATCHES = PatchSet("__r3_autopatch__", "driver")
_job_config: Any = None  # the config the hydra task function received (the CPU backend's ray.init reads it)


def _cpu_backend() -> Any:
    """The CPU backend module where this process runs CPU jobs on it."""
    backend = loaded_cpu_backend()
    return backend if backend is not None and backend.runs_jobs() else None


def publish_sections(config: Any) -> str | None:
    """Validate the config's sections and put them in this process's environment; returns the JSON or ``None``."""
    from mindspeed_rl_r3.integration.runtime import activate
    from mindspeed_rl_r3.integration.settings import encode_sections, present_sections

    sections = present_sections(config)
    if not sections:
        return None
    text = encode_sections(sections)
    os.environ[ENV_SECTIONS] = text
    activate(sections)
    return text


def job_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """``runtime_env`` plus the published sections and the setup hook (a copy; ``None`` reads as empty)."""
    env = dict(runtime_env or {})
    text = os.environ.get(ENV_SECTIONS)
    cpu = _cpu_backend()
    if cpu is not None:  # every worker needs the stand-ins before it imports MindSpeed-RL; their hook installs ours
        backend = cpu.ray_runtime_env(cpu.upstream_root() or "")
        env["env_vars"] = {**backend["env_vars"], **(env.get("env_vars") or {})}
        env["worker_process_setup_hook"] = backend["worker_process_setup_hook"]
    if not text:
        return env
    env_vars = dict(env.get("env_vars") or {})
    env_vars.setdefault(ENV_SECTIONS, text)
    env["env_vars"] = env_vars
    if cpu is not None:
        return env
    if env.get("worker_process_setup_hook") not in (None, SETUP_HOOK):
        warnings.warn(
            f"ray.init runtime_env has worker_process_setup_hook {env['worker_process_setup_hook']!r}; workers load "
            "the mindspeed_rl_r3 patches only where `mindspeed-rl-r3 apply` installed them",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        env["worker_process_setup_hook"] = SETUP_HOOK
    return env


def hydra_main_wrapper(main: Callable[..., Any]) -> Callable[..., Any]:
    """``hydra.main``: the task function publishes the config's sections before it runs."""

    @functools.wraps(main)
    def hydra_main(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        decorator = main(*args, **kwargs)

        def capture(task_function: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(task_function)  # hydra unwraps __wrapped__ to find the calling file
            def task(config: Any, *a: Any, **kw: Any) -> Any:
                global _job_config
                _job_config = config
                cpu = _cpu_backend()
                if cpu is not None:  # MindSpeed-RL's script as __main__: its functions reach Ray workers by value
                    cpu.fix_entry_script(sys.modules.get(task_function.__module__))
                publish_sections(config)
                return task_function(config, *a, **kw)

            return decorator(task)

        return capture

    return hydra_main


def ray_init_wrapper(init: Callable[..., Any]) -> Callable[..., Any]:
    """``ray.init``: the job's ``runtime_env`` carries the published sections and the setup hook; on the CPU backend
    a new local cluster declares the config's "NPU"s."""

    @functools.wraps(init)
    def ray_init(*args: Any, **kwargs: Any) -> Any:
        cpu = _cpu_backend()
        if os.environ.get(ENV_SECTIONS) or cpu is not None:
            kwargs["runtime_env"] = job_runtime_env(kwargs.get("runtime_env"))
        if cpu is not None and not args and kwargs.get("address") is None and not os.environ.get("RAY_ADDRESS"):
            for key, value in cpu.ray_local_cluster(_job_config or {}).items():
                kwargs.setdefault(key, value)
        return init(*args, **kwargs)

    return ray_init


def apply() -> list[str]:
    """Wrap ``hydra.main`` and ``ray.init`` (idempotent; skipped where the sections are already published or the
    package is not installed); returns the paths wrapped now."""
    if os.environ.get(ENV_SECTIONS):
        return []
    done = []
    for module_name, attr, wrapper in (("hydra", "main", hydra_main_wrapper), ("ray", "init", ray_init_wrapper)):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, attr, None) is not None and PATCHES.wrap(module, attr, wrapper):
            done.append(f"{module_name}.{attr}")
    return done


def undo() -> list[str]:
    """Restore ``hydra.main`` and ``ray.init``."""
    return PATCHES.undo()


def check() -> list[dict[str, Any]]:
    from importlib.metadata import PackageNotFoundError, version

    rows = []
    for target, dist in zip(TARGETS, ("hydra-core", "ray"), strict=True):
        try:
            installed = version(dist)
        except PackageNotFoundError:
            installed = None
        rows.append(target.check(installed))
    return rows
