"""Load the MindSpeed-RL patches in every process that imports MindSpeed-RL, without touching its code.

:func:`install` puts a post-import hook on ``sys.meta_path``: when one of the MindSpeed-RL modules listed in
:data:`TARGET_MODULES` (the hooks of :mod:`mindspeed_rl_r3.patches.registry`) finishes importing, the process
activates the integration from its environment (the sections the driver published, see
:mod:`mindspeed_rl_r3.integration.settings`) and patches that module. Without sections it patches nothing. It is
called by the ``.pth`` file ``mindspeed-rl-r3 apply`` writes (every Python process of that installation) and as the
Ray ``worker_process_setup_hook`` of jobs started by ``mindspeed_rl_r3.train`` or by a patched driver (every worker
process of the job, on every node where the package is importable).

Driver side: where the sections are not in the environment yet, importing ``mindspeed_rl`` wraps ``hydra.main`` and
``ray.init`` (:mod:`mindspeed_rl_r3.patches.driver`, undone by its ``undo()``): when the hydra task function
(MindSpeed-RL's ``cli/train_grpo.py::main``) receives a config with ``r3`` / ``aqn`` / ``lora_extras`` sections, they
are validated and published in this process's environment, and ``ray.init`` passes them (and this setup hook) to every
worker through the job's ``runtime_env``.

Cheap by design: :func:`install` imports nothing heavy (it runs at every interpreter start once applied), except
where ``MINDSPEED_RL_R3_CPU_BACKEND=1`` asks for the CPU backend (:mod:`mindspeed_rl_r3.patches.cpu_backend`), which
it installs first: ``mindspeed-rl-r3 apply`` then MindSpeed-RL's own ``cli/train_grpo.py`` run on a CPU machine.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from types import ModuleType
from typing import Any

from mindspeed_rl_r3.integration.env import ENV_CONFIG_FILE, ENV_CPU_BACKEND, ENV_DISABLE, ENV_SECTIONS
from mindspeed_rl_r3.patches import driver, registry
from mindspeed_rl_r3.patches.driver import SETUP_HOOK, job_runtime_env, publish_sections

__all__ = ["SETUP_HOOK", "TARGET_MODULES", "install", "install_driver_capture", "job_runtime_env", "publish_sections"]

DRIVER_TRIGGER = registry.BY_NAME["driver"].hooks[0]
_lock = threading.RLock()
_finder: _PostImportFinder | None = None
_ran: set[str] = set()


def _target_modules() -> set[str]:
    return set(TARGET_MODULES)


# From the registry, which imports no patch module: install stays cheap.
TARGET_MODULES = registry.hook_modules()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _disabled() -> bool:
    return _flag(ENV_DISABLE)


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
        if _flag(ENV_CPU_BACKEND):  # a CPU machine (opt-in): the stand-ins go in before anything imports torch_npu
            # Consumed here: Ray's own Python processes (agents, log monitor) would inherit it and import torch at
            # start; the job's workers get the backend from its setup hook (driver.job_runtime_env).
            os.environ.pop(ENV_CPU_BACKEND)
            from mindspeed_rl_r3.patches import cpu_backend

            cpu_backend.activate()  # refused next to a real torch_npu: the hook above stays, the error shows
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


# -- driver side: the hydra.main / ray.init wrappers live in mindspeed_rl_r3.patches.driver ---------------------------
def install_driver_capture() -> list[str]:
    """Wrap ``hydra.main`` and ``ray.init`` (idempotent; skipped where the sections are already published)."""
    return driver.apply()
