"""Packaging for mindspeed_rl_r3.

torch is required but deliberately unpinned: NPU users keep their own torch 2.7.1 + torch_npu, and CPU machines
install the CPU wheel (torch==2.13.0) before this package, as README.md shows.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mindspeed-rl-r3",
    version="0.1.0",
    description="Rollout routing replay (R3) and adaptive quantization noise (AQN) for MoE RL on MindSpeed-RL",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mindspeed_rl_r3", "mindspeed_rl_r3.*"]),
    install_requires=["torch>=2.1", "numpy>=1.24", "tqdm>=4.60", "xxhash>=3.0", "math-verify>=0.7"],
    extras_require={
        # The CPU reference pipeline: transformers Qwen3-MoE rollout, peft LoRA, Ray, plots. megatron-core is
        # installed beside it (README: 0.12.1 with --no-deps, MindSpeed-RL's pin, without its GPU extras).
        "cpu": ["transformers>=4.57", "peft>=0.13", "ray>=2.40", "matplotlib>=3.7"],
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "math-verify>=0.7",
            "ruff>=0.6",
            "packaging",
            "transformers>=4.57",
            "peft>=0.13",
            "ray>=2.40",
            "hydra-core>=1.3",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["mindspeed-rl-r3=mindspeed_rl_r3.cli.main:main"]},
)
