"""Qwen3-MoE weights between transformers 5, Megatron ``GPTModel`` (local spec) and vLLM layouts. Pure torch.

Megatron ``linear_qkv`` ``[(nh + 2 ng) * d, H]`` groups rows per query group: for each of the ``ng`` groups, its
``nh / ng`` query heads, then its key head, then its value head (``d`` rows each). transformers and vLLM keep
``q`` ``[nh * d, H]``, ``k`` / ``v`` ``[ng * d, H]`` separate (vLLM concatenates them as ``qkv_proj``).
Experts: Megatron local ``linear_fc1`` ``[2I, H]`` (gate rows then up rows) and ``linear_fc2`` ``[H, I]`` are
transformers' ``gate_up_proj[e]`` and ``down_proj[e]``; grouped ``weight1`` / ``weight2`` use the layouts in
:mod:`mindspeed_rl_r3.lora.merge`. Norms, router, embeddings and output layer are copied unchanged. Every
conversion is a permutation of values, so round trips are exact. Inputs are never modified.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mindspeed_rl_r3.lora.merge import (
    grouped_fc1_to_w13,
    grouped_fc2_to_w2,
    merged_state_dict,
    w2_to_grouped_fc2,
    w13_to_grouped_fc1,
)
from mindspeed_rl_r3.lora.names import ExpertLayout, Qwen3MoeShape, hf_names, megatron_names, vllm_names

_SIMPLE = (  # (megatron leaf, transformers/vLLM leaf) within a layer
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.router.weight", "mlp.gate.weight"),
)
_GLOBAL = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
)


def split_qkv(linear_qkv: torch.Tensor, shape: Qwen3MoeShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron grouped ``linear_qkv`` -> ``(q [nh*d, H], k [ng*d, H], v [ng*d, H])``."""
    if linear_qkv.shape[0] != shape.qkv_rows:
        raise ValueError(f"linear_qkv has {linear_qkv.shape[0]} rows, expected {shape.qkv_rows} for {shape}")
    ng, d = shape.num_query_groups, shape.head_dim
    rep = shape.num_attention_heads // ng
    grouped = linear_qkv.reshape(ng, rep + 2, d, -1)
    q = grouped[:, :rep].reshape(ng * rep * d, -1)
    k = grouped[:, rep].reshape(ng * d, -1)
    v = grouped[:, rep + 1].reshape(ng * d, -1)
    return q.clone(), k.clone(), v.clone()


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Qwen3MoeShape) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    ng, d = shape.num_query_groups, shape.head_dim
    rep = shape.num_attention_heads // ng
    expected = (shape.num_attention_heads * d, ng * d, ng * d)
    if (q.shape[0], k.shape[0], v.shape[0]) != expected:
        raise ValueError(f"q/k/v rows {(q.shape[0], k.shape[0], v.shape[0])}, expected {expected} for {shape}")
    cols = q.shape[1:]
    parts = [q.reshape(ng, rep, d, *cols), k.reshape(ng, 1, d, *cols), v.reshape(ng, 1, d, *cols)]
    return torch.cat(parts, dim=1).reshape(shape.qkv_rows, *cols)


def _require(state: Mapping[str, torch.Tensor], names: list[str], what: str) -> None:
    missing = [n for n in names if n not in state]
    extra = sorted(set(state) - set(names))
    if missing or extra:
        raise KeyError(
            f"{what} state does not match the model: missing {len(missing)}: {missing[:4]}, "
            f"unexpected {len(extra)}: {extra[:4]}"
        )


def megatron_expert_layout(state: Mapping[str, torch.Tensor]) -> ExpertLayout:
    """``"grouped"`` if the state has ``mlp.experts.weight1`` tensors, else ``"local"``."""
    return "grouped" if any(k.endswith("mlp.experts.weight1") for k in state) else "local"


