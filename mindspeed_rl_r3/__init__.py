"""Rollout routing replay (R3) and adaptive quantization noise (AQN) for MoE RL on MindSpeed-RL."""

__version__ = "0.1.0"
