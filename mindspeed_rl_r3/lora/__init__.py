"""MindSpeed LoRA on Qwen3-MoE: parameter names, adapter merge into rollout layouts, weight conversion, the
reference forward with every adapter off, and the optional trainable router. Pure torch; no framework imports."""
