"""Rollout routing replay (R3) and adaptive quantization noise (AQN) for MoE RL on MindSpeed-RL."""

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic])
