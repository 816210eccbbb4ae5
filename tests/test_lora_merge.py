"""LoRA merge math and layouts, and Qwen3-MoE weight conversion round trips (pure torch)."""

import pytest
import torch
import torch.nn.functional as F

from mindspeed_rl_r3.lora.convert import (
    hf_to_megatron,
    hf_to_vllm,
    join_qkv,
    megatron_to_hf,
    megatron_to_vllm,
    split_qkv,
    vllm_to_hf,
)
from mindspeed_rl_r3.lora.merge import (
    grouped_fc1_to_w13,
    grouped_fc2_to_w2,
    merge_grouped_fc1,
    merge_grouped_fc2,
    merge_grouped_in_param_dict,
    merge_linear,
    w2_to_grouped_fc2,
    w13_to_grouped_fc1,
)
from mindspeed_rl_r3.lora.names import Qwen3MoeShape, hf_names, megatron_names

SHAPE = Qwen3MoeShape(2, 16, 4, 2, 6, 4, 5, 32)
E, H, FFN, R, SCALING = 4, 16, 5, 3, 2.5


def _grouped(seed=0, experts=E):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "weight1": randn(H, experts * 2 * FFN),
        "weight1_lora_a": randn(H, experts * R),
        "weight1_lora_b": randn(R, experts * 2 * FFN),
        "weight2": randn(experts * FFN, H),
        "weight2_lora_a": randn(experts * FFN, R),
        "weight2_lora_b": randn(experts * R, H),
    }


def _adapter_forward(t, x, e):
    """MindSpeed-LLM's grouped LoRA expert forward (probs 1) for the rows ``x`` of local expert ``e``."""
    w1, w2 = t["weight1"].view(E, H, -1)[e], t["weight2"].view(E, -1, H)[e]
    a1, b1 = t["weight1_lora_a"].view(E, -1, R)[e], t["weight1_lora_b"].view(E, R, -1)[e]
    a2, b2 = t["weight2_lora_a"].view(E, -1, R)[e], t["weight2_lora_b"].view(E, R, -1)[e]
    gate, up = (x @ w1 + (x @ a1) @ b1 * SCALING).chunk(2, dim=-1)
    h = F.silu(gate) * up
    return h @ w2 + (h @ a2) @ b2 * SCALING


def test_merge_linear_is_base_plus_scaled_ba_and_pure():
    w, a, b = torch.randn(7, 5), torch.randn(3, 5), torch.randn(7, 3)
    before = [t.clone() for t in (w, a, b)]
    merged = merge_linear(w, a, b, SCALING)
    torch.testing.assert_close(merged, w + SCALING * b @ a)
    assert all(torch.equal(x, y) for x, y in zip(before, (w, a, b), strict=True))
    assert merge_linear(w.bfloat16(), a, b, SCALING).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"does not match the base weight \(6, 5\)"):
        merge_linear(torch.zeros(6, 5), a, b, SCALING)


def test_grouped_merge_reproduces_the_adapter_forward_in_vllm_layouts():
    t = _grouped()
    before = {k: v.clone() for k, v in t.items()}
    w1 = merge_grouped_fc1(t["weight1"], t["weight1_lora_a"], t["weight1_lora_b"], R, SCALING)
    w2 = merge_grouped_fc2(t["weight2"], t["weight2_lora_a"], t["weight2_lora_b"], R, SCALING)
    assert all(torch.equal(before[k], t[k]) for k in t)
    assert w1.shape == t["weight1"].shape and w2.shape == t["weight2"].shape
    w13, w2v = grouped_fc1_to_w13(w1, E), grouped_fc2_to_w2(w2, E)  # [E, 2I, H], [E, H, FFN]
    x = torch.randn(6, H)
    for e in range(E):
        gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)  # vLLM / transformers: gate rows, then up rows
        merged_out = F.linear(F.silu(gate) * up, w2v[e])
        torch.testing.assert_close(merged_out, _adapter_forward(t, x, e), rtol=1e-4, atol=1e-4)
    ascend = grouped_fc1_to_w13(w1, E, "ascend")
    assert ascend.shape == (E, H, 2 * FFN) and torch.equal(ascend, w1.view(E, H, -1))
    assert torch.equal(grouped_fc2_to_w2(w2, E, "ascend"), w2.view(E, -1, H))
    assert torch.equal(w13_to_grouped_fc1(w13), w1) and torch.equal(w13_to_grouped_fc1(ascend, "ascend"), w1)
    assert torch.equal(w2_to_grouped_fc2(w2v), w2)


def test_grouped_merge_per_ep_shard_equals_the_full_merge():
    """Each EP rank merges its own local experts before any exchange; the shards assemble to the full merge."""
    t = _grouped(seed=3)
    full1 = merge_grouped_fc1(t["weight1"], t["weight1_lora_a"], t["weight1_lora_b"], R, SCALING).view(E, H, -1)
    full2 = merge_grouped_fc2(t["weight2"], t["weight2_lora_a"], t["weight2_lora_b"], R, SCALING).view(E, -1, H)
    per_expert = {  # the per-expert layouts of each stored tensor
        "weight1": (E, H, 2 * FFN),
        "weight1_lora_a": (E, H, R),
        "weight1_lora_b": (E, R, 2 * FFN),
        "weight2": (E, FFN, H),
        "weight2_lora_a": (E, FFN, R),
        "weight2_lora_b": (E, R, H),
    }
    for shard in (slice(0, 2), slice(2, 4)):
        local = {}
        for k, v in t.items():
            part = v.reshape(per_expert[k])[shard]
            rows = H if k in ("weight1", "weight1_lora_a") else (R if k == "weight1_lora_b" else -1)
            cols = {"weight2": H, "weight2_lora_a": R, "weight2_lora_b": H}.get(k, -1)
            local[k] = part.reshape(rows, -1) if cols == -1 else part.reshape(-1, cols)
        m1 = merge_grouped_fc1(local["weight1"], local["weight1_lora_a"], local["weight1_lora_b"], R, SCALING)
        m2 = merge_grouped_fc2(local["weight2"], local["weight2_lora_a"], local["weight2_lora_b"], R, SCALING)
        assert torch.equal(m1.view(2, H, -1), full1[shard])
        assert torch.equal(m2.view(2, -1, H), full2[shard])


def test_grouped_shape_errors_name_the_tensor():
    t = _grouped()
    with pytest.raises(ValueError, match=r"weight1 \(16, 30\) is not \[H=16, E\*F\] for E=4"):
        merge_grouped_fc1(t["weight1"][:, :30], t["weight1_lora_a"], t["weight1_lora_b"], R, SCALING)
    with pytest.raises(ValueError, match=r"weight2_lora_b \(11, 16\) is not \[E\*r, H\]"):
        merge_grouped_fc2(t["weight2"], t["weight2_lora_a"], t["weight2_lora_b"][:11], R, SCALING)


def test_param_dict_merge_keeps_attributes_and_is_idempotent():
    t = _grouped()
    params = {f"decoder.layers.0.mlp.experts.{k}": torch.nn.Parameter(v.clone()) for k, v in t.items()}
    params["decoder.layers.0.mlp.experts.weight1"].tensor_model_parallel = True
    original = params["decoder.layers.0.mlp.experts.weight1"]
    replaced = merge_grouped_in_param_dict(params, R, SCALING)
    assert replaced == ["decoder.layers.0.mlp.experts.weight1", "decoder.layers.0.mlp.experts.weight2"]
    merged = params["decoder.layers.0.mlp.experts.weight1"]
    assert merged is not original and merged.tensor_model_parallel and torch.equal(original, t["weight1"])
    assert torch.equal(merged, merge_grouped_fc1(t["weight1"], t["weight1_lora_a"], t["weight1_lora_b"], R, SCALING))
    assert merge_grouped_in_param_dict(params, R, SCALING) == []
    del params["decoder.layers.0.mlp.experts.weight2_lora_b"]
    params["decoder.layers.0.mlp.experts.weight2"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"needs both .*weight2_lora_a and .*weight2_lora_b"):
        merge_grouped_in_param_dict(params, R, SCALING)


