"""Load the MindSpeed-RL patches in every process that imports MindSpeed-RL, without touching its code.

:func:`install` puts a post-import hook on ``sys.meta_path``: when one of the MindSpeed-RL modules listed in
:data:`mindspeed_rl_r3.patches.mindspeed_rl_integration.MODULE_PATCHES` finishes importing, the process activates
the integration from its environment (the sections the driver published, see
:mod:`mindspeed_rl_r3.integration.settings`) and patches that module. Without sections it patches nothing. It is
called by the ``.pth`` file ``mindspeed-rl-r3 apply`` writes (every Python process of that installation) and as the
Ray ``worker_process_setup_hook`` of jobs started by ``mindspeed_rl_r3.train`` or by a patched driver (every worker
process of the job, on every node where the package is importable).

Driver side: where the sections are not in the environment yet, importing ``mindspeed_rl`` wraps ``hydra.main`` and
``ray.init``: when the hydra task function (MindSpeed-RL's ``cli/train_grpo.py::main``) receives a config with
``r3`` / ``aqn`` / ``lora_extras`` sections, they are validated and published in this process's environment, and
``ray.init`` passes them (and this setup hook) to every worker through the job's ``runtime_env``.

Cheap by design: :func:`install` imports nothing heavy (it runs at every interpreter start once applied).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mindspeed_rl_r3.integration.env import ENV_CONFIG_FILE, ENV_DISABLE, ENV_SECTIONS

SETUP_HOOK = "mindspeed_rl_r3.autopatch.install"
DRIVER_TRIGGER = "mindspeed_rl"
_MARK = "__r3_autopatch__"
_lock = threading.RLock()
_finder: _PostImportFinder | None = None
_ran: set[str] = set()


def _target_modules() -> set[str]:
    # The registry lives in the patch modules, which import torch; the names are listed here to keep install cheap
    # (tests check the two lists agree).
    return set(TARGET_MODULES)


TARGET_MODULES = (
    "mindspeed_rl.trainer.grpo_trainer_hybrid",
    "mindspeed_rl.workers.base_worker",
    "mindspeed_rl.workers.actor_hybrid_worker",
    "mindspeed_rl.workers.reference_worker",
    "mindspeed_rl.workers.integrated_worker",
    "mindspeed_rl.workers.resharding.megatron_sharding_manager",
    "mindspeed_rl.models.rollout.vllm_engine",
    "mindspeed_rl.models.base.base_training_engine",
    "mindspeed_rl.models.loss.base_loss_func",
)


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes")


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader and runs the post-import hook once the module has executed."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _on_import(self._name, module)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _HookedLoader):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


def _on_import(name: str, module: ModuleType) -> None:
    if _disabled():
        return
    with _lock:
        if name == DRIVER_TRIGGER:
            install_driver_capture()
            return
        if not (os.environ.get(ENV_SECTIONS) or os.environ.get(ENV_CONFIG_FILE)):
            return  # plain MindSpeed-RL job: do not even import the patches
        from mindspeed_rl_r3.patches import mindspeed_rl_integration as integration

        if integration.activate_from_environment() is None:
            return
        integration.patch_module(name, module)
        _ran.add(name)


def install() -> bool:
    """Install the import hook (idempotent) and patch target modules already imported; ``False`` if disabled.

    Failures in a process whose job asked for the integration propagate: running without R3 when the config asks
    for it would be worse than stopping.
    """
    global _finder
    if _disabled():
        return False
    with _lock:
        if _finder is None:
            _finder = _PostImportFinder({*_target_modules(), DRIVER_TRIGGER})
            sys.meta_path.insert(0, _finder)
        for name in sorted(_finder.names):
            module = sys.modules.get(name)
            if module is not None and name not in _ran:
                _on_import(name, module)
    return True


def uninstall() -> None:
    """Remove the import hook (patches already installed stay; undo them with the integration module)."""
    global _finder
    with _lock:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = None
        _ran.clear()


def installed() -> bool:
    return _finder is not None and _finder in sys.meta_path


# -- driver side ------------------------------------------------------------------------------------------------------
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
    """``runtime_env`` plus the published sections and this setup hook (a copy; ``None`` reads as empty)."""
    env = dict(runtime_env or {})
    text = os.environ.get(ENV_SECTIONS)
    if not text:
        return env
    env_vars = dict(env.get("env_vars") or {})
    env_vars.setdefault(ENV_SECTIONS, text)
    env["env_vars"] = env_vars
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


def _hydra_main_wrapper(main: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(main)
    def hydra_main(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        decorator = main(*args, **kwargs)

        def capture(task_function: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(task_function)  # hydra unwraps __wrapped__ to find the calling file
            def task(config: Any, *a: Any, **kw: Any) -> Any:
                publish_sections(config)
                return task_function(config, *a, **kw)

            return decorator(task)

        return capture

    setattr(hydra_main, _MARK, True)
    return hydra_main


def _ray_init_wrapper(init: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(init)
    def ray_init(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get(ENV_SECTIONS):
            kwargs["runtime_env"] = job_runtime_env(kwargs.get("runtime_env"))
        return init(*args, **kwargs)

    setattr(ray_init, _MARK, True)
    return ray_init


def install_driver_capture() -> list[str]:
    """Wrap ``hydra.main`` and ``ray.init`` (idempotent; skipped where the sections are already published)."""
    if os.environ.get(ENV_SECTIONS):
        return []
    done = []
    for module_name, attr, wrapper in (("hydra", "main", _hydra_main_wrapper), ("ray", "init", _ray_init_wrapper)):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        current = getattr(module, attr, None)
        if current is None or getattr(current, _MARK, False):
            continue
        setattr(module, attr, wrapper(current))
        done.append(f"{module_name}.{attr}")
    return done
