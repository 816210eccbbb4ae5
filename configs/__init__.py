"""The shipped hydra configs; installed as the package ``mindspeed_rl_r3.configs`` (see pyproject.toml).

This file makes the folder a regular package, so ``importlib.resources`` finds it in a wheel and through an editable
install alike. Resolve configs with :mod:`mindspeed_rl_r3.shipped_configs`, never with a path relative to a module.
"""