def megatron_to_hf(state: Mapping[str, torch.Tensor], shape: Qwen3MoeShape) -> dict[str, torch.Tensor]:
    """Megatron state (wrapper-free, no LoRA names, local or grouped experts) -> transformers 5 state dict."""
    experts = megatron_expert_layout(state)
    _require(state, megatron_names(shape, experts), "Megatron")
    out: dict[str, torch.Tensor] = {}
    for meg, hf in _GLOBAL:
        if meg in state:
            out[hf] = state[meg].clone()
    for i in range(shape.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for meg, hf in _SIMPLE:
            out[h + hf] = state[m + meg].clone()
        for x, part in zip("qkv", split_qkv(state[m + "self_attention.linear_qkv.weight"], shape), strict=True):
            out[h + f"self_attn.{x}_proj.weight"] = part
        if experts == "local":
            fc1 = [state[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in range(shape.num_experts)]
            fc2 = [state[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] for e in range(shape.num_experts)]
            out[h + "mlp.experts.gate_up_proj"] = torch.stack(fc1)
            out[h + "mlp.experts.down_proj"] = torch.stack(fc2)
        else:
            out[h + "mlp.experts.gate_up_proj"] = grouped_fc1_to_w13(
                state[m + "mlp.experts.weight1"], shape.num_experts
            )
            out[h + "mlp.experts.down_proj"] = grouped_fc2_to_w2(state[m + "mlp.experts.weight2"], shape.num_experts)
    return {name: out[name] for name in hf_names(shape)}


def hf_to_megatron(
    state: Mapping[str, torch.Tensor], shape: Qwen3MoeShape, experts: ExpertLayout = "local"
) -> dict[str, torch.Tensor]:
    """transformers 5 state dict -> Megatron state (``experts="local"`` for ``SequentialMLP``, ``"grouped"``)."""
    _require(state, hf_names(shape), "transformers")
    out: dict[str, torch.Tensor] = {}
    for meg, hf in _GLOBAL:
        if hf in state:
            out[meg] = state[hf].clone()
    for i in range(shape.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for meg, hf in _SIMPLE:
            out[m + meg] = state[h + hf].clone()
        q, k, v = (state[h + f"self_attn.{x}_proj.weight"] for x in ("q", "k", "v"))
        out[m + "self_attention.linear_qkv.weight"] = join_qkv(q, k, v, shape)
        gate_up, down = state[h + "mlp.experts.gate_up_proj"], state[h + "mlp.experts.down_proj"]
        if experts == "local":
            for e in range(shape.num_experts):
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e].clone()
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e].clone()
        else:
            out[m + "mlp.experts.weight1"] = w13_to_grouped_fc1(gate_up)
            out[m + "mlp.experts.weight2"] = w2_to_grouped_fc2(down)
    return {name: out[name] for name in megatron_names(shape, experts)}


_VLLM_FROM_HF = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def hf_to_vllm(
    state: Mapping[str, torch.Tensor], shape: Qwen3MoeShape, expert_layout: str = "vllm"
) -> dict[str, torch.Tensor]:
    """transformers 5 -> vLLM names: fused ``qkv_proj`` (q, k, v rows), ``w13_weight`` / ``w2_weight`` in
    ``expert_layout`` ``"vllm"`` (``[E, 2I, H]`` / ``[E, H, I]``) or ``"ascend"`` (``[E, H, 2I]`` / ``[E, I, H]``)."""
    if expert_layout not in ("vllm", "ascend"):
        raise ValueError(f"expert_layout must be 'vllm' or 'ascend', got {expert_layout!r}")
    _require(state, hf_names(shape), "transformers")
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        match = _VLLM_FROM_HF.search(name)
        if match:
            leaf = "w13_weight" if match.group(1) == "gate_up_proj" else "w2_weight"
            value = value.transpose(1, 2).contiguous() if expert_layout == "ascend" else value.clone()
            out[name[: match.start()] + ".mlp.experts." + leaf] = value
        else:
            out[name] = value.clone()
    for i in range(shape.num_layers):
        h = f"model.layers.{i}.self_attn."
        out[h + "qkv_proj.weight"] = torch.cat([state[h + f"{x}_proj.weight"] for x in ("q", "k", "v")])
    return {name: out[name] for name in vllm_names(shape)}


def vllm_to_hf(
    state: Mapping[str, torch.Tensor], shape: Qwen3MoeShape, expert_layout: str = "vllm"
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_vllm`."""
    if expert_layout not in ("vllm", "ascend"):
        raise ValueError(f"expert_layout must be 'vllm' or 'ascend', got {expert_layout!r}")
    _require(state, vllm_names(shape), "vLLM")
    q_rows, kv_rows = shape.num_attention_heads * shape.head_dim, shape.num_query_groups * shape.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            p = name[: -len("qkv_proj.weight")]
            for x, part in zip("qkv", value.split([q_rows, kv_rows, kv_rows]), strict=True):
                out[p + f"{x}_proj.weight"] = part.clone()
        elif name.endswith(("mlp.experts.w13_weight", "mlp.experts.w2_weight")):
            leaf = "gate_up_proj" if name.endswith("w13_weight") else "down_proj"
            value = value.transpose(1, 2).contiguous() if expert_layout == "ascend" else value.clone()
            out[name.rsplit(".", 1)[0] + "." + leaf] = value
        else:
            out[name] = value.clone()
    return {name: out[name] for name in hf_names(shape)}


def megatron_to_vllm(
    state: Mapping[str, torch.Tensor], shape: Qwen3MoeShape, expert_layout: str = "vllm"
) -> dict[str, torch.Tensor]:
    """Megatron state -> vLLM names and layouts (see :func:`hf_to_vllm`)."""
    return hf_to_vllm(megatron_to_hf(state, shape), shape, expert_layout)


def merged_hf_state_dict(model: Any, shape: Qwen3MoeShape) -> dict[str, torch.Tensor]:
    """One call for the rollout: a (peft-wrapped, LoRA, DDP-wrapped, list of chunks) Megatron Qwen3-MoE -> the
    transformers 5 state dict of the policy it trains (every adapter merged, router included; nothing modified)."""
    return megatron_to_hf(merged_state_dict(model), shape)


def hf_config_kwargs(
    shape: Qwen3MoeShape,
    num_experts_per_tok: int,
    rms_norm_eps: float,
    rope_theta: float,
    max_position_embeddings: int,
    norm_topk_prob: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for transformers 5 ``Qwen3MoeConfig`` matching a Megatron model of ``shape`` (all layers
    MoE, swiglu, RoPE on the full head). Megatron's side must use the same ``layernorm_epsilon`` / ``rotary_base``."""
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "moe_intermediate_size": shape.moe_ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups,
        "head_dim": shape.head_dim,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "norm_topk_prob": norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": rms_norm_eps,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
    }
