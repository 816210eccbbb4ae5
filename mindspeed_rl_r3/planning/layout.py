"""The parallel layout of a config, computed once: every size the plan's rules, memory estimate and report read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mindspeed_rl_r3.config_rules import Finding, error
from mindspeed_rl_r3.planning.sections import ModelDims, PlanSections

DEFAULT_LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class Layout:
    """Training (TP x PP x CP x DP, EP) and rollout (vLLM TP x EP) sizes, batches and sequence lengths."""

    world: int  # rl_config.actor_resource.num_npus
    job_npus: int | None  # NNODES * NPUS_PER_NODE, when given
    nnodes: int | None
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    extend: bool  # moe_tp_extend_ep
    lora_targets: tuple[str, ...]
    lora_r: int
    stage_layers: int  # layers of the largest pipeline stage, noop layers included
    real_stage_layers: int
    itp: int
    ipp: int
    iep: int
    gbs: int | None
    mbs: int
    n: int  # n_samples_per_prompt
    mini: int
    microbatches: int  # per update, per DP rank
    max_prompt: int
    max_tokens: int
    seq_length: int | None
    max_model_len: int
    tokens: int  # tokens of one training micro-batch

    @property
    def lora(self) -> bool:
        return bool(self.lora_targets)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        return 1 if self.extend else self.tp

    @property
    def gen_dp(self) -> int:
        """Rollout data-parallel size: num_npus / (infer TP * infer PP)."""
        return max(self.world // max(self.itp * self.ipp, 1), 1)

    @property
    def infer_ep_group(self) -> int:
        """vLLM's EP group is infer TP x VLLM_DP_SIZE (= infer_expert_parallel_size)."""
        return self.itp * self.iep


def _int(value: Any, where: str, found: list[Finding], default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        found.append(error(where, f"{where}={value!r}: expected an integer"))
        return default


def _stage_layers(s: PlanSections, m: ModelDims, pp: int) -> int:
    layer_list = s.meg("num_layer_list")
    if layer_list not in (None, ""):
        stages = [int(x) for x in str(layer_list).split(",") if x.strip()]
        if stages:
            return max(stages)
    return math.ceil(m.num_layers / pp)


def compute_layout(
    s: PlanSections, m: ModelDims, *, num_npus: int | None, nnodes: int | None
) -> tuple[Layout, list[Finding]]:
    """The layout, and the findings of values it could not read (non-integers, sizes < 1, no NPU count)."""
    found: list[Finding] = []
    W = s.where

    def size(key: str, name: str) -> int:
        value = _int(s.meg(key), W(key), found, 1) or 1
        if value < 1:
            found.append(error(W(key), f"{name} = {value}: parallel sizes must be >= 1"))
        return max(value, 1)

    tp = size("tensor_model_parallel_size", "TP")
    pp = size("pipeline_model_parallel_size", "PP")
    cp = size("context_parallel_size", "CP")
    ep = size("expert_model_parallel_size", "EP")
    lora_r = _int(s.meg("lora_r", 8), W("lora_r"), found, 8) or 8
    world = _int((s.rl.get("actor_resource") or {}).get("num_npus"), "rl_config.actor_resource.num_npus", found)
    if world is None:
        found.append(
            error(
                "rl_config.actor_resource.num_npus",
                "rl_config.actor_resource.num_npus is not set: it is the NPU count of the integrated worker",
            )
        )
        world = num_npus or tp * pp * cp
    dp = max(world // (tp * pp * cp), 1)
    seq_length = _int(s.meg("seq_length"), W("seq_length"), found)
    gbs = _int(s.meg("global_batch_size"), W("global_batch_size"), found)
    mbs = _int(s.meg("micro_batch_size"), W("micro_batch_size"), found, 1) or 1
    n, mini = int(s.rl.get("n_samples_per_prompt", 1)), int(s.rl.get("mini_batch_size", 1))
    microbatches = max(mini * n // dp // mbs, 1) if gbs is not None else 1
    max_prompt = int(s.rl.get("max_prompt_length", 512))
    max_tokens = int((s.gen.get("sampling_config") or {}).get("max_tokens", 128))
    tokens = mbs * (max_prompt + max_tokens)
    if s.rl.get("use_dynamic_bsz"):
        tokens = int(s.rl.get("max_packing_token_size") or s.rl.get("update_max_packing_token_size") or tokens)
    stage_layers = _stage_layers(s, m, pp)
    layout = Layout(
        world=world,
        job_npus=num_npus,
        nnodes=nnodes,
        tp=tp,
        pp=pp,
        cp=cp,
        ep=ep,
        dp=dp,
        extend=bool(s.meg("moe_tp_extend_ep", False)),
        lora_targets=tuple(s.meg("lora_target_modules") or ()),
        lora_r=lora_r,
        stage_layers=stage_layers,
        real_stage_layers=min(stage_layers, math.ceil(m.real_layers / pp)),
        itp=int(s.gen.get("infer_tensor_parallel_size", 8)),
        ipp=int(s.gen.get("infer_pipeline_parallel_size", 1)),
        iep=int(s.gen.get("infer_expert_parallel_size", 1)),
        gbs=gbs,
        mbs=mbs,
        n=n,
        mini=mini,
        microbatches=microbatches,
        max_prompt=max_prompt,
        max_tokens=max_tokens,
        seq_length=seq_length,
        max_model_len=int(s.gen.get("max_model_len", 2048)),
        tokens=tokens,
    )
    return layout, found


def layout_report(lay: Layout, m: ModelDims) -> dict[str, Any]:
    """The ``layout`` entry of the plan's result."""
    return {
        "world": lay.world,
        "tp": lay.tp,
        "pp": lay.pp,
        "cp": lay.cp,
        "dp": lay.dp,
        "ep": lay.ep,
        "moe_tp_extend_ep": lay.extend,
        "expert_tp": lay.expert_tp,
        "expert_dp": max(lay.dp * lay.cp // lay.ep, 1),
        "experts_per_npu_train": m.num_experts / (lay.ep * lay.tp) if m.num_experts else 0,
        "layers_per_stage": lay.stage_layers,
        "micro_batches_per_update": lay.microbatches,
        "infer_tp": lay.itp,
        "infer_ep": lay.iep,
        "vllm_dp_size": lay.iep,
        "rollout_dp": lay.gen_dp,
        "vllm_engines": lay.world // lay.infer_ep_group if lay.infer_ep_group and m.num_experts else lay.gen_dp,
        "experts_per_npu_infer": m.num_experts / lay.infer_ep_group if m.num_experts else 0,
        "lora": lay.lora,
    }
