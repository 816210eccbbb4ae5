"""Qwen3-MoE names in Megatron / vLLM / transformers naming and the bijection check (pure Python)."""

import pytest

from mindspeed_rl_r3.lora.names import (
    NameMappingError,
    Qwen3MoeShape,
    check_name_mapping,
    expected_slots,
    hf_names,
    lora_owner,
    megatron_names,
    rollout_slots,
    strip_wrappers,
    vllm_names,
)
from mindspeed_rl_r3.lora.plan import lora_moe_plan_problems

BIG = Qwen3MoeShape.qwen3_30b_a3b()
SMALL = Qwen3MoeShape(2, 64, 4, 2, 24, 8, 32, 128)
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def test_qwen3_30b_name_counts():
    assert len(vllm_names(BIG)) == 1 + 48 * 9 + 2
    assert len(hf_names(BIG)) == 1 + 48 * 11 + 2
    assert len(expected_slots(BIG)) == 1 + 48 * (7 + 2 * 128) + 2
    grouped = megatron_names(BIG, "grouped", TARGETS)
    assert len(grouped) == 1 + 48 * (1 + 3 + 3 + 2 + 1 + 1 + 2 + 4) + 2
    assert "decoder.layers.47.self_attention.linear_qkv.base_layer.weight" in grouped
    assert "decoder.layers.0.mlp.experts.weight2_lora_b" in grouped
    assert not any("linear_fc1" in n for n in grouped)  # peft finds no dense fc1/fc2 in an all-MoE model


@pytest.mark.parametrize("experts", ["local", "grouped"])
@pytest.mark.parametrize("targets", [(), TARGETS, ("linear_qkv",)])
@pytest.mark.parametrize("naming", ["vllm", "hf"])
def test_mapping_is_a_bijection(experts, targets, naming):
    names = megatron_names(SMALL, experts, targets)
    mapping = check_name_mapping(["module.module.base_model.model." + n for n in names], SMALL, naming)
    assert set(mapping) == {n.replace(".base_layer.", ".") for n in names if lora_owner(n) is None}
    slots = [s for v in mapping.values() for s in v]
    assert sorted(slots) == sorted(expected_slots(SMALL, naming))


def test_grouped_expert_slots_follow_the_ep_offset():
    slots = rollout_slots("decoder.layers.1.mlp.experts.weight1", SMALL, "vllm", expert_offset=4, num_local_experts=4)
    assert slots == tuple(f"model.layers.1.mlp.experts.w13_weight[{e}]" for e in range(4, 8))
    local = rollout_slots("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", SMALL, "hf", 2)
    assert local == ("model.layers.0.mlp.experts.down_proj[3]",)
    qkv = rollout_slots("decoder.layers.0.self_attention.linear_qkv.base_layer.weight", SMALL, "hf")
    assert qkv == tuple(f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv")


def test_mapping_errors_name_what_is_wrong():
    names = megatron_names(SMALL, "grouped", TARGETS)
    with pytest.raises(NameMappingError, match=r"no Megatron parameter writes: model\.layers\.1\.mlp\.gate\.weight"):
        check_name_mapping([n for n in names if n != "decoder.layers.1.mlp.router.weight"], SMALL)
    doubled = [*names, "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"]
    with pytest.raises(NameMappingError, match=r"w13_weight\[3\] <- decoder\.layers\.0\.mlp\.experts\.weight1 \+ "):
        check_name_mapping(doubled, SMALL)
    with pytest.raises(NameMappingError, match=r"no vllm slot: decoder\.layers\.0\.mlp\.shared_experts"):
        check_name_mapping([*names, "decoder.layers.0.mlp.shared_experts.linear_fc1.weight"], SMALL)
    orphan = [n for n in names if n != "decoder.layers.0.self_attention.linear_qkv.lora_B.default.weight"]
    with pytest.raises(NameMappingError, match=r"without their base weight or partner: .*linear_qkv\.lora_A"):
        check_name_mapping(orphan, SMALL)
    with pytest.raises(NameMappingError, match=r"outside the vllm model: model\.layers\.5\.mlp\.gate"):
        check_name_mapping([*names, "decoder.layers.5.mlp.router.weight"], SMALL)


def test_lora_owner_and_wrappers():
    assert strip_wrappers("module.module.base_model.model.output_layer.weight") == "output_layer.weight"
    assert lora_owner("base_model.model.decoder.layers.0.self_attention.linear_proj.lora_B.default.weight") == (
        "decoder.layers.0.self_attention.linear_proj.weight"
    )
    assert lora_owner("decoder.layers.0.mlp.experts.weight2_lora_a") == "decoder.layers.0.mlp.experts.weight2"
    assert lora_owner("decoder.layers.0.mlp.experts.weight2") is None


def test_plan_rules():
    pinned = dict(moe_token_dispatcher_type="alltoall_seq", train_tp=4, train_ep=2, infer_tp=1, infer_ep=8)
    assert lora_moe_plan_problems(moe_tp_extend_ep=True, **pinned) == []
    later = lora_moe_plan_problems(moe_tp_extend_ep=True, mindspeed_llm="later", **pinned)
    assert any("rejects LoRA with moe_tp_extend_ep" in p for p in later)
    no_extend = lora_moe_plan_problems(moe_tp_extend_ep=False, **pinned)
    assert any("accepts training EP > 1 only with moe_tp_extend_ep" in p for p in no_extend)
    assert any("never writes the expert weights" in p for p in no_extend)
    allgather = {**pinned, "moe_token_dispatcher_type": "allgather"}
    allgather_problems = lora_moe_plan_problems(moe_tp_extend_ep=True, **allgather)
    assert any("requires moe_token_dispatcher_type: alltoall_seq" in p for p in allgather_problems)
    router = lora_moe_plan_problems(moe_tp_extend_ep=True, lora_router_trainable=True, lora_ckpt_filter=True, **pinned)
    assert any("lora_ckpt_filter" in p for p in router)
