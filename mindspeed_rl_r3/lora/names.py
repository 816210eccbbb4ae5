"""Qwen3-MoE parameter names in Megatron, transformers 5 and vLLM naming, and the Megatron -> rollout name mapping.

Megatron names follow ``GPTModel`` with the local layer spec (``get_gpt_layer_local_spec(..., qk_layernorm=True)``):
experts either as ``SequentialMLP`` (``mlp.experts.local_experts.{e}.linear_fc1/2``) or as MindSpeed's grouped
experts (``mlp.experts.weight1/weight2``, plus ``weight1_lora_a/_b``, ``weight2_lora_a/_b`` from MindSpeed-LLM's
``LoraParallelGroupedMLP``). peft renames a wrapped linear's weight to ``<module>.base_layer.weight`` and adds
``<module>.lora_A.default.weight`` / ``<module>.lora_B.default.weight``; wrapper prefixes (``module.`` from DDP /
Float16Module, ``base_model.model.`` from peft) are stripped by :func:`strip_wrappers`.

A rollout *slot* is a rollout parameter name, or ``name[e]`` for expert ``e`` of a stacked expert tensor
(``w13_weight``, ``w2_weight`` in vLLM; ``gate_up_proj``, ``down_proj`` in transformers 5). Everything that must
sync maps to slots; :func:`check_name_mapping` asserts every slot is written by exactly one Megatron tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

ExpertLayout = Literal["local", "grouped"]
RolloutNaming = Literal["vllm", "hf"]

PEFT_ADAPTER = "default"
PEFT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
GROUPED_LORA_SUFFIXES = ("weight1_lora_a", "weight1_lora_b", "weight2_lora_a", "weight2_lora_b")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_PEFT_LORA = re.compile(r"^(.+)\.lora_([AB])\.([^.]+)\.weight$")


class NameMappingError(ValueError):
    """The Megatron -> rollout name mapping is not a bijection on what must sync."""


@dataclass(frozen=True)
class Qwen3MoeShape:
    """The dimensions that fix every Qwen3-MoE parameter name and shape (all layers MoE, no shared experts)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    num_experts: int
    moe_ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )

    @classmethod
    def qwen3_30b_a3b(cls, vocab_size: int = 151936) -> Qwen3MoeShape:
        """Qwen3-30B-A3B: 48 layers, hidden 2048, 32 q / 4 kv heads of 128, 128 experts of 768."""
        return cls(48, 2048, 32, 4, 128, 128, 768, vocab_size)

    @classmethod
    def from_hf_config(cls, config: Any) -> Qwen3MoeShape:
        """From a transformers ``Qwen3MoeConfig`` (or anything with the same attribute names)."""
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            num_experts=config.num_experts,
            moe_ffn_hidden_size=config.moe_intermediate_size,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @classmethod
    def from_megatron_config(cls, config: Any, vocab_size: int, tie_word_embeddings: bool = False) -> Qwen3MoeShape:
        """From a megatron-core ``TransformerConfig``."""
        return cls(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups or config.num_attention_heads,
            head_dim=config.kv_channels,
            num_experts=config.num_moe_experts,
            moe_ffn_hidden_size=config.moe_ffn_hidden_size,
            vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings,
        )

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim


def strip_wrappers(name: str) -> str:
    """``module.module.base_model.model.decoder...`` -> ``decoder...`` (DDP, Float16Module and peft prefixes)."""
    while name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name


def peft_names(module: str, adapter: str = PEFT_ADAPTER) -> tuple[str, str, str]:
    """``(base, lora_A, lora_B)`` parameter names of a peft-wrapped linear ``module``."""
    return (
        f"{module}.base_layer.weight",
        f"{module}.lora_A.{adapter}.weight",
        f"{module}.lora_B.{adapter}.weight",
    )


def base_name(name: str) -> str:
    """The name a peft base weight had before wrapping: ``x.base_layer.weight`` -> ``x.weight``."""
    return strip_wrappers(name).replace(".base_layer.", ".")


def lora_owner(name: str) -> str | None:
    """For a LoRA tensor, the (wrapper-free) name of the base weight it is merged into; ``None`` otherwise."""
    name = strip_wrappers(name)
    match = _PEFT_LORA.match(name)
    if match:
        return f"{match.group(1)}.weight"
    for suffix in GROUPED_LORA_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + suffix.split("_", 1)[0]
    return None


