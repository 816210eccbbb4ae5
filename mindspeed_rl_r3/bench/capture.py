"""Capture benchmark: generate throughput with and without routing capture on a CPU Qwen3-MoE, same run.

The model is random-weight Qwen3-MoE through transformers (8 layers, hidden 256, 64 experts, top-8), sampling a
batch of prompts. Runs with and without capture alternate, and the best of each is compared. The recorder's hot path
(``capture`` in every MoE layer) is also run under a dispatch mode that counts host-synchronising operations.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from mindspeed_rl_r3.bench.syncs import count_host_syncs
from mindspeed_rl_r3.patches.hf_qwen3_moe import attach_capture, spec_of


@dataclass(frozen=True)
class CaptureBenchConfig:
    batch: int = 8
    prompt_len: int = 32
    new_tokens: int = 32
    hidden: int = 256
    layers: int = 8
    experts: int = 64
    topk: int = 8
    repeats: int = 3
    seed: int = 0


def _model(cfg: CaptureBenchConfig):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(cfg.seed)
    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=cfg.hidden,
        intermediate_size=2 * cfg.hidden,
        moe_intermediate_size=cfg.hidden // 2,
        num_hidden_layers=cfg.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=cfg.hidden // 8,
        num_experts=cfg.experts,
        num_experts_per_tok=cfg.topk,
        norm_topk_prob=True,
        max_position_embeddings=cfg.prompt_len + cfg.new_tokens + 8,
    )
    return Qwen3MoeForCausalLM(config).eval()


def run_capture_bench(cfg: CaptureBenchConfig | None = None) -> dict:
    cfg = cfg or CaptureBenchConfig()
    model = _model(cfg)
    spec = spec_of(model)
    prompts = torch.randint(1, 1024, (cfg.batch, cfg.prompt_len), generator=torch.Generator().manual_seed(cfg.seed))
    mask = torch.ones_like(prompts)
    max_len = cfg.prompt_len + cfg.new_tokens

    def generate() -> None:
        with torch.no_grad():
            model.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=cfg.new_tokens,
                min_new_tokens=cfg.new_tokens,
                do_sample=True,
                pad_token_id=0,
            )

    plain, captured = [], []
    for i in range(cfg.repeats + 1):
        start = time.perf_counter()
        generate()
        plain_s = time.perf_counter() - start
        with attach_capture(model, spec, max_batch=cfg.batch, max_len=max_len) as capture:
            start = time.perf_counter()
            generate()
            capture.recorder.finish_all()
            captured_s = time.perf_counter() - start
        if i:  # first round warms up
            plain.append(plain_s)
            captured.append(captured_s)
    tokens = cfg.batch * cfg.new_tokens
    plain_tps, captured_tps = tokens / min(plain), tokens / min(captured)

    # Host syncs in the hot path: one step's capture calls in every MoE layer.
    with attach_capture(model, spec, max_batch=cfg.batch, max_len=max_len) as capture:
        ids = torch.randint(0, cfg.experts, (cfg.batch * cfg.prompt_len, cfg.topk), dtype=torch.int32)
        syncs = count_host_syncs(lambda: [capture.recorder.capture(layer, ids) for layer in range(spec.num_moe_layers)])
    return {
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "tokens_per_s_plain": round(plain_tps, 1),
        "tokens_per_s_capture": round(captured_tps, 1),
        "capture_overhead": round(1.0 - captured_tps / plain_tps, 4),
        "host_syncs_per_step": sum(syncs.values()),
        "host_sync_ops": dict(syncs),
    }
