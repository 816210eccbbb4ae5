"""Per-NPU memory of a plan: training state and activations, and the rollout's vLLM weights and KV cache.

Estimates, not measurements: see :data:`ASSUMPTIONS` and :func:`activation_bytes_per_token`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mindspeed_rl_r3.planning.layout import DEFAULT_LORA_TARGETS, Layout
from mindspeed_rl_r3.planning.sections import ModelDims, PlanSections

GIB = 1024**3
BF16 = 2
FP32 = 4

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


def activation_bytes_per_token(m: ModelDims, *, moe: bool) -> int:
    """Activation bytes one token keeps for backward in one layer, bf16, before any parallel split.

    Attention (flash attention, no ``s^2`` term, dropout 0)::

        2 * (H + H + (heads + 2*kv_heads) * head_dim + heads * head_dim)
             ^norm in ^qkv in ^q, k, v                 ^core output (proj input)

    MoE MLP::

        2*H + 2*H + 8*E + k * (2*H + 2*2F + 2*F + 2*H)
        ^norm in ^router/dispatch in ^fp32 logits+probs ^per routed copy: fc1 in, fc1 out (gate+up), act out, fc2 out

    Dense MLP (SwiGLU): ``2*H + 2*H + 2*2F + 2*F + 2*H``. :func:`estimate_memory` divides the sum by TP (sequence
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


def lora_params_per_npu(
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


def estimate_memory(s: PlanSections, m: ModelDims, lay: Layout, hbm_gib: float) -> dict[str, Any]:
    """Per-NPU memory in GiB with and without LoRA; see ASSUMPTIONS and :func:`activation_bytes_per_token`."""
    tp, pp, cp, dp, ep, extend, itp, iep = lay.tp, lay.pp, lay.cp, lay.dp, lay.ep, lay.extend, lay.itp, lay.iep
    lora_targets = lay.lora_targets or DEFAULT_LORA_TARGETS
    tokens, microbatches, lora_r = lay.tokens, lay.microbatches, lay.lora_r
    moe_share = m.moe_layers / max(m.real_layers, 1) if m.num_experts else 0.0
    layers = lay.real_stage_layers
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

    lora_dense, lora_expert = lora_params_per_npu(m, lora_targets, lora_r, tp=tp, ep=ep, extend=extend, layers=layers)
    with_lora = mode(lora_dense, lora_expert)
    without_lora = mode(dense_params, expert_params)
    # KV capacity differs between the modes only through resident training state: report the configured mode's.
    active_kv = with_lora["kv_cache"] if lay.lora else without_lora["kv_cache"]
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
        "active": "with_lora" if lay.lora else "without_lora",
    }
