"""The plan's result as text: layout, memory table, warnings, errors and the verdict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
