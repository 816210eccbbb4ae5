"""Tiny megatron-core MoE models on CPU for replay tests (needs megatron-core; tests skip without it)."""

from __future__ import annotations

import torch

NUM_EXPERTS = 8
TOPK = 2


def moe_config(num_layers: int = 2, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    params = dict(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=64,
        use_cpu_initialization=True,
        moe_token_dispatcher_type="allgather",
        add_bias_linear=False,
        normalization="RMSNorm",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
        moe_z_loss_coeff=0.001,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    params.update(overrides)
    return TransformerConfig(**params)


def gpt_model(config, vocab_size: int = 128, max_len: int = 64, pre_process: bool = True, post_process: bool = True):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_len,
        pre_process=pre_process,
        post_process=post_process,
    )


def batch(b: int = 2, s: int = 16, vocab_size: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (b, s), generator=g)
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    return tokens, positions, mask


def capture_routing(model) -> tuple[dict[int, torch.Tensor], list]:
    """Forward hooks that store each router's routing map ``[T, E]`` by layer number."""
    from mindspeed_rl_r3.patches.megatron_router import iter_routers

    maps: dict[int, torch.Tensor] = {}
    handles = []
    for _, router in iter_routers(model):

        def hook(module, _inputs, output, n=router.layer_number):
            maps[n] = output[1].detach().clone()

        handles.append(router.register_forward_hook(hook))
    return maps, handles


def map_to_ids(routing_map: torch.Tensor) -> torch.Tensor:
    """Sorted expert ids ``[T, k]`` of a boolean routing map."""
    return routing_map.nonzero()[:, 1].reshape(routing_map.shape[0], -1)
