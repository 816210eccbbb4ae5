"""``mindspeed-rl-r3 plan``: check a MindSpeed-RL config's parallel layout against the model, and estimate memory.

:func:`plan_config` reads a composed config (the hydra sections ``model``, ``megatron_training``, ``actor_config``,
``rl_config``, ``generate_config`` and optionally ``r3``) and returns::

    {"ok": bool, "errors": [str], "warnings": [str], "layout": {...}, "model": {...},
     "memory_gib_per_npu": {"with_lora": {...}, "without_lora": {...}, "active": ..., "hbm": ..., ...},
     "assumptions": [str]}

Every error names the config key it is about and the rule it breaks, and where the rule comes from: Megatron
(``num_query_groups % TP``, ``(DP * CP) % EP``), MindSpeed-LLM (LoRA on MoE needs ``alltoall_seq``; newer releases
reject LoRA with ``moe_tp_extend_ep``; the all-to-all overlap needs ``moe_tp_extend_ep`` when TP > 1),
MindSpeed-RL (``validate_rl_args`` batch and resource rules; its weight resharding accepts training EP > 1 only with
``moe_tp_extend_ep`` and needs ``(infer TP * infer EP) % training expert group == 0``) and vLLM (``VLLM_DP_SIZE`` =
``infer_expert_parallel_size`` for MoE; the KV cache must hold one ``max_model_len`` sequence).

Nothing here imports torch or an upstream framework; hydra/omegaconf are needed only by :func:`load_config`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
BF16 = 2
FP32 = 4
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

ASSUMPTIONS = (
    "weights bf16 (2 B/param); Megatron keeps bf16 gradients in fp32 buffers (4 B per trainable param, "
    "accumulate_allreduce_grads_in_fp32 is forced under bf16), not sharded",
    "Adam: fp32 master copy + 2 fp32 moments = 12 B per trainable param, sharded over DP*CP for dense and over the "
    "expert data-parallel group (DP*CP/EP) for expert params with use_distributed_optimizer; 0 with swap_optimizer",
    "LoRA (MindSpeed-LLM): frozen base weights have no grads or optimizer state; targeted linears get A (r x in) "
    "and B (out x r) with the TP-sharded side split over TP; every MoE layer gets grouped-expert LoRA on fc1 and fc2 "
    "for each local expert whatever the targets",
    "expert params per NPU = all experts / (EP * TP): with moe_tp_extend_ep experts spread over TP*EP ranks, without "
    "it each of E/EP experts is tensor-sharded over TP (Megatron's expert_tensor_parallel_size defaults to TP)",
    "router weights, norms and LoRA A of column-parallel / B of row-parallel linears are replicated over TP",
    "worst pipeline stage: ceil(real layers / PP) layers plus the embedding (first stage) or the output layer",
    "activations: see activation_bytes_per_token(); tokens per micro-batch = micro_batch_size * (max_prompt_length + "
    "sampling max_tokens), or max_packing_token_size with use_dynamic_bsz; 1F1B keeps min(PP, micro-batches) "
    "micro-batches in flight on the first stage",
    "logits: tokens * vocab/TP * 10 B on the last stage (bf16 logits + fp32 log-softmax + fp32 gradient)",
    "rollout: vLLM bf16 weights with experts over infer TP * infer EP ranks and dense weights over infer TP; KV "
    "cache = gpu_memory_utilization * HBM - vLLM weights - training state left on the NPU (params/grads/optimizer "
    "unless offloaded) - a profile-run reserve; KV bytes/token = 2 * layers * max(1, kv_heads/infer TP) * head_dim * 2",
    "training and rollout do not overlap in time (integrated worker: vLLM weights and KV are released before "
    "training, training state is offloaded during rollout when offload_train_* is set); peak = max of the two",
    "the reference model costs nothing extra with share_backbone; otherwise it is offloaded outside its forward",
)


class PlanError(ValueError):
    """A config that cannot be planned at all (missing sections or model dimensions)."""


# --------------------------------------------------------------------------------------------------- config access


def _plain(cfg: Any) -> dict:
    """A DictConfig or mapping as plain nested dicts (interpolations resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    if not isinstance(cfg, Mapping):
        raise PlanError(f"config must be a mapping or an omegaconf DictConfig, got {type(cfg).__name__}")
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


class _Sections:
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


# --------------------------------------------------------------------------------------------------------- model


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
    def from_sections(cls, s: _Sections) -> ModelDims:
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


def activation_bytes_per_token(m: ModelDims, *, moe: bool) -> int:
    """Activation bytes one token keeps for backward in one layer, bf16, before any parallel split.

    Attention (flash attention, no ``s^2`` term, dropout 0)::

        2 * (H + H + (heads + 2*kv_heads) * head_dim + heads * head_dim)
             ^norm in ^qkv in ^q, k, v                 ^core output (proj input)

    MoE MLP::

        2*H + 2*H + 8*E + k * (2*H + 2*2F + 2*F + 2*H)
        ^norm in ^router/dispatch in ^fp32 logits+probs ^per routed copy: fc1 in, fc1 out (gate+up), act out, fc2 out

    Dense MLP (SwiGLU): ``2*H + 2*H + 2*2F + 2*F + 2*H``. :func:`plan_config` divides the sum by TP (sequence
    parallelism and tensor/expert sharding split it) and by CP, multiplies by the tokens of a micro-batch, the layers
    of a stage and the micro-batches 1F1B keeps in flight. With full recompute a recomputed layer keeps only its
    input (``2*H`` per token). Measured numbers on NPU differ by the fused kernels' workspaces; expect ~+/-30%.
    """
    h = m.hidden
    attn = 2 * (2 * h + (m.heads + 2 * m.kv_heads) * m.head_dim + m.heads * m.head_dim)
    if moe:
        f = m.moe_ffn
        mlp = 4 * h + 8 * m.num_experts + m.topk * (4 * h + 6 * f)
        if m.shared_ffn:
            mlp += 4 * h + 6 * m.shared_ffn
    else:
        mlp = 6 * h + 6 * m.ffn
    return attn + mlp


# ------------------------------------------------------------------------------------------------------- the plan


def _int(value: Any, where: str, errors: list[str], default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        errors.append(f"{where}={value!r}: expected an integer")
        return default


def plan_config(
    cfg: Mapping | Any,
    *,
    num_npus: int | None = None,
    nnodes: int | None = None,
    npu_memory_gib: float = 64.0,
    runtime_env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the parallel layout of a composed MindSpeed-RL config and estimate per-NPU memory.

    ``cfg`` is a dict or DictConfig with the hydra sections. ``num_npus`` is the NPU count the job gets
    (NNODES * NPUS_PER_NODE); when given it must equal ``rl_config.actor_resource.num_npus``. ``nnodes`` enables the
    per-node rules (rule-reward workers, TP inside a node). ``npu_memory_gib`` is the HBM of one NPU (64 for Atlas
    A2 910B and each A3 die). ``runtime_env`` is the Ray runtime env (``{"env_vars": {...}}``) if it should be
    cross-checked. Returns ``{"ok", "errors", "warnings", "layout", "model", "memory_gib_per_npu", "assumptions"}``;
    ``ok`` is False when any error was found. Raises :class:`PlanError` only when the config lacks what a plan needs
    (the model section or its dimensions).
    """
    s = _Sections(_plain(cfg))
    m = ModelDims.from_sections(s)
    errors: list[str] = []
    warnings: list[str] = []
    W = s.where

    tp = _int(s.meg("tensor_model_parallel_size"), W("tensor_model_parallel_size"), errors, 1) or 1
    pp = _int(s.meg("pipeline_model_parallel_size"), W("pipeline_model_parallel_size"), errors, 1) or 1
    cp = _int(s.meg("context_parallel_size"), W("context_parallel_size"), errors, 1) or 1
    ep = _int(s.meg("expert_model_parallel_size"), W("expert_model_parallel_size"), errors, 1) or 1
    extend = bool(s.meg("moe_tp_extend_ep", False))
    lora_targets = list(s.meg("lora_target_modules") or [])
    lora = bool(lora_targets)
    lora_r = _int(s.meg("lora_r", 8), W("lora_r"), errors, 8) or 8
    for name, value in (("TP", tp), ("PP", pp), ("CP", cp), ("EP", ep)):
        if value < 1:
            errors.append(f"{name} = {value}: parallel sizes must be >= 1")
    tp, pp, cp, ep = max(tp, 1), max(pp, 1), max(cp, 1), max(ep, 1)

    resource = s.rl.get("actor_resource") or {}
    world = _int(resource.get("num_npus"), "rl_config.actor_resource.num_npus", errors)
    if world is None:
        errors.append("rl_config.actor_resource.num_npus is not set: it is the NPU count of the integrated worker")
        world = num_npus or tp * pp * cp
    if num_npus is not None and num_npus != world:
        errors.append(
            f"world-size mismatch: rl_config.actor_resource.num_npus = {world} but the job has {num_npus} NPUs "
            "(NNODES * NPUS_PER_NODE); they must be equal"
        )
    model_parallel = tp * pp * cp
    if world % model_parallel:
        errors.append(
            f"world size {world} (rl_config.actor_resource.num_npus) is not divisible by TP * PP * CP = "
            f"{tp} * {pp} * {cp} = {model_parallel}: world = TP x PP x CP x DP must hold with an integer DP"
        )
    dp = max(world // model_parallel, 1)

    # ---- tensor parallel vs the model (Megatron divides these by TP and asserts)
    if m.heads % tp:
        errors.append(f"{W('tensor_model_parallel_size')}={tp}: num_attention_heads {m.heads} is not divisible by TP")
    if m.kv_heads % tp:
        errors.append(
            f"{W('tensor_model_parallel_size')}={tp}: num_query_groups (KV heads) {m.kv_heads} is not divisible by TP "
            f"(Megatron shards whole KV groups: num_query_groups % TP == 0); valid TP: "
            f"{[t for t in range(1, m.kv_heads + 1) if m.kv_heads % t == 0 and m.heads % t == 0]}"
        )
    if m.hidden % tp:
        errors.append(f"{W('tensor_model_parallel_size')}={tp}: hidden_size {m.hidden} is not divisible by TP")
    if m.vocab % tp:
        errors.append(f"{W('tensor_model_parallel_size')}={tp}: padded_vocab_size {m.vocab} is not divisible by TP")
    etp = 1 if extend else tp
    if m.num_experts and m.moe_ffn % etp:
        errors.append(f"{W('tensor_model_parallel_size')}={tp}: moe_ffn_hidden_size {m.moe_ffn} not divisible by TP")
    if tp == 1 and s.meg("sequence_parallel", False):
        warnings.append("sequence_parallel with TP 1 has no effect (Megatron turns it off)")

    # ---- pipeline
    layer_list = s.meg("num_layer_list")
    if layer_list not in (None, ""):
        stages = [int(x) for x in str(layer_list).split(",") if x.strip()]
        if len(stages) != pp or sum(stages) != m.num_layers:
            errors.append(
                f"{W('num_layer_list')}={layer_list!r}: needs {pp} entries (PP) summing to num_layers {m.num_layers}"
            )
        stage_layers = max(stages) if stages else math.ceil(m.num_layers / pp)
    else:
        if m.num_layers % pp:
            errors.append(
                f"{W('pipeline_model_parallel_size')}={pp}: num_layers {m.num_layers} is not divisible by PP "
                "(set num_layer_list for an uneven split, or noop_layers)"
            )
        stage_layers = math.ceil(m.num_layers / pp)
    real_stage_layers = min(stage_layers, math.ceil(m.real_layers / pp))
    vpp = s.meg("num_layers_per_virtual_pipeline_stage")
    if vpp and pp > 1 and stage_layers % int(vpp):
        errors.append(
            f"{W('num_layers_per_virtual_pipeline_stage')}={vpp}: must divide the {stage_layers} layers/stage"
        )

    # ---- context parallel
    if cp > 1 and s.meg("variable_seq_lengths", False):
        errors.append(
            f"{W('context_parallel_size')}={cp} with variable_seq_lengths: MindSpeed-LLM forbids context parallelism "
            "with variable sequence lengths"
        )

    # ---- experts
    train_ep_group = ep * tp if extend else ep  # MindSpeed-RL's resharding view of the training expert group
    if m.num_experts:
        if m.num_experts % ep:
            errors.append(f"{W('expert_model_parallel_size')}={ep}: num_experts {m.num_experts} is not divisible by EP")
        if extend and m.num_experts % (ep * tp):
            errors.append(
                f"moe_tp_extend_ep spreads experts over TP * EP = {ep * tp} ranks: num_experts {m.num_experts} is not "
                "divisible by it"
            )
        if (dp * cp) % ep:
            errors.append(
                f"{W('expert_model_parallel_size')}={ep}: EP must divide DP * CP = {dp} * {cp} (Megatron builds expert "
                f"groups inside the data-parallel ranks: world % (ETP * EP * PP) == 0)"
            )
        if ep > 1 and not extend:
            errors.append(
                f"{W('expert_model_parallel_size')}={ep} without moe_tp_extend_ep: MindSpeed-RL's weight resharding "
                "(MegatronStyleVllmWeightContainer) accepts training EP > 1 only with moe_tp_extend_ep; "
                "set moe_tp_extend_ep: true or EP 1"
            )
        dispatcher = s.meg("moe_token_dispatcher_type")
        if s.meg("moe_alltoall_overlap_comm", False):
            if dispatcher != "alltoall_seq":
                errors.append("moe_alltoall_overlap_comm needs moe_token_dispatcher_type: alltoall_seq (MindSpeed-LLM)")
            if not (s.meg("moe_permutation_async_comm", False) and s.meg("moe_grouped_gemm", False)):
                errors.append("moe_alltoall_overlap_comm needs moe_permutation_async_comm and moe_grouped_gemm")
            if tp > 1 and not extend:
                errors.append(
                    f"{W('moe_alltoall_overlap_comm')}: with TP {tp} > 1 MindSpeed-LLM allows the all-to-all overlap "
                    "only with moe_tp_extend_ep; set moe_alltoall_overlap_comm: false"
                )
        if extend and dispatcher == "allgather":
            errors.append("moe_tp_extend_ep is not supported with moe_token_dispatcher_type: allgather (MindSpeed-LLM)")
        if lora:
            if dispatcher != "alltoall_seq":
                errors.append(
                    f"{W('moe_token_dispatcher_type')}={dispatcher!r}: LoRA on an MoE model requires "
                    "moe_token_dispatcher_type: alltoall_seq (MindSpeed-LLM LoraFeature.validate_args)"
                )
            if extend:
                warnings.append(
                    f"{W('moe_tp_extend_ep')}=true with LoRA: valid on the pinned MindSpeed-LLM a2c0733; later "
                    "MindSpeed-LLM (c77308a) rejects it ('Lora is not supported with moe-tp-extend-ep'). MindSpeed-RL "
                    "05a90d77 needs it for training EP and for syncing experts to an EP rollout, so the two cannot "
                    "be combined on the newer MindSpeed-LLM"
                )
            if not s.meg("moe_grouped_gemm", False):
                warnings.append(
                    "LoRA on MoE without moe_grouped_gemm: MindSpeed-LLM's expert LoRA (LoraParallelGroupedMLP) is "
                    "installed only for grouped GEMM; sequential experts get LoRA only through linear_fc1/linear_fc2"
                )

    # ---- LoRA and the reference model
    if s.rl.get("share_backbone"):
        if not lora:
            errors.append("rl_config.share_backbone needs LoRA (megatron_training.lora_target_modules)")
        if s.meg("stage") == "ray_dapo":
            errors.append("rl_config.share_backbone cannot be used with stage ray_dapo")
        if not s.rl.get("use_integrated_worker", True):
            errors.append("rl_config.share_backbone needs use_integrated_worker: true")
    if s.rl.get("use_integrated_worker", True):
        for section in ("ref_config", "reward_config"):
            if section in s.cfg:
                errors.append(f"{section} must not be set with rl_config.use_integrated_worker (MindSpeed-RL)")
    if lora and lora_r < 1:
        errors.append(f"{W('lora_r')}={lora_r}: must be >= 1")

    # ---- precision and sequence lengths
    if not s.meg("bf16", False):
        errors.append(f"{W('bf16')}: MindSpeed-RL requires bf16: true")
    if s.gen.get("dtype", "bfloat16") != "bfloat16":
        errors.append(f"generate_config.dtype={s.gen.get('dtype')!r}: MindSpeed-RL requires bfloat16")
    sampling = s.gen.get("sampling_config") or {}
    max_tokens = int(sampling.get("max_tokens", 128))
    max_prompt = int(s.rl.get("max_prompt_length", 512))
    seq_length = _int(s.meg("seq_length"), W("seq_length"), errors)
    max_model_len = int(s.gen.get("max_model_len", 2048))
    if seq_length is None:
        errors.append(f"{W('seq_length')} is not set")
    elif max_model_len < seq_length:
        errors.append(f"generate_config.max_model_len {max_model_len} < {W('seq_length')} {seq_length} (MindSpeed-RL)")
    if max_model_len < max_prompt + max_tokens:
        warnings.append(
            f"generate_config.max_model_len {max_model_len} < max_prompt_length {max_prompt} + sampling max_tokens "
            f"{max_tokens}: long prompts get fewer response tokens"
        )
    max_pos = s.meg("max_position_embeddings")
    if max_pos and max_prompt + max_tokens > int(max_pos):
        warnings.append(f"prompt + response ({max_prompt + max_tokens}) exceeds max_position_embeddings {max_pos}")
    if s.rl.get("use_remove_padding"):
        if not s.meg("reset_attention_mask", False):
            errors.append("rl_config.use_remove_padding needs reset_attention_mask: true (MindSpeed-RL)")
        if pp > 1 and not s.meg("no_pad_to_seq_lengths", False):
            errors.append("rl_config.use_remove_padding with PP > 1 needs no_pad_to_seq_lengths: true (MindSpeed-RL)")

    # ---- batches (MindSpeed-RL validate_rl_args and the update loop)
    gbs = _int(s.meg("global_batch_size"), W("global_batch_size"), errors)
    mbs = _int(s.meg("micro_batch_size"), W("micro_batch_size"), errors, 1) or 1
    n = int(s.rl.get("n_samples_per_prompt", 1))
    mini = int(s.rl.get("mini_batch_size", 1))
    itp = int(s.gen.get("infer_tensor_parallel_size", 8))
    ipp = int(s.gen.get("infer_pipeline_parallel_size", 1))
    iep = int(s.gen.get("infer_expert_parallel_size", 1))
    gen_dp = max(world // max(itp * ipp, 1), 1)
    microbatches = 1
    if gbs is None:
        errors.append(f"{W('global_batch_size')} is not set")
    else:
        if (gbs * n) % mbs:
            errors.append(
                f"global_batch_size * n_samples_per_prompt = {gbs * n} is not divisible by micro_batch_size {mbs}"
            )
        if gbs % dp:
            errors.append(f"{W('global_batch_size')}={gbs} is not divisible by training DP {dp} (MindSpeed-RL)")
        elif (gbs // dp * n) % mbs:
            errors.append(
                f"global_batch_size / DP * n_samples = {gbs // dp * n} is not divisible by micro_batch_size {mbs}"
            )
        if gbs % gen_dp:
            errors.append(
                f"{W('global_batch_size')}={gbs} is not divisible by the rollout data-parallel size "
                f"num_npus / (infer TP * infer PP) = {gen_dp} (MindSpeed-RL)"
            )
        dispatch = s.rl.get("actor_rollout_dispatch_size") or (gbs * n // gen_dp)
        if dispatch and gbs % gen_dp == 0 and (gbs // gen_dp * n) % dispatch:
            errors.append(
                f"rollout samples per rank {gbs // gen_dp * n} not divisible by actor_rollout_dispatch_size {dispatch}"
            )
        if gbs % mini:
            warnings.append(
                f"global_batch_size {gbs} is not a multiple of rl_config.mini_batch_size {mini}: "
                "the last mini-batch is smaller"
            )
        if nnodes and gbs % nnodes:
            errors.append(
                f"{W('global_batch_size')}={gbs} must be divisible by the {nnodes} nodes (one rule-reward worker per "
                "node, MindSpeed-RL)"
            )
        per_dp = mini * n // dp
        if (mini * n) % dp:
            errors.append(f"rl_config.mini_batch_size * n_samples = {mini * n} is not divisible by training DP {dp}")
        elif per_dp % mbs:
            errors.append(f"mini-batch per DP rank {per_dp} is not divisible by micro_batch_size {mbs}")
        microbatches = max(per_dp // mbs, 1)

    # ---- rollout side: vLLM + MindSpeed-RL resharding
    infer_ep_group = itp * iep  # vLLM's EP group is infer TP x VLLM_DP_SIZE (= infer_expert_parallel_size)
    if ipp != 1:
        errors.append(f"generate_config.infer_pipeline_parallel_size={ipp}: MindSpeed-RL supports only 1")
    if world % max(itp * ipp, 1):
        errors.append(f"num_npus {world} is not divisible by infer TP * infer PP = {itp * ipp}")
    if m.heads % itp:
        errors.append(f"generate_config.infer_tensor_parallel_size={itp}: num_attention_heads {m.heads} not divisible")
    if not (m.kv_heads % itp == 0 or itp % m.kv_heads == 0):
        errors.append(
            f"generate_config.infer_tensor_parallel_size={itp}: vLLM needs KV heads {m.kv_heads} divisible by infer TP "
            "or infer TP divisible by the KV heads"
        )
    if tp > itp and tp % itp:
        errors.append(f"training TP {tp} is not a multiple of infer TP {itp} (MindSpeed-RL resharding)")
    if tp < itp and (world // pp) % itp:
        errors.append(f"infer TP {itp} > training TP {tp} needs (num_npus / PP) % infer TP == 0 (MindSpeed-RL)")
    if m.num_experts:
        if iep > 1 and not s.gen.get("enable_expert_parallel", False):
            errors.append(
                f"generate_config.infer_expert_parallel_size={iep} needs enable_expert_parallel: true "
                "(VLLM_DP_SIZE is set from it only then)"
            )
        if world % infer_ep_group:
            errors.append(
                f"vLLM expert groups of infer TP * infer EP = {itp} * {iep} = {infer_ep_group} NPUs do not tile the "
                f"{world} NPUs"
            )
        if m.num_experts % infer_ep_group:
            errors.append(f"num_experts {m.num_experts} is not divisible by infer TP * infer EP = {infer_ep_group}")
        if infer_ep_group % train_ep_group:
            errors.append(
                f"infer TP * infer EP = {infer_ep_group} is not a multiple of the training expert group "
                f"{'TP * EP' if extend else 'EP'} = {train_ep_group} (MindSpeed-RL resharding)"
            )
        if infer_ep_group > 1 and not extend:
            errors.append(
                f"infer TP * infer EP = {infer_ep_group} > 1 without moe_tp_extend_ep: MindSpeed-RL's get_infer_params "
                "skips expert weights in the non-expert update and writes them only in its EP update, which runs only "
                "with moe_tp_extend_ep, so the rollout would keep dummy experts; set moe_tp_extend_ep: true"
            )
        env_vars = dict((runtime_env or {}).get("env_vars") or {})
        if "VLLM_DP_SIZE" in env_vars and str(env_vars["VLLM_DP_SIZE"]) != str(iep):
            message = (
                f"runtime env VLLM_DP_SIZE={env_vars['VLLM_DP_SIZE']} but generate_config.infer_expert_parallel_size="
                f"{iep}: for MoE they must be equal"
            )
            if s.gen.get("enable_expert_parallel", False):
                warnings.append(message + " (the entry script overwrites VLLM_DP_SIZE with the latter)")
            else:
                errors.append(message)
    if nnodes:
        if world % nnodes:
            errors.append(f"num_npus {world} is not divisible by nnodes {nnodes}")
        else:
            per_node = world // nnodes
            if tp > per_node or per_node % tp:
                warnings.append(f"TP {tp} does not fit inside one node of {per_node} NPUs: TP traffic crosses nodes")
            if m.num_experts and infer_ep_group > per_node:
                warnings.append(
                    f"vLLM expert group of {infer_ep_group} NPUs spans nodes: all-to-all crosses the network"
                )

    # ---- R3 rollout capture constraints
    r3 = s.cfg.get("r3") or {}
    if r3 and str(r3.get("mode", "off")).lower() not in ("off", "none", "false"):
        if s.gen.get("torchair_graph", False):
            errors.append("generate_config.torchair_graph: R3 capture does not support torchair graph mode; set false")
        if not m.num_experts:
            errors.append(f"r3.mode={r3.get('mode')!r} on a dense model: routing replay needs MoE layers")

    # ---- memory
    tokens = mbs * (max_prompt + max_tokens)
    if s.rl.get("use_dynamic_bsz"):
        tokens = int(s.rl.get("max_packing_token_size") or s.rl.get("update_max_packing_token_size") or tokens)
    memory = _memory(
        s,
        m,
        tp=tp,
        pp=pp,
        cp=cp,
        dp=dp,
        ep=ep,
        extend=extend,
        lora_targets=lora_targets or ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        lora_r=lora_r,
        stage_layers=real_stage_layers,
        tokens=tokens,
        microbatches=microbatches,
        itp=itp,
        iep=iep,
        hbm_gib=npu_memory_gib,
    )
    memory["active"] = "with_lora" if lora else "without_lora"
    active = memory[memory["active"]]
    hbm = npu_memory_gib
    if active["train_total"] > 0.95 * hbm:
        errors.append(
            f"estimated training peak {active['train_total']:.1f} GiB per NPU exceeds 95% of {hbm:g} GiB: raise TP/PP, "
            "lower micro_batch_size / sequence lengths, or enable recompute"
        )
    if active["kv_cache"] <= 0:
        errors.append(
            f"rollout: gpu_memory_utilization {s.gen.get('gpu_memory_utilization', 0.5)} x {hbm:g} GiB leaves no KV "
            f"cache after vLLM weights {active['vllm_weights']:.1f} GiB and resident training state "
            f"{active['rollout_resident_train_state']:.1f} GiB"
        )
    elif memory["kv_cache_tokens"] < max_model_len:
        errors.append(
            f"rollout: KV cache holds {memory['kv_cache_tokens']} tokens < max_model_len {max_model_len}; vLLM refuses "
            "to start: raise gpu_memory_utilization, infer TP/EP, or offload training state"
        )
    elif memory["kv_full_sequences"] < int(s.gen.get("max_num_seqs", 1)):
        warnings.append(
            f"rollout: KV cache fits {memory['kv_full_sequences']} full-length sequences, fewer than max_num_seqs "
            f"{s.gen.get('max_num_seqs')}; vLLM will queue the rest"
        )
    if active["rollout_total"] > hbm:
        errors.append(f"rollout estimate {active['rollout_total']:.1f} GiB exceeds {hbm:g} GiB")

    layout = {
        "world": world,
        "tp": tp,
        "pp": pp,
        "cp": cp,
        "dp": dp,
        "ep": ep,
        "moe_tp_extend_ep": extend,
        "expert_tp": etp,
        "expert_dp": max(dp * cp // ep, 1),
        "experts_per_npu_train": m.num_experts / (ep * tp) if m.num_experts else 0,
        "layers_per_stage": stage_layers,
        "micro_batches_per_update": microbatches,
        "infer_tp": itp,
        "infer_ep": iep,
        "vllm_dp_size": iep,
        "rollout_dp": gen_dp,
        "vllm_engines": world // infer_ep_group if infer_ep_group and m.num_experts else gen_dp,
        "experts_per_npu_infer": m.num_experts / infer_ep_group if m.num_experts else 0,
        "lora": lora,
    }
    model = {
        "name": s.model_name,
        "total_params_b": round(m.total_params() / 1e9, 3),
        "layers": m.num_layers,
        "moe_layers": m.moe_layers if m.num_experts else 0,
        "hidden": m.hidden,
        "heads": m.heads,
        "kv_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "experts": m.num_experts,
        "topk": m.topk,
    }
    return {
        "ok": not errors,
        "errors": errors,
        "warnings": warnings,
        "layout": layout,
        "model": model,
        "memory_gib_per_npu": memory,
        "assumptions": list(ASSUMPTIONS),
    }


def _lora_params_per_npu(
    m: ModelDims, targets: Sequence[str], r: int, *, tp: int, ep: int, extend: bool, layers: int
) -> tuple[float, float]:
    """(dense LoRA params, expert LoRA params) on one NPU of the worst stage."""
    h, qkv_out, proj_in = m.hidden, (m.heads + 2 * m.kv_heads) * m.head_dim, m.heads * m.head_dim
    per_layer = 0.0
    if "linear_qkv" in targets:
        per_layer += r * h + r * qkv_out / tp  # column parallel: A replicated, B split
    if "linear_proj" in targets:
        per_layer += r * proj_in / tp + r * h  # row parallel: A split, B replicated
    mlp_lora = 0.0
    width = m.mlp_factor - 1  # fc1 output is 2F with SwiGLU
    if "linear_fc1" in targets:
        mlp_lora += r * h + r * width * m.ffn / tp
    if "linear_fc2" in targets:
        mlp_lora += r * m.ffn / tp + r * h
    moe_share = m.moe_layers / max(m.real_layers, 1)
    dense = layers * (per_layer + (1 - moe_share) * mlp_lora)
    expert = 0.0
    if m.num_experts:
        etp = 1 if extend else tp
        local = m.num_experts / (ep * tp) if extend else m.num_experts / ep
        # LoraParallelGroupedMLP: A1 (H x r), B1 (r x 2F/etp), A2 (F/etp x r), B2 (r x H) per local expert
        expert = layers * moe_share * local * r * (2 * h + (width + 1) * m.moe_ffn / etp)
        if m.shared_ffn:
            dense += layers * moe_share * (r * 2 * h + r * (width + 1) * m.shared_ffn / tp)
    return dense, expert


def _memory(
    s: _Sections,
    m: ModelDims,
    *,
    tp: int,
    pp: int,
    cp: int,
    dp: int,
    ep: int,
    extend: bool,
    lora_targets: Sequence[str],
    lora_r: int,
    stage_layers: int,
    tokens: int,
    microbatches: int,
    itp: int,
    iep: int,
    hbm_gib: float,
) -> dict[str, Any]:
    """Per-NPU memory in GiB with and without LoRA; see ASSUMPTIONS and :func:`activation_bytes_per_token`."""
    moe_share = m.moe_layers / max(m.real_layers, 1) if m.num_experts else 0.0
    layers = stage_layers
    # ---- training weights on one NPU of the worst stage
    dense_layer = m.attention_params / tp + 2 * m.hidden
    if m.num_experts:
        dense_layer += moe_share * (m.router_params + m.mlp_factor * m.hidden * m.shared_ffn / tp)
        dense_layer += (1 - moe_share) * m.mlp_factor * m.hidden * m.ffn / tp
    else:
        dense_layer += m.mlp_factor * m.hidden * m.ffn / tp
    dense_params = layers * dense_layer + m.embedding_params / tp * (2 if pp == 1 and m.untied else 1)
    expert_params = layers * moe_share * m.expert_params / (ep * tp) if m.num_experts else 0.0
    params = dense_params + expert_params

    distributed = bool(s.meg("use_distributed_optimizer", False))
    swap_optimizer = bool(s.meg("swap_optimizer", False))
    dense_shard = dp * cp if distributed else 1
    expert_shard = max(dp * cp // ep, 1) if distributed else 1

    # ---- activations (one micro-batch, times the in-flight micro-batches of the first stage)
    per_token_moe = activation_bytes_per_token(m, moe=True) if m.num_experts else 0
    per_token_dense = activation_bytes_per_token(m, moe=False)
    per_token_layer = moe_share * per_token_moe + (1 - moe_share) * per_token_dense
    local_tokens = tokens / cp
    granularity = s.meg("recompute_granularity")
    if granularity == "full":
        recomputed = layers
        if s.meg("recompute_method") == "block":
            recomputed = min(int(s.meg("recompute_num_layers") or layers), layers)
        kept = (layers - recomputed) * per_token_layer + recomputed * 2 * m.hidden + per_token_layer
    else:
        kept = layers * per_token_layer
    in_flight = min(pp, microbatches) if pp > 1 else 1
    activations = local_tokens * kept / tp * in_flight
    logits = local_tokens * m.vocab / tp * 10

    # ---- rollout: vLLM weights, KV cache, reserve
    kv_per_rank = max(1, m.kv_heads // itp) if m.kv_heads >= itp else 1
    heads_per_rank = m.heads / itp
    vllm_dense = m.real_layers * (
        m.hidden * (heads_per_rank + 2 * kv_per_rank) * m.head_dim
        + heads_per_rank * m.head_dim * m.hidden
        + 2 * m.hidden
    )
    vllm_dense += m.embedding_params / itp * (2 if m.untied else 1)
    if m.num_experts:
        vllm_dense += m.moe_layers * (m.router_params + m.mlp_factor * m.hidden * m.shared_ffn / itp)
        vllm_dense += m.dense_layers * m.mlp_factor * m.hidden * m.ffn / itp
        vllm_experts = m.moe_layers * m.expert_params / (itp * iep)
    else:
        vllm_dense += m.real_layers * m.mlp_factor * m.hidden * m.ffn / itp
        vllm_experts = 0.0
    vllm_weights = (vllm_dense + vllm_experts) * BF16
    kv_bytes_per_token = 2 * m.real_layers * kv_per_rank * m.head_dim * BF16
    batched = int(s.gen.get("max_num_batched_tokens", 2048))
    routed = m.topk * (2 * m.hidden + 3 * m.moe_ffn) if m.num_experts else 6 * m.ffn / itp
    reserve = (
        batched * BF16 * (4 * m.hidden + (m.heads + 2 * m.kv_heads) * m.head_dim / itp + routed)
        + int(s.gen.get("max_num_seqs", 1)) * m.vocab * FP32 * 2
        + 1 * GIB  # runtime, HCCL buffers, graph/workspace
    )
    util = float(s.gen.get("gpu_memory_utilization", 0.5))
    budget = util * hbm_gib * GIB
    seq = int(s.rl.get("max_prompt_length", 512)) + int((s.gen.get("sampling_config") or {}).get("max_tokens", 128))

    def mode(trainable_dense: float, trainable_expert: float) -> dict[str, float]:
        trainable = trainable_dense + trainable_expert
        grads = trainable * FP32
        optimizer = (
            0.0 if swap_optimizer else 3 * FP32 * (trainable_dense / dense_shard + trainable_expert / expert_shard)
        )
        weights = params * BF16
        train_total = weights + grads + optimizer + activations + logits
        resident = (
            (0 if s.gen.get("offload_train_param") else weights)
            + (0 if s.gen.get("offload_train_grad") else grads)
            + (0 if s.gen.get("offload_train_optimizer") else optimizer)
        )
        kv = budget - vllm_weights - resident - reserve
        rollout_total = max(budget, vllm_weights + resident + reserve)
        gib = {
            "params": weights,
            "grads": grads,
            "optimizer": optimizer,
            "activations": activations,
            "logits": logits,
            "train_total": train_total,
            "vllm_weights": vllm_weights,
            "rollout_resident_train_state": resident,
            "rollout_activation_reserve": reserve,
            "kv_cache": kv,
            "rollout_total": rollout_total,
            "peak": max(train_total, rollout_total),
        }
        return {"trainable_params_b": round(trainable / 1e9, 3)} | {k: round(v / GIB, 3) for k, v in gib.items()}

    lora_dense, lora_expert = _lora_params_per_npu(m, lora_targets, lora_r, tp=tp, ep=ep, extend=extend, layers=layers)
    with_lora = mode(lora_dense, lora_expert)
    without_lora = mode(dense_params, expert_params)
    # KV capacity differs between the modes only through resident training state: report the configured mode's.
    active_kv = with_lora["kv_cache"] if s.meg("lora_target_modules") else without_lora["kv_cache"]
    kv_tokens = int(max(active_kv, 0) * GIB // kv_bytes_per_token) if kv_bytes_per_token else 0
    return {
        "with_lora": with_lora,
        "without_lora": without_lora,
        "hbm": hbm_gib,
        "params_per_npu_b": round(params / 1e9, 3),
        "tokens_per_micro_batch": tokens,
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_cache_tokens": kv_tokens,
        "kv_full_sequences": kv_tokens // max(seq, 1),
        "lora_r": lora_r,
    }


# ---------------------------------------------------------------------------------------------- loading, printing


def _one_line(err: BaseException) -> str:
    """An exception's message on one line: YAML and hydra errors span several."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:  # yaml.MarkedYAMLError: say what and where, not the parser's context lines
        return f"invalid YAML in {mark.name}, line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split()) or type(err).__name__


def _bad_override(overrides: Sequence[str]) -> str | None:
    """The first override hydra's grammar rejects, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:  # any parse failure names this override
            return override
    return None


def compose_hydra(
    config_dir: str | os.PathLike,
    name: str,
    overrides: Sequence[str] = (),
    *,
    job_name: str = "plan",
    error: type[ValueError] = PlanError,
) -> dict[str, Any]:
    """Compose ``config_dir/name.yaml`` with hydra ``overrides`` into plain data.

    Malformed YAML, an override hydra cannot parse or apply, and an interpolation that does not resolve raise
    ``error`` with one line naming the file or override; a missing hydra-core raises ``error`` too.
    """
    try:
        import yaml
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException, OverrideParseException
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError as err:
        raise error(f"composing {name} needs hydra-core (pip install hydra-core): {err}") from None
    source = Path(config_dir) / f"{name}.yaml"
    try:
        with initialize_config_dir(version_base=None, config_dir=str(Path(config_dir).resolve()), job_name=job_name):
            composed = compose(config_name=name, overrides=list(overrides))
        plain = OmegaConf.to_container(composed, resolve=True)
    except OverrideParseException as err:
        bad = _bad_override(overrides)
        where = f"override {bad!r}" if bad is not None else f"overrides {list(overrides)}"
        raise error(f"{where} is not valid hydra syntax: {_one_line(err)}") from None
    except yaml.YAMLError as err:
        raise error(_one_line(err)) from None
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, yaml.YAMLError) else err  # hydra wraps some YAML errors
        if cause is not err:
            raise error(_one_line(cause)) from None
        raise error(f"composing {source} with overrides {list(overrides)}: {_one_line(err)}") from None
    if not isinstance(plain, dict):
        raise error(f"{source}: expected a mapping at the top level, got {type(plain).__name__}")
    # the package's sections (config.SECTIONS, not imported here: config pulls in torch), absent or a mapping
    for section in ("r3", "aqn", "lora_extras"):
        value = plain.get(section)
        if value is not None and not isinstance(value, dict):
            raise error(f"{section}: expected a mapping, got {type(value).__name__} {value!r}")
    return plain


def load_config(config: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose a hydra config: a yaml path, or the name of a config in this repository's ``configs/``.

    ``overrides`` are hydra overrides (``actor_config.tensor_model_parallel_size=2``). Raises FileNotFoundError
    naming the path and the available configs; PlanError (one line) for malformed YAML, a bad override, a
    non-mapping ``r3`` / ``aqn`` / ``lora_extras`` section, or a missing hydra-core.
    """
    path = Path(config)
    if not path.suffix:
        candidate = path.with_suffix(".yaml")
        path = candidate if candidate.is_file() else CONFIGS_DIR / candidate.name
    if not path.is_file():
        available = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []
        raise FileNotFoundError(f"config not found: {config} (configs in {CONFIGS_DIR}: {available})")
    return compose_hydra(path.parent, path.stem, overrides, job_name="plan")


def format_plan(result: Mapping[str, Any]) -> str:
    """Human-readable report of :func:`plan_config`'s result."""
    lay, mem = result["layout"], result["memory_gib_per_npu"]
    lines = [
        f"model {result['model']['name']}: {result['model']['total_params_b']:.2f}B params, "
        f"{result['model']['layers']} layers, {result['model']['experts']} experts top-{result['model']['topk']}",
        f"training  TP {lay['tp']} x PP {lay['pp']} x CP {lay['cp']} x DP {lay['dp']} = {lay['world']} NPUs, "
        f"EP {lay['ep']}{' (tp-extend-ep)' if lay['moe_tp_extend_ep'] else ''}, "
        f"{lay['experts_per_npu_train']:g} experts/NPU, {lay['layers_per_stage']} layers/stage, "
        f"{lay['micro_batches_per_update']} micro-batches/update",
        f"rollout   vLLM TP {lay['infer_tp']} x EP {lay['infer_ep']} (VLLM_DP_SIZE {lay['vllm_dp_size']}), "
        f"{lay['vllm_engines']} engines, {lay['experts_per_npu_infer']:g} experts/NPU",
        f"memory per NPU (GiB, HBM {mem['hbm']:g}; active: {mem['active']}):",
    ]
    keys = ("params", "grads", "optimizer", "activations", "logits", "train_total", "vllm_weights",
            "rollout_resident_train_state", "kv_cache", "peak")  # fmt: skip
    lines.append(f"  {'':<30}{'with LoRA':>12}{'without LoRA':>14}")
    lines.append(
        f"  {'trainable params (B)':<30}{mem['with_lora']['trainable_params_b']:>12.3f}"
        f"{mem['without_lora']['trainable_params_b']:>14.3f}"
    )
    for key in keys:
        lines.append(f"  {key:<30}{mem['with_lora'][key]:>12.2f}{mem['without_lora'][key]:>14.2f}")
    lines.append(f"  KV cache: {mem['kv_cache_tokens']} tokens = {mem['kv_full_sequences']} full-length sequences")
    lines += [f"warning: {w}" for w in result["warnings"]]
    lines += [f"error: {e}" for e in result["errors"]]
    lines.append("plan ok" if result["ok"] else f"plan REJECTED ({len(result['errors'])} errors)")
    return "\n".join(lines)
