"""tests/test_lora_megatron.py with MindSpeed-LLM's real grouped expert LoRA (``LoraParallelGroupedMLP``, a2c0733):
merged rollout weights, the reference forward and the trainable router on a megatron-core 0.12.1 Qwen3-MoE whose
experts are the real grouped class, and peft's freezing of its LoRA tensors."""

from __future__ import annotations

import pytest
import torch

from tests.lora_models import install_grouped_lora_experts, megatron_qwen3, wrap_lora
from tests.test_lora_megatron import (  # noqa: F401  (the shared tests, run here on the grouped layout)
    _build,
    test_merged_weights_reproduce_the_adapter_forward,
    test_real_model_names_match_the_name_lists,
    test_reference_forward_equals_the_base_model_exactly,
    test_reference_is_restored_after_an_exception,
    test_rollout_weights_equal_merge_of_base_and_adapters_after_training,
    test_router_trainable_option,
)
from tests.upstream.test_lora_sync import grouped_cls  # noqa: F401  (fixture: the real class)

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def lora_env(grouped_cls):  # noqa: F811
    """peft repaired for megatron-core (undone afterwards); the real grouped experts class."""
    from mindspeed_rl_r3.patches import peft_megatron

    yield grouped_cls
    peft_megatron.undo()


@pytest.fixture(scope="module")
def trained(lora_env):
    return ("grouped", *_build("grouped", grouped_cls=lora_env))


def test_peft_freezes_grouped_lora_unless_repaired(lora_env):
    """peft >= 0.21 freezes MindSpeed-LLM's grouped LoRA tensors; the get_peft_model wrapper re-enables them."""
    import peft
    from packaging.version import Version

    from mindspeed_rl_r3.lora.trainable import make_grouped_lora_trainable

    model = megatron_qwen3()
    install_grouped_lora_experts(model, grouped_cls=lora_env)
    lora = wrap_lora(model)
    grouped = [n for n, _ in lora.named_parameters() if "_lora_" in n]
    frozen = [n for n, p in lora.named_parameters() if "_lora_" in n and not p.requires_grad]
    assert grouped and bool(frozen) == (Version(peft.__version__) >= Version("0.21"))
    assert len(make_grouped_lora_trainable(lora)) == len(frozen)
    assert all(p.requires_grad for n, p in lora.named_parameters() if n in grouped)
    assert not any(p.requires_grad for n, p in lora.named_parameters() if n.endswith(("weight1", "weight2")))
    assert all(isinstance(p, torch.nn.Parameter) for n, p in lora.named_parameters() if n in grouped)
