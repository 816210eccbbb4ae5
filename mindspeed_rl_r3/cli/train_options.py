"""The options of the training entry, shared by ``mindspeed-rl-r3 train`` and ``python -m mindspeed_rl_r3.train``.

They live apart from :mod:`mindspeed_rl_r3.train`, which imports torch (through the config sections): ``--help``
should answer at once, without loading it.
"""

from __future__ import annotations

import argparse

from mindspeed_rl_r3.shipped_configs import shipped_configs_dir


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the entry's options to ``parser`` (run them with :func:`mindspeed_rl_r3.train.run_from_args`)."""
    parser.add_argument("--config-name", "-cn", required=True, help="hydra config name (without .yaml)")
    parser.add_argument("--config-path", "-cp", help=f"config directory (default: {shipped_configs_dir()})")
    parser.add_argument(
        "--cpu-backend",
        action="store_true",
        help="run MindSpeed-RL on this machine's CPU with the stand-ins of mindspeed_rl_r3.patches.cpu_backend and "
        "the pinned upstream sources ($MINDSPEED_RL_R3_UPSTREAM or ../shared/upstream); refused where torch_npu is "
        "installed",
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. rl_config.n_samples_per_prompt=4")
    return parser
