"""Capture benchmark: generate throughput with and without routing capture on a CPU Qwen3-MoE, same run.

The model is random-weight Qwen3-MoE (8 layers, hidden 256, 64 experts, top-8), sampling a batch of prompts, through
transformers (``--engine hf``) or the real vLLM engine (``--engine vllm``: vLLM 0.11 on the CPU, in-process, the
package's :mod:`~mindspeed_rl_r3.patches.vllm_capture` adapter; runs in the upstream test environment), or, with
``--engine graph``, the in-graph cost under graph replay (:mod:`~mindspeed_rl_r3.bench.capture_graph`). Runs with
and without capture alternate, and the best of each is compared. The capture hot path is also run under a dispatch
mode that counts host-synchronising operations: the recorder's ``capture`` in every MoE layer, and with vLLM the
whole wrapper (selector + write) on a real layer.
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
    engine: str = "hf"


def _model(cfg: CaptureBenchConfig):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(cfg.seed)
    return Qwen3MoeForCausalLM(_config(cfg)).eval()


def _config(cfg: CaptureBenchConfig):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
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


def run_capture_bench(cfg: CaptureBenchConfig | None = None) -> dict:
    cfg = cfg or CaptureBenchConfig()
    if cfg.engine == "vllm":
        return run_vllm_capture_bench(cfg)
    if cfg.engine == "graph":
        from mindspeed_rl_r3.bench.capture_graph import GraphCaptureBenchConfig, run_graph_capture_bench

        return run_graph_capture_bench(GraphCaptureBenchConfig(repeats=cfg.repeats, seed=cfg.seed))
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

    # Host syncs in the hot path: one step's capture calls in every MoE layer.
    with attach_capture(model, spec, max_batch=cfg.batch, max_len=max_len) as capture:
        ids = torch.randint(0, cfg.experts, (cfg.batch * cfg.prompt_len, cfg.topk), dtype=torch.int32)
        syncs = count_host_syncs(lambda: [capture.recorder.capture(layer, ids) for layer in range(spec.num_moe_layers)])
    return _overhead_report(cfg, plain, captured, syncs)


def _overhead_report(cfg: CaptureBenchConfig, plain: list[float], captured: list[float], syncs: dict) -> dict:
    """Best-of-N tokens/s with and without capture (same run), their overhead ratio and the hot path's host syncs."""
    tokens = cfg.batch * cfg.new_tokens
    plain_tps, captured_tps = tokens / min(plain), tokens / min(captured)
    return {
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "tokens_per_s_plain": round(plain_tps, 1),
        "tokens_per_s_capture": round(captured_tps, 1),
        "capture_overhead": round(1.0 - captured_tps / plain_tps, 4),
        "host_syncs_per_step": sum(syncs.values()),
        "host_sync_ops": dict(syncs),
    }


def run_vllm_capture_bench(cfg: CaptureBenchConfig) -> dict:
    """The same measurement on the real vLLM engine: one ``LLM``, generate calls alternating without capture (the
    wrappers removed) and with it (wrappers on, recorder started), the traces taken as a rollout takes them."""
    import tempfile

    from mindspeed_rl_r3.patches import vllm_capture
    from mindspeed_rl_r3.patches.mindspeed_rl_rollout import collect_generation
    from mindspeed_rl_r3.patches.vllm_ascend_capture import forward_impl_capture_wrapper

    with tempfile.TemporaryDirectory() as path:
        _model(cfg).save_pretrained(path, safe_serialization=True)
        llm = vllm_capture.cpu_llm(
            path, max_model_len=cfg.prompt_len + cfg.new_tokens + 8, max_num_seqs=cfg.batch, skip_tokenizer_init=True
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(1, 1024, (cfg.batch, cfg.prompt_len), generator=gen).tolist()

    def generate(capture: bool) -> float:
        recorder = vllm_capture.start(llm) if capture else None
        start = time.perf_counter()
        outputs = vllm_capture.generate_tokens(llm, prompts, n=1, max_tokens=cfg.new_tokens)
        if recorder is not None:
            traces = collect_generation(outputs, prompts, 1, recorder).samples
            assert all(not s.trace.missing().any() for s in traces)
        elapsed = time.perf_counter() - start
        vllm_capture.stop()
        return elapsed

    plain, captured = [], []
    try:
        for i in range(cfg.repeats + 1):
            vllm_capture.undo()
            plain_s = generate(capture=False)
            vllm_capture.apply()
            captured_s = generate(capture=True)
            if i:  # first round warms up
                plain.append(plain_s)
                captured.append(captured_s)
        # Host syncs in the hot path: the whole wrapper (vLLM's CPU selector + the recorder's write) on a real layer
        recorder = vllm_capture.start(llm)
        layer = vllm_capture.moe_layers(llm)[0]
        hot_path = forward_impl_capture_wrapper(
            lambda *args: None, vllm_capture._cpu_selector, vllm_capture.layout().routing_owner
        )
        hidden = torch.randn(cfg.batch * cfg.prompt_len, cfg.hidden)
        logits = torch.randn(cfg.batch * cfg.prompt_len, cfg.experts)
        hot_path(layer, hidden, logits)  # binds the layer once (host side, outside the hot path)
        syncs = count_host_syncs(lambda: [hot_path(layer, hidden, logits) for _ in range(cfg.layers)])
        assert recorder.buffer[0, : hidden.shape[0]].max() < cfg.experts
    finally:
        vllm_capture.stop()
        vllm_capture.undo()
    return {"engine": vllm_capture.engine_name(), **_overhead_report(cfg, plain, captured, syncs)}
