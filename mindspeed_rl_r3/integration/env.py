"""Environment variable names of the integration, importable without torch (``.pth`` and Ray setup hooks load it
in every Python process)."""

import sys
from typing import Any

ENV_SECTIONS = "MINDSPEED_RL_R3_SECTIONS"  # JSON of the r3 / aqn / lora_extras sections, set by the driver
ENV_CONFIG_FILE = "MINDSPEED_RL_R3_CONFIG"  # a YAML file to read the sections from instead
ENV_DISABLE = "MINDSPEED_RL_R3_DISABLE"  # "1": load nothing, whatever the other two say
ENV_CPU_BACKEND = "MINDSPEED_RL_R3_CPU_BACKEND"  # "1": run on a CPU machine (patches/cpu_backend.py), set by the user


def loaded_cpu_backend() -> Any:
    """:mod:`mindspeed_rl_r3.patches.cpu_backend` where this process has installed it, else ``None``: looked up, never
    imported (it imports torch, and NPU machines never load it)."""
    backend = sys.modules.get("mindspeed_rl_r3.patches.cpu_backend")
    return backend if backend is not None and backend.installed() else None