def _random_state(names, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shapes(n), generator=g) for n in names}


def _hf_shape(name):
    s, h = SHAPE, SHAPE.hidden_size
    table = {
        "embed_tokens.weight": (s.vocab_size, h),
        "lm_head.weight": (s.vocab_size, h),
        "q_proj.weight": (s.num_attention_heads * s.head_dim, h),
        "k_proj.weight": (s.num_query_groups * s.head_dim, h),
        "v_proj.weight": (s.num_query_groups * s.head_dim, h),
        "o_proj.weight": (h, s.num_attention_heads * s.head_dim),
        "q_norm.weight": (s.head_dim,),
        "k_norm.weight": (s.head_dim,),
        "gate.weight": (s.num_experts, h),
        "experts.gate_up_proj": (s.num_experts, 2 * s.moe_ffn_hidden_size, h),
        "experts.down_proj": (s.num_experts, h, s.moe_ffn_hidden_size),
    }
    return table.get(".".join(name.split(".")[-2:]), (h,))


def test_conversion_round_trips_are_exact():
    hf = _random_state(hf_names(SHAPE), _hf_shape)
    for experts in ("local", "grouped"):
        meg = hf_to_megatron(hf, SHAPE, experts)
        assert list(meg) == megatron_names(SHAPE, experts)
        back = megatron_to_hf(meg, SHAPE)
        assert list(back) == hf_names(SHAPE) and all(torch.equal(back[k], hf[k]) for k in hf)
        again = hf_to_megatron(back, SHAPE, experts)
        assert all(torch.equal(again[k], meg[k]) for k in meg)
    for layout in ("vllm", "ascend"):
        vllm = hf_to_vllm(hf, SHAPE, layout)
        back = vllm_to_hf(vllm, SHAPE, layout)
        assert all(torch.equal(back[k], hf[k]) for k in hf)
    grouped = hf_to_megatron(hf, SHAPE, "grouped")
    ascend = megatron_to_vllm(grouped, SHAPE, "ascend")
    # vllm-ascend reads MindSpeed's weight1 memory as [E, H, 2I] (qwen_megatron_weight_loader): no transpose needed.
    w1 = grouped["decoder.layers.1.mlp.experts.weight1"]
    assert torch.equal(
        ascend["model.layers.1.mlp.experts.w13_weight"], w1.view(SHAPE.num_experts, SHAPE.hidden_size, -1)
    )


def test_qkv_grouping_per_query_group():
    s = SHAPE
    rows = torch.arange(s.qkv_rows, dtype=torch.float32).unsqueeze(1)
    q, k, v = split_qkv(rows, s)
    rep, d = s.num_attention_heads // s.num_query_groups, s.head_dim
    # group 0 holds q heads 0..rep-1, then k head 0, then v head 0
    assert torch.equal(q[: rep * d, 0], torch.arange(rep * d, dtype=torch.float32))
    assert torch.equal(k[:d, 0], torch.arange(rep * d, (rep + 1) * d, dtype=torch.float32))
    assert torch.equal(v[:d, 0], torch.arange((rep + 1) * d, (rep + 2) * d, dtype=torch.float32))
    assert torch.equal(join_qkv(q, k, v, s), rows)
    with pytest.raises(ValueError, match="linear_qkv has 5 rows"):
        split_qkv(rows[:5], s)
    with pytest.raises(KeyError, match=r"transformers state .* missing 25: \['model\.embed_tokens\.weight'"):
        hf_to_megatron({}, s)