def _maybe_peft(module: str, targets: Sequence[str]) -> list[str]:
    if module.rsplit(".", 1)[-1] in targets:
        return list(peft_names(module))
    return [f"{module}.weight"]


def megatron_names(
    shape: Qwen3MoeShape,
    experts: ExpertLayout = "grouped",
    lora_targets: Sequence[str] = (),
    grouped_lora: bool | None = None,
) -> list[str]:
    """Every parameter of a Megatron Qwen3-MoE ``GPTModel`` (wrapper-free), in ``named_parameters`` order.

    ``lora_targets`` are the peft target module names (``linear_qkv``, ``linear_proj``, ``linear_fc1``,
    ``linear_fc2``); with grouped experts peft finds no ``linear_fc1/2`` and MindSpeed-LLM adds the grouped LoRA
    tensors whenever LoRA is on (``grouped_lora`` defaults to ``bool(lora_targets)``).
    """
    if experts not in ("local", "grouped"):
        raise ValueError(f"experts must be 'local' or 'grouped', got {experts!r}")
    grouped_lora = bool(lora_targets) if grouped_lora is None else grouped_lora
    names = ["embedding.word_embeddings.weight"]
    for i in range(shape.num_layers):
        p = f"decoder.layers.{i}."
        names.append(p + "input_layernorm.weight")
        names += _maybe_peft(p + "self_attention.linear_proj", lora_targets)
        names += _maybe_peft(p + "self_attention.linear_qkv", lora_targets)
        names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names += [p + "pre_mlp_layernorm.weight", p + "mlp.router.weight"]
        if experts == "local":
            for e in range(shape.num_experts):
                names += _maybe_peft(p + f"mlp.experts.local_experts.{e}.linear_fc1", lora_targets)
                names += _maybe_peft(p + f"mlp.experts.local_experts.{e}.linear_fc2", lora_targets)
        else:
            names += [p + "mlp.experts.weight1", p + "mlp.experts.weight2"]
            if grouped_lora:
                names += [p + "mlp.experts." + s for s in GROUPED_LORA_SUFFIXES]
    names.append("decoder.final_layernorm.weight")
    if not shape.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_names(shape: Qwen3MoeShape) -> list[str]:
    """Every parameter of a transformers 5 ``Qwen3MoeForCausalLM`` (fused 3-D expert tensors)."""
    names = ["model.embed_tokens.weight"]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in ("q", "k", "v", "o")]
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj", p + "mlp.gate.weight"]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not shape.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def vllm_names(shape: Qwen3MoeShape) -> list[str]:
    """Every parameter of vLLM's / vllm-ascend's ``Qwen3MoeForCausalLM`` (fused qkv, ``FusedMoE`` experts)."""
    names = ["model.embed_tokens.weight"]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        names += [p + "self_attn.qkv_proj.weight", p + "self_attn.o_proj.weight"]
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "mlp.gate.weight", p + "mlp.experts.w13_weight", p + "mlp.experts.w2_weight"]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not shape.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


_STACKED = {"vllm": ("w13_weight", "w2_weight"), "hf": ("gate_up_proj", "down_proj")}


def expected_slots(shape: Qwen3MoeShape, naming: RolloutNaming = "vllm") -> list[str]:
    """Every rollout slot: each rollout parameter, stacked expert tensors split into ``name[e]`` per expert."""
    names = vllm_names(shape) if naming == "vllm" else hf_names(shape)
    stacked = _STACKED[naming]
    slots = []
    for name in names:
        if name.rsplit(".", 1)[-1] in stacked:
            slots += [f"{name}[{e}]" for e in range(shape.num_experts)]
        else:
            slots.append(name)
    return slots


