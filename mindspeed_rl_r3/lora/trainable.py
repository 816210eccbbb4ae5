"""Keep MindSpeed-LLM's grouped-expert LoRA trainable under any peft release.

``LoraParallelGroupedMLP`` is built inside ``MoELayer.__init__`` before peft wraps the model, so peft does not know
its ``weight1_lora_a/_b`` / ``weight2_lora_a/_b``. Up to peft 0.20 ``_mark_only_adapters_as_trainable`` froze every
parameter whose name lacks ``lora_``, which these names contain, so they stayed trainable by accident of naming.
peft 0.21 (huggingface/peft #3490) finds adapter parameters structurally, by tuner layer, and freezes the grouped
LoRA tensors: expert LoRA then silently never trains. Call :func:`make_grouped_lora_trainable` right after
``get_peft_model`` (before DDP and the optimizer are built).
"""

from __future__ import annotations

from typing import Any

from mindspeed_rl_r3.lora.merge import is_grouped_lora_experts
from mindspeed_rl_r3.lora.names import GROUPED_LORA_SUFFIXES, strip_wrappers


def make_grouped_lora_trainable(model: Any) -> list[str]:
    """``requires_grad`` on every grouped LoRA tensor (base ``weight1``/``weight2`` stay frozen); returns the
    wrapper-free names that were frozen and are now trainable."""
    chunks = model if isinstance(model, (list, tuple)) else (model,)
    changed = []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if not is_grouped_lora_experts(module):
                continue
            for suffix in GROUPED_LORA_SUFFIXES:
                param = getattr(module, suffix)
                if not param.requires_grad:
                    param.requires_grad_(True)
                    changed.append(f"{strip_wrappers(name)}.{suffix}")
    return changed
