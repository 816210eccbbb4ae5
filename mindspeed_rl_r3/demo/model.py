"""The demo's tiny Qwen3-MoE, built identically as a transformers model (rollout) and a Megatron GPTModel (trainer).

Settings are the smallest calibrated size, documented in ``docs/demo.md`` (hidden 128, 4 layers, 4 query / 2 KV heads,
16 experts, top-4) with expert ``down_proj`` x10 and ``lm_head`` x10 after the default init. Why: only the rollout's
reduced precision creates routing flips, and R3's benefit grows with how much the MoE output matters to the residual
stream. At random init experts x3 already let R3 cut k3 to about 0.1x; the demo's warm start (``demo.warm_start``)
trains everything but the router and its norm and so shrinks the experts' share again, and x10 keeps R3's cut near
0.3x after it. The router is left unscaled: a sharper router makes flips cheap and weakens R3.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mindspeed_rl_r3.lora.names import Qwen3MoeShape
from mindspeed_rl_r3.routing.trace import MoEModelSpec


@dataclass(frozen=True)
class DemoModelSettings:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    experts: int = 16
    topk: int = 4
    moe_ffn: int = 64
    vocab: int = 512
    max_len: int = 512
    expert_scale: float = 10.0
    lm_head_scale: float = 10.0
    router_scale: float = 1.0
    rope_theta: float = 1_000_000.0
    eps: float = 1e-6

    @property
    def shape(self) -> Qwen3MoeShape:
        return Qwen3MoeShape(
            num_layers=self.layers,
            hidden_size=self.hidden,
            num_attention_heads=self.heads,
            num_query_groups=self.kv_heads,
            head_dim=self.head_dim,
            num_experts=self.experts,
            moe_ffn_hidden_size=self.moe_ffn,
            vocab_size=self.vocab,
        )

    @property
    def spec(self) -> MoEModelSpec:
        return MoEModelSpec(num_layers=self.layers, topk=self.topk, num_experts=self.experts)

    @classmethod
    def from_shape(cls, shape: Qwen3MoeShape, topk: int, **kwargs) -> DemoModelSettings:
        return cls(
            hidden=shape.hidden_size,
            layers=shape.num_layers,
            heads=shape.num_attention_heads,
            kv_heads=shape.num_query_groups,
            head_dim=shape.head_dim,
            experts=shape.num_experts,
            topk=topk,
            moe_ffn=shape.moe_ffn_hidden_size,
            vocab=shape.vocab_size,
            **kwargs,
        )


def hf_model(settings: DemoModelSettings, dtype: torch.dtype = torch.float32):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from mindspeed_rl_r3.lora.convert import hf_config_kwargs

    kwargs = hf_config_kwargs(settings.shape, settings.topk, settings.eps, settings.rope_theta, settings.max_len)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs)).to(dtype).eval()


def initial_hf_state(settings: DemoModelSettings, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights with the calibrated scalings, in transformers naming."""
    torch.manual_seed(seed)
    model = hf_model(settings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.experts.down_proj"):
                param.mul_(settings.expert_scale)
            elif name == "lm_head.weight":
                param.mul_(settings.lm_head_scale)
            elif name.endswith("mlp.gate.weight"):
                param.mul_(settings.router_scale)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_weights(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """``state`` (transformers 5's fused experts: ``experts.gate_up_proj [E, 2F, H]``, ``experts.down_proj [E, H, F]``)
    in checkpoint naming, one ``experts.{e}.{gate,up,down}_proj.weight`` per expert, as ``save_pretrained`` writes it
    and vLLM's loader reads it."""
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("mlp.experts") and leaf == "gate_up_proj":
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", gate[e]
                yield f"{prefix}.{e}.up_proj.weight", up[e]
        elif prefix.endswith("mlp.experts") and leaf == "down_proj":
            for e in range(value.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", value[e]
        else:
            yield name, value


def megatron_config(settings: DemoModelSettings, **overrides):
    """The ``TransformerConfig`` matching :func:`hf_model`; ``overrides`` replace any field."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    params = dict(
        num_layers=settings.layers,
        hidden_size=settings.hidden,
        num_attention_heads=settings.heads,
        num_query_groups=settings.kv_heads,
        kv_channels=settings.head_dim,
        ffn_hidden_size=4 * settings.hidden,
        num_moe_experts=settings.experts,
        moe_router_topk=settings.topk,
        moe_ffn_hidden_size=settings.moe_ffn,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=True,
        normalization="RMSNorm",
        layernorm_epsilon=settings.eps,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    params.update(overrides)
    return TransformerConfig(**params)


def megatron_model(settings: DemoModelSettings, **overrides):
    """Megatron GPTModel (local spec: qk-norm, SwiGLU experts, RoPE, untied output) in fp32 on CPU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = megatron_config(settings, **overrides)
    spec = get_gpt_layer_local_spec(
        num_experts=settings.experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=settings.vocab,
        max_sequence_length=settings.max_len,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(settings.rope_theta),
    )
