"""The plan's own rules: what Megatron, MindSpeed-LLM, MindSpeed-RL and vLLM enforce about a layout's sizes, batches,
resources and memory. Each is a small function from :class:`PlanContext` to findings; every error names the config
key it is about. The rules the run checks too (the package's sections, its refusals, the LoRA-on-MoE and expert
resharding rules) are :mod:`mindspeed_rl_r3.config_rules`, reached through :func:`run_rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mindspeed_rl_r3 import config_rules
from mindspeed_rl_r3.config_rules import Finding, error, warning
from mindspeed_rl_r3.planning.layout import Layout
from mindspeed_rl_r3.planning.sections import ModelDims, PlanSections


@dataclass(frozen=True)
class PlanContext:
    s: PlanSections
    m: ModelDims
    lay: Layout
    runtime_env: Mapping[str, Any] | None = None


PlanRule = Callable[[PlanContext], list[Finding]]


def world_size(c: PlanContext) -> list[Finding]:
    lay, key, found = c.lay, "rl_config.actor_resource.num_npus", []
    if lay.job_npus is not None and lay.job_npus != lay.world:
        found.append(
            error(
                key,
                f"world-size mismatch: rl_config.actor_resource.num_npus = {lay.world} but the job has "
                f"{lay.job_npus} NPUs (NNODES * NPUS_PER_NODE); they must be equal",
            )
        )
    if lay.world % lay.model_parallel:
        found.append(
            error(
                key,
                f"world size {lay.world} (rl_config.actor_resource.num_npus) is not divisible by TP * PP * CP = "
                f"{lay.tp} * {lay.pp} * {lay.cp} = {lay.model_parallel}: world = TP x PP x CP x DP must hold with an "
                "integer DP",
            )
        )
    return found


def tensor_parallel(c: PlanContext) -> list[Finding]:
    """Megatron divides these by TP and asserts."""
    m, tp, key = c.m, c.lay.tp, c.s.where("tensor_model_parallel_size")
    found = [
        error(key, f"{key}={tp}: {what} {value} is not divisible by TP")
        for what, value in (("num_attention_heads", m.heads), ("hidden_size", m.hidden), ("padded_vocab_size", m.vocab))
        if value % tp
    ]
    if m.kv_heads % tp:
        valid = [t for t in range(1, m.kv_heads + 1) if m.kv_heads % t == 0 and m.heads % t == 0]
        found.append(
            error(
                key,
                f"{key}={tp}: num_query_groups (KV heads) {m.kv_heads} is not divisible by TP (Megatron shards whole "
                f"KV groups: num_query_groups % TP == 0); valid TP: {valid}",
            )
        )
    if m.num_experts and m.moe_ffn % c.lay.expert_tp:
        found.append(error(key, f"{key}={tp}: moe_ffn_hidden_size {m.moe_ffn} not divisible by TP"))
    if tp == 1 and c.s.meg("sequence_parallel", False):
        found.append(warning(key, "sequence_parallel with TP 1 has no effect (Megatron turns it off)"))
    return found


def pipeline(c: PlanContext) -> list[Finding]:
    s, m, lay, found = c.s, c.m, c.lay, []
    layer_list = s.meg("num_layer_list")
    if layer_list not in (None, ""):
        stages = [int(x) for x in str(layer_list).split(",") if x.strip()]
        if len(stages) != lay.pp or sum(stages) != m.num_layers:
            key = s.where("num_layer_list")
            found.append(
                error(key, f"{key}={layer_list!r}: needs {lay.pp} entries (PP) summing to num_layers {m.num_layers}")
            )
    elif m.num_layers % lay.pp:
        key = s.where("pipeline_model_parallel_size")
        found.append(
            error(
                key,
                f"{key}={lay.pp}: num_layers {m.num_layers} is not divisible by PP (set num_layer_list for an uneven "
                "split, or noop_layers)",
            )
        )
    vpp = s.meg("num_layers_per_virtual_pipeline_stage")
    if vpp and lay.pp > 1 and lay.stage_layers % int(vpp):
        key = s.where("num_layers_per_virtual_pipeline_stage")
        found.append(error(key, f"{key}={vpp}: must divide the {lay.stage_layers} layers/stage"))
    return found


def context_parallel(c: PlanContext) -> list[Finding]:
    if c.lay.cp > 1 and c.s.meg("variable_seq_lengths", False):
        key = c.s.where("context_parallel_size")
        return [
            error(
                key,
                f"{key}={c.lay.cp} with variable_seq_lengths: MindSpeed-LLM forbids context parallelism with variable "
                "sequence lengths",
            )
        ]
    return []


def expert_parallel(c: PlanContext) -> list[Finding]:
    m, lay, found = c.m, c.lay, []
    if not m.num_experts:
        return found
    key = c.s.where("expert_model_parallel_size")
    if m.num_experts % lay.ep:
        found.append(error(key, f"{key}={lay.ep}: num_experts {m.num_experts} is not divisible by EP"))
    if lay.extend and m.num_experts % (lay.ep * lay.tp):
        found.append(
            error(
                c.s.where("moe_tp_extend_ep"),
                f"moe_tp_extend_ep spreads experts over TP * EP = {lay.ep * lay.tp} ranks: num_experts "
                f"{m.num_experts} is not divisible by it",
            )
        )
    if (lay.dp * lay.cp) % lay.ep:
        found.append(
            error(
                key,
                f"{key}={lay.ep}: EP must divide DP * CP = {lay.dp} * {lay.cp} (Megatron builds expert groups inside "
                "the data-parallel ranks: world % (ETP * EP * PP) == 0)",
            )
        )
    if lay.extend and c.s.meg("moe_token_dispatcher_type") == "allgather":
        found.append(
            error(
                c.s.where("moe_token_dispatcher_type"),
                "moe_tp_extend_ep is not supported with moe_token_dispatcher_type: allgather (MindSpeed-LLM)",
            )
        )
    return found


def reference_model(c: PlanContext) -> list[Finding]:
    """LoRA, share_backbone and the integrated worker (MindSpeed-RL)."""
    s, lay, found = c.s, c.lay, []
    integrated = s.rl.get("use_integrated_worker", True)
    if s.rl.get("share_backbone"):
        key = "rl_config.share_backbone"
        if not lay.lora:
            found.append(error(key, "rl_config.share_backbone needs LoRA (megatron_training.lora_target_modules)"))
        if s.meg("stage") == "ray_dapo":
            found.append(error(key, "rl_config.share_backbone cannot be used with stage ray_dapo"))
        if not integrated:
            found.append(error(key, "rl_config.share_backbone needs use_integrated_worker: true"))
    if integrated:
        for section in ("ref_config", "reward_config"):
            if section in s.cfg:
                found.append(
                    error(section, f"{section} must not be set with rl_config.use_integrated_worker (MindSpeed-RL)")
                )
    if lay.lora and lay.lora_r < 1:
        key = s.where("lora_r")
        found.append(error(key, f"{key}={lay.lora_r}: must be >= 1"))
    return found


def precision_and_lengths(c: PlanContext) -> list[Finding]:
    s, lay, found = c.s, c.lay, []
    if not s.meg("bf16", False):
        found.append(error(s.where("bf16"), f"{s.where('bf16')}: MindSpeed-RL requires bf16: true"))
    if s.gen.get("dtype", "bfloat16") != "bfloat16":
        found.append(
            error(
                "generate_config.dtype", f"generate_config.dtype={s.gen.get('dtype')!r}: MindSpeed-RL requires bfloat16"
            )
        )
    seq_key = s.where("seq_length")
    if lay.seq_length is None:
        found.append(error(seq_key, f"{seq_key} is not set"))
    elif lay.max_model_len < lay.seq_length:
        found.append(
            error(
                "generate_config.max_model_len",
                f"generate_config.max_model_len {lay.max_model_len} < {seq_key} {lay.seq_length} (MindSpeed-RL)",
            )
        )
    if lay.max_model_len < lay.max_prompt + lay.max_tokens:
        found.append(
            warning(
                "generate_config.max_model_len",
                f"generate_config.max_model_len {lay.max_model_len} < max_prompt_length {lay.max_prompt} + sampling "
                f"max_tokens {lay.max_tokens}: long prompts get fewer response tokens",
            )
        )
    max_pos = s.meg("max_position_embeddings")
    if max_pos and lay.max_prompt + lay.max_tokens > int(max_pos):
        found.append(
            warning(
                s.where("max_position_embeddings"),
                f"prompt + response ({lay.max_prompt + lay.max_tokens}) exceeds max_position_embeddings {max_pos}",
            )
        )
    return found


def remove_padding(c: PlanContext) -> list[Finding]:
    s, key, found = c.s, "rl_config.use_remove_padding", []
    if s.rl.get("use_remove_padding"):
        if not s.meg("reset_attention_mask", False):
            found.append(error(key, "rl_config.use_remove_padding needs reset_attention_mask: true (MindSpeed-RL)"))
        if c.lay.pp > 1 and not s.meg("no_pad_to_seq_lengths", False):
            found.append(
                error(key, "rl_config.use_remove_padding with PP > 1 needs no_pad_to_seq_lengths: true (MindSpeed-RL)")
            )
    return found


def batches(c: PlanContext) -> list[Finding]:
    """MindSpeed-RL ``validate_rl_args`` and the update loop."""
    s, lay = c.s, c.lay
    key = s.where("global_batch_size")
    if lay.gbs is None:
        return [error(key, f"{key} is not set")]
    gbs, n, mbs, dp, gen_dp, found = lay.gbs, lay.n, lay.mbs, lay.dp, lay.gen_dp, []
    if (gbs * n) % mbs:
        found.append(
            error(
                key, f"global_batch_size * n_samples_per_prompt = {gbs * n} is not divisible by micro_batch_size {mbs}"
            )
        )
    if gbs % dp:
        found.append(error(key, f"{key}={gbs} is not divisible by training DP {dp} (MindSpeed-RL)"))
    elif (gbs // dp * n) % mbs:
        found.append(
            error(
                key, f"global_batch_size / DP * n_samples = {gbs // dp * n} is not divisible by micro_batch_size {mbs}"
            )
        )
    if gbs % gen_dp:
        found.append(
            error(
                key,
                f"{key}={gbs} is not divisible by the rollout data-parallel size num_npus / (infer TP * infer PP) = "
                f"{gen_dp} (MindSpeed-RL)",
            )
        )
    dispatch = s.rl.get("actor_rollout_dispatch_size") or (gbs * n // gen_dp)
    if dispatch and gbs % gen_dp == 0 and (gbs // gen_dp * n) % dispatch:
        found.append(
            error(
                "rl_config.actor_rollout_dispatch_size",
                f"rollout samples per rank {gbs // gen_dp * n} not divisible by actor_rollout_dispatch_size {dispatch}",
            )
        )
    if gbs % lay.mini:
        found.append(
            warning(
                "rl_config.mini_batch_size",
                f"global_batch_size {gbs} is not a multiple of rl_config.mini_batch_size {lay.mini}: the last "
                "mini-batch is smaller",
            )
        )
    if lay.nnodes and gbs % lay.nnodes:
        found.append(
            error(
                key,
                f"{key}={gbs} must be divisible by the {lay.nnodes} nodes (one rule-reward worker per node, "
                "MindSpeed-RL)",
            )
        )
    if (lay.mini * n) % dp:
        found.append(
            error(
                "rl_config.mini_batch_size",
                f"rl_config.mini_batch_size * n_samples = {lay.mini * n} is not divisible by training DP {dp}",
            )
        )
    elif (lay.mini * n // dp) % mbs:
        found.append(
            error(
                "rl_config.mini_batch_size",
                f"mini-batch per DP rank {lay.mini * n // dp} is not divisible by micro_batch_size {mbs}",
            )
        )
    return found


def rollout_layout(c: PlanContext) -> list[Finding]:
    """vLLM and MindSpeed-RL's resharding between training and rollout."""
    m, lay, s, found = c.m, c.lay, c.s, []
    itp_key = "generate_config.infer_tensor_parallel_size"
    if lay.ipp != 1:
        found.append(
            error(
                "generate_config.infer_pipeline_parallel_size",
                f"generate_config.infer_pipeline_parallel_size={lay.ipp}: MindSpeed-RL supports only 1",
            )
        )
    if lay.world % max(lay.itp * lay.ipp, 1):
        found.append(
            error(itp_key, f"num_npus {lay.world} is not divisible by infer TP * infer PP = {lay.itp * lay.ipp}")
        )
    if m.heads % lay.itp:
        found.append(error(itp_key, f"{itp_key}={lay.itp}: num_attention_heads {m.heads} not divisible"))
    if not (m.kv_heads % lay.itp == 0 or lay.itp % m.kv_heads == 0):
        found.append(
            error(
                itp_key,
                f"{itp_key}={lay.itp}: vLLM needs KV heads {m.kv_heads} divisible by infer TP or infer TP divisible by "
                "the KV heads",
            )
        )
    if lay.tp > lay.itp and lay.tp % lay.itp:
        found.append(
            error(itp_key, f"training TP {lay.tp} is not a multiple of infer TP {lay.itp} (MindSpeed-RL resharding)")
        )
    if lay.tp < lay.itp and (lay.world // lay.pp) % lay.itp:
        found.append(
            error(
                itp_key,
                f"infer TP {lay.itp} > training TP {lay.tp} needs (num_npus / PP) % infer TP == 0 (MindSpeed-RL)",
            )
        )
    if m.num_experts:
        iep_key, group = "generate_config.infer_expert_parallel_size", lay.infer_ep_group
        if lay.iep > 1 and not s.gen.get("enable_expert_parallel", False):
            found.append(
                error(
                    iep_key,
                    f"{iep_key}={lay.iep} needs enable_expert_parallel: true (VLLM_DP_SIZE is set from it only then)",
                )
            )
        if lay.world % group:
            found.append(
                error(
                    iep_key,
                    f"vLLM expert groups of infer TP * infer EP = {lay.itp} * {lay.iep} = {group} NPUs do not tile the "
                    f"{lay.world} NPUs",
                )
            )
        if m.num_experts % group:
            found.append(
                error(iep_key, f"num_experts {m.num_experts} is not divisible by infer TP * infer EP = {group}")
            )
    return found


def vllm_dp_size(c: PlanContext) -> list[Finding]:
    """``VLLM_DP_SIZE`` in the Ray runtime env must be the rollout's expert-parallel size for MoE."""
    env_vars = dict((c.runtime_env or {}).get("env_vars") or {})
    if not c.m.num_experts or "VLLM_DP_SIZE" not in env_vars or str(env_vars["VLLM_DP_SIZE"]) == str(c.lay.iep):
        return []
    message = (
        f"runtime env VLLM_DP_SIZE={env_vars['VLLM_DP_SIZE']} but generate_config.infer_expert_parallel_size="
        f"{c.lay.iep}: for MoE they must be equal"
    )
    if c.s.gen.get("enable_expert_parallel", False):
        return [warning("VLLM_DP_SIZE", message + " (the entry script overwrites VLLM_DP_SIZE with the latter)")]
    return [error("VLLM_DP_SIZE", message)]


def nodes(c: PlanContext) -> list[Finding]:
    lay = c.lay
    if not lay.nnodes:
        return []
    if lay.world % lay.nnodes:
        return [error("nnodes", f"num_npus {lay.world} is not divisible by nnodes {lay.nnodes}")]
    per_node, found = lay.world // lay.nnodes, []
    if lay.tp > per_node or per_node % lay.tp:
        found.append(
            warning(
                "actor_config.tensor_model_parallel_size",
                f"TP {lay.tp} does not fit inside one node of {per_node} NPUs: TP traffic crosses nodes",
            )
        )
    if c.m.num_experts and lay.infer_ep_group > per_node:
        found.append(
            warning(
                "generate_config.infer_expert_parallel_size",
                f"vLLM expert group of {lay.infer_ep_group} NPUs spans nodes: all-to-all crosses the network",
            )
        )
    return found


def run_rules(c: PlanContext) -> list[Finding]:
    """The run's own check (:func:`config_rules.check`) on this config's plain sections, as MindSpeed-RL would
    build its config objects from them (``MegatronConfig``: model section, then megatron_training, then actor)."""
    s = c.s
    megatron = config_rules.ConfigView(s.model, s.megatron, s.actor)
    rl, generate = config_rules.ConfigView(s.rl), config_rules.ConfigView(s.gen)
    return config_rules.check(rl, megatron, generate, s.cfg)


PLAN_RULES: tuple[PlanRule, ...] = (
    world_size,
    tensor_parallel,
    pipeline,
    context_parallel,
    expert_parallel,
    reference_model,
    precision_and_lengths,
    remove_padding,
    batches,
    rollout_layout,
    vllm_dp_size,
    nodes,
    run_rules,
)


def memory_rules(c: PlanContext, memory: Mapping[str, Any], hbm: float) -> list[Finding]:
    """Training peak and rollout KV cache against the NPU's HBM (``memory``: :func:`.memory.estimate_memory`)."""
    active, found = memory[memory["active"]], []
    util_key = "generate_config.gpu_memory_utilization"
    if active["train_total"] > 0.95 * hbm:
        found.append(
            error(
                "actor_config.micro_batch_size",
                f"estimated training peak {active['train_total']:.1f} GiB per NPU exceeds 95% of {hbm:g} GiB: raise "
                "TP/PP, lower micro_batch_size / sequence lengths, or enable recompute",
            )
        )
    if active["kv_cache"] <= 0:
        found.append(
            error(
                util_key,
                f"rollout: gpu_memory_utilization {c.s.gen.get('gpu_memory_utilization', 0.5)} x {hbm:g} GiB leaves no "
                f"KV cache after vLLM weights {active['vllm_weights']:.1f} GiB and resident training state "
                f"{active['rollout_resident_train_state']:.1f} GiB",
            )
        )
    elif memory["kv_cache_tokens"] < c.lay.max_model_len:
        found.append(
            error(
                util_key,
                f"rollout: KV cache holds {memory['kv_cache_tokens']} tokens < max_model_len {c.lay.max_model_len}; "
                "vLLM refuses to start: raise gpu_memory_utilization, infer TP/EP, or offload training state",
            )
        )
    elif memory["kv_full_sequences"] < int(c.s.gen.get("max_num_seqs", 1)):
        found.append(
            warning(
                "generate_config.max_num_seqs",
                f"rollout: KV cache fits {memory['kv_full_sequences']} full-length sequences, fewer than max_num_seqs "
                f"{c.s.gen.get('max_num_seqs')}; vLLM will queue the rest",
            )
        )
    if active["rollout_total"] > hbm:
        found.append(error(util_key, f"rollout estimate {active['rollout_total']:.1f} GiB exceeds {hbm:g} GiB"))
    return found
