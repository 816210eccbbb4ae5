"""The independent oracle: on vLLM 0.27.0 (CPU, fp32, in-process), vLLM's own routed-experts return
(``enable_return_routed_experts``, fed on the CPU by :mod:`tests.vllm027.native_capture`) and the package's capture
(:mod:`mindspeed_rl_r3.patches.vllm_capture`, its 0.27 layout, the same slot-keyed recorder) run in the same engine,
on the same model and schedule (prefix caching with hits on a sibling's block, chunked prefill, n > 1), and must agree
exactly on every row of every completion."""

from __future__ import annotations

import os
import re

import pytest
import torch

from mindspeed_rl_r3.patches import vllm_capture
from mindspeed_rl_r3.patches.mindspeed_rl_rollout import collect_generation
from mindspeed_rl_r3.patches.vllm_ascend_capture import trace_from_native
from mindspeed_rl_r3.routing import MoEModelSpec
from tests.vllm027.native_capture import native_capture_on_cpu

LAYERS, EXPERTS, TOPK, VOCAB = 3, 16, 4, 512
# vLLM 0.27's default: internal request ids carry 8 random hex digits ("{index}_{parent}-{rand}"); the package maps
# completions to them (rollout_columns.runner_request_id), so the randomisation stays on.
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def save_tiny_qwen3_moe(path: str) -> None:
    """Random tiny Qwen3-MoE (fp32, routers far from ties) with ``mlp_only_layers=[1]``: a dense layer in between, so
    the MoE-layer selection of the native (all decoder layers) trace is exercised."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=EXPERTS, num_experts_per_tok=TOPK,
        norm_topk_prob=True, max_position_embeddings=512, mlp_only_layers=[1], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from vllm import LLM

    path = str(tmp_path_factory.mktemp("tiny_qwen3_moe"))
    save_tiny_qwen3_moe(path)
    with pytest.MonkeyPatch.context() as mp, native_capture_on_cpu():
        for key, value in ENV.items():
            mp.setenv(key, value)
        mp.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm_cache")))
        vllm_capture.apply()
        engine = LLM(
            model=path, dtype="float32", enforce_eager=True, max_model_len=512, max_num_batched_tokens=96,
            max_num_seqs=8, seed=0, enable_prefix_caching=True, enable_chunked_prefill=True,
            enable_return_routed_experts=True, skip_tokenizer_init=True,
        )  # fmt: skip
        try:
            yield engine
        finally:
            vllm_capture.stop()
            vllm_capture.undo()


def test_package_capture_equals_vllm_native_routed_experts(llm):
    import vllm
    from vllm import SamplingParams

    assert vllm.__version__.startswith("0.27") and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0") == "0"
    spec = MoEModelSpec.from_hf_config(llm.llm_engine.model_config.hf_config)
    assert spec.moe_layers == (0, 2)
    shared = [(7 * i + 3) % 500 for i in range(150)]  # longer than the 96-token budget: chunked
    prompts = [[*shared, 1, 2], [*shared, 3], [(5 * i + 1) % 500 for i in range(40)]]
    params = SamplingParams(n=2, max_tokens=12, logprobs=1, ignore_eos=True, temperature=1.0, detokenize=False)
    rows = 0
    for call in range(2):  # the second call hits the first call's prefix blocks
        recorder = vllm_capture.start(llm)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        recorder.finish_all()
        runner_ids = recorder.request_ids()
        assert len(runner_ids) == len(prompts) * params.n
        assert all(re.fullmatch(r"\d+_\d+-[0-9a-f]{8}", rid) for rid in runner_ids), runner_ids  # randomised
        rollout = collect_generation(outputs, prompts, params.n, recorder)
        assert call == 0 or min(o.num_cached_tokens for o in outputs[:2]) > 0
        for i, request in enumerate(outputs):
            for j, completion in enumerate(request.outputs):
                ours = rollout.samples[i * params.n + j].trace
                native = trace_from_native(completion.routed_experts, spec)
                n_rows = len(prompts[i]) + len(completion.token_ids) - 1
                assert ours.rows == native.rows == n_rows, (call, i, j)
                assert not ours.missing().any() and not native.missing().any(), (call, i, j)
                # the same k-sets (the order inside a row is the selector's: not part of the routing decision)
                same = torch.equal(ours.ids.sort(-1).values, native.ids.sort(-1).values)
                assert same, f"call {call} prompt {i} completion {j}"
                rows += n_rows
    assert rows > 1000
