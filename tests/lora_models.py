"""Tiny Qwen3-MoE models for the LoRA tests: a megatron-core GPTModel (local spec, qk-norm, swiglu, RoPE, untied),
the matching transformers model, peft LoRA on it, MindSpeed-LLM's grouped LoRA experts (the real class, which
tests/upstream import from ../shared/upstream), and a stand-in for vllm-ascend's parameter set. Needs megatron-core /
transformers / peft; tests skip without them."""

from __future__ import annotations

import torch

from mindspeed_rl_r3.lora.names import Qwen3MoeShape, vllm_names

SHAPE = Qwen3MoeShape(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=24,
    num_experts=8,
    moe_ffn_hidden_size=32,
    vocab_size=128,
)
TOPK = 2
EPS = 1e-6
LORA_R, LORA_ALPHA = 4, 8
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def settings(shape: Qwen3MoeShape = SHAPE):
    """The package's model builders (the CPU demo's), at the test's small shape."""
    from mindspeed_rl_r3.demo.model import DemoModelSettings

    return DemoModelSettings.from_shape(shape, TOPK, max_len=64, rope_theta=10000.0, eps=EPS)


def megatron_config(shape: Qwen3MoeShape = SHAPE, **overrides):
    from mindspeed_rl_r3.demo.model import megatron_config as build

    return build(settings(shape), moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.001, **overrides)


def megatron_qwen3(shape: Qwen3MoeShape = SHAPE, seed: int = 0):
    from megatron.core import tensor_parallel

    from mindspeed_rl_r3.demo.model import megatron_model

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = megatron_model(settings(shape), moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.001)
    # Norm weights start at one; perturb them so the conversion of every tensor is visible in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def hf_qwen3(shape: Qwen3MoeShape = SHAPE):
    from mindspeed_rl_r3.demo.model import hf_model

    return hf_model(settings(shape))


def load_hf_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load a transformers 5 state dict (what the package's conversions produce: fused ``experts.gate_up_proj
    [E, 2I, H]`` / ``experts.down_proj [E, H, I]``) into ``model``; transformers 4 (the upstream environment pins
    4.57) keeps one module per expert."""
    keys = set(model.state_dict())
    out = {}
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".")
        if name in keys or leaf not in ("gate_up_proj", "down_proj"):
            out[name] = value
            continue
        for e, tensor in enumerate(value):
            if leaf == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = tensor
            else:
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = tensor.chunk(2)
    model.load_state_dict(out)


def tokens(b: int = 2, s: int = 12, vocab: int = SHAPE.vocab_size, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model(ids, positions, mask)


def megatron_loss(model, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    return model(ids, positions, mask, labels=ids.roll(-1, dims=1)).float().mean()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def install_grouped_lora_experts(model, *, grouped_cls, r: int = LORA_R, alpha: int = LORA_ALPHA) -> None:
    """Swap every ``SequentialMLP`` for MindSpeed-LLM's ``LoraParallelGroupedMLP`` (``grouped_cls``) with the same
    weights, as ``lora_moe_layer_init`` builds it when LoRA and ``moe_grouped_gemm`` are on. The adapter starts as a
    no-op."""
    from types import SimpleNamespace

    for layer in model.decoder.layers:
        old = layer.mlp.experts
        experts = grouped_cls(old.num_local_experts, model.config, SimpleNamespace(r=r, lora_alpha=alpha))
        with torch.no_grad():
            fc1 = torch.stack([e.linear_fc1.weight.t() for e in old.local_experts])  # [E, H, 2I]
            fc2 = torch.stack([e.linear_fc2.weight.t() for e in old.local_experts])  # [E, I, H]
            experts.weight1.copy_(fc1.reshape(experts.weight1.shape))
            experts.weight2.copy_(fc2.reshape(experts.weight2.shape))
        layer.mlp.experts = experts


def wrap_lora(model, targets=TARGETS, r: int = LORA_R, alpha: int = LORA_ALPHA):
    from peft import get_peft_model

    from mindspeed_rl_r3.patches import peft_megatron

    peft_megatron.apply()
    peft_megatron.add_config_to_dict(model)
    return get_peft_model(model, peft_megatron.megatron_lora_config(model.config, r, alpha, targets))


def train(model, steps: int = 3, lr: float = 0.05, seed: int = 1) -> None:
    """A few Adam steps on the trainable parameters (LoRA tensors, and the router if made trainable)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        megatron_loss(model, tokens(seed=seed + step)).backward()
        optimizer.step()
    model.eval()


class VllmAscendQwen3Moe(torch.nn.Module):
    """Stand-in for vllm-ascend's ``Qwen3MoeForCausalLM`` parameters after ``process_weights_after_loading``:
    fused ``qkv_proj``, ``w13_weight`` ``[E, H, 2I]`` and ``w2_weight`` ``[E, I, H]`` (E: the experts of one of
    ``infer_ep`` ranks)."""

    def __init__(self, shape: Qwen3MoeShape = SHAPE, dtype: torch.dtype = torch.float32, infer_ep: int = 1):
        super().__init__()
        h, d, i, e = shape.hidden_size, shape.head_dim, shape.moe_ffn_hidden_size, shape.num_experts // infer_ep
        shapes = {
            "qkv_proj.weight": (shape.qkv_rows, h),
            "o_proj.weight": (h, shape.num_attention_heads * d),
            "q_norm.weight": (d,),
            "k_norm.weight": (d,),
            "gate.weight": (shape.num_experts, h),
            "w13_weight": (e, h, 2 * i),
            "w2_weight": (e, i, h),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "embed_tokens.weight": (shape.vocab_size, h),
            "norm.weight": (h,),
            "lm_head.weight": (shape.vocab_size, h),
        }
        self._params = {}
        for name in vllm_names(shape):
            leaf = ".".join(name.split(".")[-2:])
            if leaf not in shapes:
                leaf = name.split(".")[-1]
            self._params[name] = torch.nn.Parameter(torch.zeros(shapes[leaf], dtype=dtype), requires_grad=False)

    def named_parameters(self, *args, **kwargs):
        return iter(self._params.items())


class Wrapper(torch.nn.Module):
    """DDP / Float16Module stand-in: exposes the wrapped model as ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
