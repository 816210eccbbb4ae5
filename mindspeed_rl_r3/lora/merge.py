"""Merge LoRA adapters into the weights the rollout engine loads. Pure torch; never modifies its inputs.

Dense linears (peft on Megatron ``linear_qkv`` / ``linear_proj`` / ``linear_fc1`` / ``linear_fc2``): weights are
``[out, in]``, ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, and ``W' = W + scaling * B @ A``.

Grouped experts (MindSpeed ``GroupedMLP`` and MindSpeed-LLM ``LoraParallelGroupedMLP``, expert TP 1, which is what
``moe_tp_extend_ep`` or TP 1 gives), for the ``E`` experts local to this rank, hidden ``H``, expert FFN ``I``, rank
``r`` and ``F = 2I`` (swiglu; gate columns ``[0, I)``, up columns ``[I, 2I)``). Every per-expert tensor is a view of
the stored 2-D parameter's memory, exactly as the upstream forward views it::

    weight1        [H, E*F]  viewed [E, H, F]     fc1(x) = x @ W1[e] + scaling * (x @ A1[e]) @ B1[e]
    weight1_lora_a [H, E*r]  viewed [E, H, r]
    weight1_lora_b [r, E*F]  viewed [E, r, F]
    weight2        [E*I, H]  viewed [E, I, H]     fc2(h) = h @ W2[e] + scaling * (h @ A2[e]) @ B2[e]
    weight2_lora_a [E*I, r]  viewed [E, I, r]
    weight2_lora_b [E*r, H]  viewed [E, r, H]

so ``W1'[e] = W1[e] + scaling * A1[e] @ B1[e]`` and ``W2'[e] = W2[e] + scaling * A2[e] @ B2[e]``, returned in the
parameter's own 2-D shape. Merging each rank's local experts before any resharding keeps this EP-correct: expert
parallelism only moves whole experts. Rollout layouts of the merged tensors:

    vLLM ``FusedMoE`` / transformers 5      w13 [E, F, H] (= gate_up_proj), w2 [E, H, I] (= down_proj)
    vllm-ascend after process_weights       w13 [E, H, F],                 w2 [E, I, H]   (transposed)
"""

from __future__ import annotations

from typing import Any

import torch

from mindspeed_rl_r3.lora.names import GROUPED_LORA_SUFFIXES, model_chunks, strip_wrappers

