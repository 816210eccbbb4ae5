"""A composed MindSpeed-RL config as the plan reads it: sections, key precedence, and the model's dimensions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class PlanError(ValueError):
    """A config that cannot be planned at all (missing sections or model dimensions)."""


def to_plain(cfg: Any) -> dict:
    """A DictConfig or mapping as plain nested dicts (interpolations resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    if not isinstance(cfg, Mapping):
        raise PlanError(f"config must be a mapping or an omegaconf DictConfig, got {type(cfg).__name__}")
    return {k: (to_plain(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


class PlanSections:
    """Key lookup with MindSpeed-RL's precedence and the dotted path of where a value came from.

    Megatron keys: ``actor_config`` over ``megatron_training`` over ``model.<name>`` (BaseConfig.update applies the
    model section first, then the training dict, which is megatron_training updated by actor_config).
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.megatron = dict(cfg.get("megatron_training") or {})
        self.actor = dict(cfg.get("actor_config") or {})
        self.rl = dict(cfg.get("rl_config") or {})
        self.gen = dict(cfg.get("generate_config") or {})
        self.model_name = self.actor.get("model", self.megatron.get("model"))
        models = cfg.get("model") or {}
        if self.model_name is None:
            raise PlanError("megatron_training.model is not set: it names the model section (e.g. qwen3_30b_a3b)")
        if self.model_name not in models:
            raise PlanError(
                f"model section 'model.{self.model_name}' not found (megatron_training.model = {self.model_name!r}); "
                f"the defaults list must pull configs/model/{self.model_name}.yaml; found {sorted(models)}"
            )
        self.model = dict(models[self.model_name])

    def meg(self, key: str, default: Any = None) -> Any:
        for section in (self.actor, self.megatron, self.model):
            if key in section and section[key] is not None:
                return section[key]
        return default

    def where(self, key: str) -> str:
        if key in self.actor:
            return f"actor_config.{key}"
        if key in self.megatron:
            return f"megatron_training.{key}"
        if key in self.model:
            return f"model.{self.model_name}.{key}"
        return f"actor_config.{key} (default)"


@dataclass(frozen=True)
class ModelDims:
    """Dimensions the plan needs, from the model section (MegatronConfig keys)."""

    num_layers: int  # including noop layers
    noop_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn: int
    swiglu: bool
    untied: bool
    num_experts: int  # 0 for a dense model
    topk: int
    moe_ffn: int
    shared_ffn: int  # total shared-expert FFN width, 0 if none
    dense_layers: int  # real layers with a dense MLP instead of MoE

    @property
    def real_layers(self) -> int:
        return self.num_layers - self.noop_layers

    @property
    def moe_layers(self) -> int:
        return self.real_layers - self.dense_layers

    @property
    def attention_params(self) -> int:
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden

    @property
    def mlp_factor(self) -> int:
        return 3 if self.swiglu else 2

    @property
    def expert_params(self) -> int:
        """All routed experts of one MoE layer."""
        return self.num_experts * self.mlp_factor * self.hidden * self.moe_ffn

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        per_layer = self.attention_params + 2 * self.hidden
        total = self.real_layers * per_layer
        total += self.moe_layers * (
            self.expert_params + self.router_params + self.mlp_factor * self.hidden * self.shared_ffn
        )
        total += self.dense_layers * self.mlp_factor * self.hidden * self.ffn
        return total + self.embedding_params * (2 if self.untied else 1) + self.hidden

    @classmethod
    def from_sections(cls, s: PlanSections) -> ModelDims:
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if s.meg(k) is None]
        if missing:
            raise PlanError(f"model.{s.model_name} lacks {', '.join(missing)}")
        hidden, heads = int(s.meg("hidden_size")), int(s.meg("num_attention_heads"))
        kv_heads = int(s.meg("num_query_groups", 1)) if s.meg("group_query_attention", False) else heads
        head_dim = int(s.meg("kv_channels") or hidden // heads)
        vocab = s.meg("padded_vocab_size")
        if vocab is None:
            raise PlanError(f"model.{s.model_name}.padded_vocab_size is not set (needed for embedding memory)")
        noop = s.meg("noop_layers")
        noop_count = len([x for x in str(noop).split(",") if x.strip()]) if noop not in (None, "") else 0
        num_layers = int(s.meg("num_layers"))
        experts = int(s.meg("num_experts") or 0)
        first_dense = int(s.meg("first_k_dense_replace") or 0)
        freq = s.meg("moe_layer_freq")
        dense = 0
        if experts:
            real = num_layers - noop_count
            moe = sum(1 for i in range(first_dense, real) if not isinstance(freq, int) or freq <= 1 or i % freq == 0)
            dense = real - moe
        ffn = int(s.meg("ffn_hidden_size") or 4 * hidden)
        moe_ffn = int(s.meg("moe_ffn_hidden_size") or ffn)
        shared = int(s.meg("n_shared_experts") or 0) * moe_ffn
        return cls(
            num_layers=num_layers,
            noop_layers=noop_count,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=int(vocab),
            ffn=ffn,
            swiglu=bool(s.meg("swiglu", False)),
            untied=bool(s.meg("untie_embeddings_and_output_weights", False)),
            num_experts=experts,
            topk=int(s.meg("moe_router_topk", 2)) if experts else 0,
            moe_ffn=moe_ffn,
            shared_ffn=shared,
            dense_layers=dense,
        )