_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.weight",) * 2,
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",) * 2,
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",) * 2,
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",) * 2,
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",) * 2,
    "mlp.router.weight": ("mlp.gate.weight",) * 2,
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def rollout_slots(
    name: str,
    shape: Qwen3MoeShape,
    naming: RolloutNaming = "vllm",
    expert_offset: int = 0,
    num_local_experts: int | None = None,
) -> tuple[str, ...]:
    """The rollout slots one Megatron weight (base weight, not a LoRA tensor) is written to; ``()`` if it has no
    rollout counterpart. Layer and expert indices are not range-checked (:func:`check_name_mapping` reports slots
    outside the model).

    Local expert ``e`` is global expert ``expert_offset + e``; a grouped ``weight1/weight2`` holds
    ``num_local_experts`` (default: all) experts from ``expert_offset``. ``linear_qkv`` maps to q/k/v in HF naming.
    """
    name = base_name(name)
    if name in _GLOBAL_MAP:
        return (_GLOBAL_MAP[name],)
    match = _LAYER.match(name)
    if not match:
        return ()
    layer, rest = int(match.group(1)), match.group(2)
    p = f"model.layers.{layer}."
    col = 0 if naming == "vllm" else 1
    if rest in _LAYER_MAP:
        return (p + _LAYER_MAP[rest][col],)
    if rest == "self_attention.linear_qkv.weight":
        if naming == "vllm":
            return (p + "self_attn.qkv_proj.weight",)
        return tuple(p + f"self_attn.{x}_proj.weight" for x in ("q", "k", "v"))
    fc1, fc2 = _STACKED[naming]
    local = _LOCAL_EXPERT.match(rest)
    if local:
        e = expert_offset + int(local.group(1))
        stacked = fc1 if local.group(2) == "linear_fc1" else fc2
        return (f"{p}mlp.experts.{stacked}[{e}]",)
    if rest in ("mlp.experts.weight1", "mlp.experts.weight2"):
        count = shape.num_experts - expert_offset if num_local_experts is None else num_local_experts
        stacked = fc1 if rest.endswith("1") else fc2
        return tuple(f"{p}mlp.experts.{stacked}[{expert_offset + e}]" for e in range(count))
    return ()


def _preview(items: Iterable[str], limit: int = 6) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return f"{shown}{', ...' if len(items) > limit else ''} ({len(items)} in all)"


def check_name_mapping(
    megatron_param_names: Iterable[str],
    shape: Qwen3MoeShape,
    naming: RolloutNaming = "vllm",
) -> dict[str, tuple[str, ...]]:
    """Assert that the Megatron parameters (of a whole model, wrappers and LoRA allowed) cover every rollout slot
    exactly once; return ``{wrapper-free megatron name: slots}`` for the base weights.

    LoRA tensors must have their base weight (and their A/B partner) in the model; they are merged into the base's
    slots and do not count as writers. Raises :class:`NameMappingError` naming unmapped Megatron names, slots written
    twice (with their writers), slots nobody writes, and LoRA tensors without a base.
    """
    names = [strip_wrappers(n) for n in megatron_param_names]
    present = set(names)
    base_present = {base_name(n) for n in names}
    mapping: dict[str, tuple[str, ...]] = {}
    writers: dict[str, list[str]] = {}
    unmapped, orphans = [], []
    for name in names:
        owner = lora_owner(name)
        if owner is not None:
            partner = _lora_partner(name)
            if owner not in base_present or (partner is not None and partner not in present):
                orphans.append(name)
            continue
        slots = rollout_slots(name, shape, naming)
        if not slots:
            unmapped.append(name)
            continue
        mapping[base_name(name)] = slots
        for slot in slots:
            writers.setdefault(slot, []).append(name)
    expected = set(expected_slots(shape, naming))
    duplicated = {s: w for s, w in writers.items() if len(w) > 1}
    missing = expected - set(writers)
    extra = set(writers) - expected
    problems = []
    if unmapped:
        problems.append(f"Megatron parameters with no {naming} slot: {_preview(unmapped)}")
    if orphans:
        problems.append(f"LoRA tensors without their base weight or partner: {_preview(orphans)}")
    if duplicated:
        shown = [f"{s} <- {' + '.join(w)}" for s, w in sorted(duplicated.items())[:4]]
        problems.append(f"{naming} slots written more than once ({len(duplicated)}): {'; '.join(shown)}")
    if missing:
        problems.append(f"{naming} slots no Megatron parameter writes: {_preview(missing)}")
    if extra:
        problems.append(f"slots outside the {naming} model: {_preview(extra)}")
    if problems:
        raise NameMappingError("; ".join(problems))
    return mapping


def _lora_partner(name: str) -> str | None:
    match = _PEFT_LORA.match(name)
    if match:
        other = "B" if match.group(2) == "A" else "A"
        return f"{match.group(1)}.lora_{other}.{match.group(3)}.weight"
    for suffix in GROUPED_LORA_SUFFIXES:
        if name.endswith("." + suffix):
            other = suffix[:-1] + ("b" if suffix.endswith("a") else "a")
            return name[: -len(suffix)] + other
    return None


def model_chunks(model: Any) -> Iterator[Any]:
    """The model chunks of ``model``: itself, or each element of a (virtual-pipeline) list of chunks."""
    yield from model if isinstance(model, (list, tuple)) else (model,)