MERGED_MARK = "_r3_lora_merged"


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` in fp32: ``lora_a`` ``[r, in]``, ``lora_b`` ``[out, r]`` -> ``[out, in]``."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"LoRA shapes do not chain: lora_B {tuple(lora_b.shape)} @ lora_A {tuple(lora_a.shape)}")
    return scaling * (lora_b.detach().float() @ lora_a.detach().float())


def merge_linear(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``weight + scaling * B @ A`` as a new tensor of ``weight``'s dtype (sum in fp32)."""
    delta = lora_delta(lora_a, lora_b, scaling)
    if delta.shape != weight.shape:
        raise ValueError(f"LoRA delta {tuple(delta.shape)} does not match the base weight {tuple(weight.shape)}")
    return (weight.detach().float() + delta).to(weight.dtype)


def _grouped_dims(weight1: torch.Tensor, lora_a1: torch.Tensor, rank: int) -> tuple[int, int, int]:
    hidden = lora_a1.shape[0]
    if lora_a1.dim() != 2 or lora_a1.shape[1] % rank:
        raise ValueError(f"weight1_lora_a {tuple(lora_a1.shape)} is not [H, E*r] for lora rank {rank}")
    experts = lora_a1.shape[1] // rank
    if weight1.dim() != 2 or weight1.shape[0] != hidden or weight1.shape[1] % experts:
        raise ValueError(
            f"weight1 {tuple(weight1.shape)} is not [H={hidden}, E*F] for E={experts} local experts "
            "(expert tensor parallelism > 1 is not supported; use moe_tp_extend_ep or TP 1)"
        )
    return experts, hidden, weight1.shape[1] // experts


def merge_grouped_fc1(
    weight1: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, scaling: float
) -> torch.Tensor:
    """Merged ``weight1`` ``[H, E*F]``: ``W1[e] + scaling * A1[e] @ B1[e]`` per local expert (layouts above)."""
    experts, hidden, ffn = _grouped_dims(weight1, lora_a, rank)
    if lora_b.numel() != experts * rank * ffn:
        raise ValueError(f"weight1_lora_b {tuple(lora_b.shape)} is not [r={rank}, E*F={experts * ffn}]")
    a = lora_a.detach().float().reshape(experts, hidden, rank)
    b = lora_b.detach().float().reshape(experts, rank, ffn)
    merged = weight1.detach().float().reshape(experts, hidden, ffn) + scaling * torch.bmm(a, b)
    return merged.reshape(weight1.shape).to(weight1.dtype)


def merge_grouped_fc2(
    weight2: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, scaling: float
) -> torch.Tensor:
    """Merged ``weight2`` ``[E*I, H]``: ``W2[e] + scaling * A2[e] @ B2[e]`` per local expert (layouts above)."""
    if lora_b.dim() != 2 or lora_b.shape[0] % rank:
        raise ValueError(f"weight2_lora_b {tuple(lora_b.shape)} is not [E*r, H] for lora rank {rank}")
    experts, hidden = lora_b.shape[0] // rank, lora_b.shape[1]
    if weight2.dim() != 2 or weight2.shape[1] != hidden or weight2.shape[0] % experts:
        raise ValueError(f"weight2 {tuple(weight2.shape)} is not [E*I, H={hidden}] for E={experts} local experts")
    ffn = weight2.shape[0] // experts
    if lora_a.numel() != experts * ffn * rank:
        raise ValueError(f"weight2_lora_a {tuple(lora_a.shape)} is not [E*I={experts * ffn}, r={rank}]")
    a = lora_a.detach().float().reshape(experts, ffn, rank)
    b = lora_b.detach().float().reshape(experts, rank, hidden)
    merged = weight2.detach().float().reshape(experts, ffn, hidden) + scaling * torch.bmm(a, b)
    return merged.reshape(weight2.shape).to(weight2.dtype)


def grouped_fc1_to_w13(weight1: torch.Tensor, num_experts: int, layout: str = "vllm") -> torch.Tensor:
    """``weight1`` ``[H, E*F]`` -> ``w13`` ``[E, F, H]`` (``layout="vllm"``, = HF ``gate_up_proj``) or
    ``[E, H, F]`` (``"ascend"``, vllm-ascend after loading). Gate rows/columns come before up."""
    per_expert = weight1.reshape(num_experts, weight1.shape[0], -1)
    return _layout(per_expert, layout)


def grouped_fc2_to_w2(weight2: torch.Tensor, num_experts: int, layout: str = "vllm") -> torch.Tensor:
    """``weight2`` ``[E*I, H]`` -> ``w2`` ``[E, H, I]`` (``"vllm"``, = HF ``down_proj``) or ``[E, I, H]``
    (``"ascend"``)."""
    per_expert = weight2.reshape(num_experts, -1, weight2.shape[1])
    return _layout(per_expert, layout)


def w13_to_grouped_fc1(w13: torch.Tensor, layout: str = "vllm") -> torch.Tensor:
    """Inverse of :func:`grouped_fc1_to_w13`: ``[H, E*F]``."""
    per_expert = _layout(w13, layout)  # [E, H, F]; the transpose is its own inverse
    experts, hidden, ffn = per_expert.shape
    # weight1 is the [E, H, F] memory read as [H, E*F], not a transpose.
    return per_expert.contiguous().view(hidden, experts * ffn)


def w2_to_grouped_fc2(w2: torch.Tensor, layout: str = "vllm") -> torch.Tensor:
    """Inverse of :func:`grouped_fc2_to_w2`: ``[E*I, H]``."""
    per_expert = _layout(w2, layout)  # [E, I, H]
    return per_expert.reshape(-1, per_expert.shape[2])


def _layout(per_expert: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "ascend":
        return per_expert.contiguous()
    if layout == "vllm":
        return per_expert.transpose(1, 2).contiguous()
    raise ValueError(f"expert layout must be 'vllm' or 'ascend', got {layout!r}")


# ---- whole models ---------------------------------------------------------------------------------------------------


def is_peft_lora_layer(module: Any) -> bool:
    """A peft LoRA tuner layer (any backend): ``base_layer`` + ``lora_A``/``lora_B`` module dicts + ``scaling``."""
    return all(hasattr(module, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters"))


def is_grouped_lora_experts(module: Any) -> bool:
    """MindSpeed-LLM's ``LoraParallelGroupedMLP`` (or anything with its parameters and ``scaling``/``lora_r``)."""
    names = ("weight1", "weight2", *GROUPED_LORA_SUFFIXES)
    return all(isinstance(getattr(module, n, None), torch.Tensor) for n in names) and hasattr(module, "lora_r")


def peft_layer_delta(module: Any) -> torch.Tensor | None:
    """Sum of ``scaling * B @ A`` over the active, not yet merged adapters of a peft LoRA layer (fp32)."""
    merged = set(getattr(module, "merged_adapters", ()))
    active = module.active_adapters
    active = [active] if isinstance(active, str) else list(active)
    delta = None
    for adapter in active:
        if adapter not in module.lora_A or adapter in merged:
            continue
        d = lora_delta(module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter])
        if getattr(module, "fan_in_fan_out", False):
            d = d.t()
        delta = d if delta is None else delta + d
    return delta


def merged_state_dict(model: Any, clone: bool = True) -> dict[str, torch.Tensor]:
    """The weights the rollout must run, in wrapper-free Megatron names without any LoRA name.

    ``model`` is a (list of) Megatron module(s), possibly wrapped by DDP / Float16Module / peft. peft LoRA layers
    give ``<module>.weight = base + sum(scaling * B @ A)`` over active unmerged adapters; grouped LoRA experts give
    merged ``weight1`` / ``weight2``; every other parameter (router, norms, embeddings) is passed through (cloned
    unless ``clone=False``). Nothing in ``model`` is modified. Tensors are this rank's shards: TP shards of peft
    layers stay consistent (B is column-split or A row-split with the base) and grouped experts are this EP rank's.
    """
    out: dict[str, torch.Tensor] = {}
    for chunk in model_chunks(model):
        modules = dict(chunk.named_modules())
        for name, param in chunk.named_parameters():
            clean = strip_wrappers(name)
            owner_name, _, leaf = name.rpartition(".")
            if "modules_to_save" in clean or "original_module" in clean:
                raise ValueError(f"{name}: peft modules_to_save is not supported; use lora_router_trainable")
            if ".lora_A." in name or ".lora_B." in name or leaf in GROUPED_LORA_SUFFIXES:
                continue
            if name.endswith(".base_layer." + leaf):
                layer_name = name[: -len(".base_layer." + leaf)]
                layer = modules.get(layer_name)
                if layer is None or not is_peft_lora_layer(layer):
                    raise ValueError(f"{name}: no peft LoRA layer at {layer_name}")
                delta = peft_layer_delta(layer) if leaf == "weight" else None
                value = param.detach() if delta is None else (param.detach().float() + delta).to(param.dtype)
                out[strip_wrappers(layer_name) + "." + leaf] = value.clone() if clone and delta is None else value
                continue
            owner = modules.get(owner_name)
            if leaf in ("weight1", "weight2") and owner is not None and is_grouped_lora_experts(owner):
                merge = merge_grouped_fc1 if leaf == "weight1" else merge_grouped_fc2
                lora_a, lora_b = getattr(owner, f"{leaf}_lora_a"), getattr(owner, f"{leaf}_lora_b")
                out[clean] = merge(param, lora_a, lora_b, owner.lora_r, owner.scaling)
                continue
            out[clean] = param.detach().clone() if clone else param.detach()
    return out


def merge_grouped_in_param_dict(param_dict: dict[str, Any], rank: int, scaling: float) -> list[str]:
    """Replace every ``<prefix>weight1`` / ``weight2`` that has grouped LoRA siblings in ``param_dict`` (Megatron
    name -> tensor, as MindSpeed-RL's weight container builds it) by its merged value, a new tensor carrying the
    original's attributes (``tensor_model_parallel``, ``partition_dim``, ...). Idempotent; returns replaced names."""
    replaced = []
    for name in list(param_dict):
        for leaf, merge in (("weight1", merge_grouped_fc1), ("weight2", merge_grouped_fc2)):
            if not name.endswith("." + leaf):
                continue
            prefix = name[: -len(leaf)]
            a_name, b_name = prefix + leaf + "_lora_a", prefix + leaf + "_lora_b"
            if a_name not in param_dict and b_name not in param_dict:
                continue
            if a_name not in param_dict or b_name not in param_dict:
                raise KeyError(f"{name}: grouped LoRA needs both {a_name} and {b_name}")
            base = param_dict[name]
            if getattr(base, MERGED_MARK, False):
                continue
            merged = torch.nn.Parameter(
                merge(base, param_dict[a_name], param_dict[b_name], rank, scaling), requires_grad=False
            )
            for attr, value in vars(base).items():
                if not attr.startswith("_"):
                    setattr(merged, attr, value)
            setattr(merged, MERGED_MARK, True)
            param_dict[name] = merged
            replaced.append(name)
    return replaced
