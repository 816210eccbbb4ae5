"""Tiny transformers Qwen3-MoE models with random weights (no downloads)."""

from __future__ import annotations

import torch


def tiny_qwen3_moe(seed: int = 0, num_layers: int = 2, num_experts: int = 8, topk: int = 2, vocab: int = 256):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=num_experts,
        num_experts_per_tok=topk,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=512,
    )
    return Qwen3MoeForCausalLM(config).eval()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask
