"""``add_base_layer``, the name rule of the MindSpeed-RL LoRA sync patch. The patches themselves run against the
real MindSpeed-RL in tests/upstream/test_lora_sync.py."""

from tests.lora_models import TARGETS


def test_add_base_layer():
    from mindspeed_rl_r3.patches.mindspeed_rl_lora import add_base_layer

    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert add_base_layer(name, ["linear_qkv"]) == "decoder.layers.0.self_attention.linear_qkv.base_layer.weight"
    assert add_base_layer(name, ["linear_proj"]) == name
    assert add_base_layer("decoder.layers.0.mlp.experts.weight1", TARGETS) == "decoder.layers.0.mlp.experts.weight1"
    once = add_base_layer(name, TARGETS)
    assert add_base_layer(once, TARGETS) == once
