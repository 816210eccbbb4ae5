"""The CPU reference pipeline (``mindspeed-rl-r3 demo``): GRPO on GSM8K-format data with a tiny Qwen3-MoE, R3, AQN
and LoRA on a local Ray cluster, using the same package code paths as the NPU integration."""
