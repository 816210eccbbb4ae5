"""The actor rollout end to end on real code: MindSpeed-RL 05a90d77's ``ActorHybridWorkerBase.generate_sequences`` ->
``sync_generate_process`` -> ``ActorRolloutHybrid`` -> ``VLLMInferEngine.generate_sequences`` (patched) /
``_post_process_outputs`` / ``init_cache_engine`` / ``free_cache_engine`` -> the real vLLM 0.11 ``LLM`` (CPU, fp32,
in-process) on a tiny Qwen3-MoE -> ``collect_transfer_dock_data`` (patched) -> a real ``GRPOTransferDock``.

Routing capture: vllm-ascend's ``AscendFusedMoE`` / ``NPUModelRunner`` need NPU kernels, so the package's capture
wrappers (:mod:`mindspeed_rl_r3.patches.vllm_ascend_capture`) are installed on the vLLM classes they derive from
(``FusedMoE.forward_impl``, ``GPUModelRunner.execute_model``, which vLLM's CPU runner inherits). The stored routing
and log-probs are checked against a Hugging Face forward of the same weights.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.routing import decode_group, token_fingerprint

LAYERS, EXPERTS, TOPK, N, VOCAB, MAX_TOKENS = 2, 8, 2, 2, 320, 6
IM_START = 257  # a special token: MindSpeed-RL's own path decodes prompts with skip_special_tokens and loses it
PROMPTS = [[IM_START, 72, 101, 108, 108, 111], [IM_START, 87, 111, 114]]
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V1": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def save_tiny_model(path: str) -> None:
    """A random tiny Qwen3-MoE (fp32) with a byte-level tokenizer whose ids 256.. are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab |= {s: 256 + i for i, s in enumerate(specials)}
    vocab |= {f"<extra_{i}>": i for i in range(len(vocab), VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0]).save_pretrained(path)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=EXPERTS, num_experts_per_tok=TOPK,
        norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)  # routing far from ties
    model.save_pretrained(path, safe_serialization=True)


def _select_experts(*, global_num_experts: int, **kwargs):
    """vLLM's CPU top-k (the ids its CPU MoE kernels route by); it takes no global expert count."""
    from vllm.model_executor.layers.fused_moe.cpu_fused_moe import select_experts

    return select_experts(**kwargs)


@pytest.fixture(scope="module")
def vllm_engine(tmp_path_factory, upstream_sources):
    """A real ``VLLMInferEngine`` around a real vLLM ``LLM``, built without its ``__init__``, which loads Megatron
    weight loaders, vllm-ascend's NPU patches and MindSpeed-RL's EngineCore patch. Attributes the exercised methods
    read: ``llm``, ``sampling_params``, ``pad_token_id`` (``_post_process_outputs``), ``model``, ``hf_config``,
    ``tokenizer``."""
    from mindspeed_rl.models.rollout.vllm_engine import VLLMInferEngine
    from mindspeed_rl.utils import get_tokenizer
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE
    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from mindspeed_rl_r3.patches import mindspeed_rl_rollout
    from mindspeed_rl_r3.patches import vllm_ascend_capture as capture

    path = str(tmp_path_factory.mktemp("tiny_qwen3_moe"))
    save_tiny_model(path)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
        mp.setattr(
            FusedMoE,
            "forward_impl",
            capture.forward_impl_capture_wrapper(FusedMoE.forward_impl, lambda: _select_experts),
        )
        mp.setattr(GPUModelRunner, "execute_model", capture.execute_model_capture_wrapper(GPUModelRunner.execute_model))
        # vllm-ascend's BlockTable keeps the step's slots in slot_mapping_np, vLLM's in slot_mapping.np
        mp.setattr(BlockTable, "slot_mapping_np", property(lambda self: self.slot_mapping.np), raising=False)
        mp.setattr(mindspeed_rl_rollout, "_capture_installed", {"0.11.0"})  # attached above, not to vllm-ascend
        # MindSpeed-RL's NPUModelRunner.initialize_kv_cache patch: a KV cache re-allocated by init_cache_engine after
        # free_cache_engine keeps the attention backends it has (vLLM's runner asserts they are not built twice)
        build_backends = GPUModelRunner.initialize_attn_backend
        mp.setattr(
            GPUModelRunner, "initialize_attn_backend", lambda self, c: self.attn_groups or build_backends(self, c)
        )
        engine = object.__new__(VLLMInferEngine)
        engine.llm = LLM(
            model=path, dtype="float32", enforce_eager=True, max_model_len=128, max_num_batched_tokens=128,
            max_num_seqs=8, seed=0, enable_prefix_caching=False,
        )  # fmt: skip
        # MindSpeed-RL's EngineCore patch (vllm_adapter/engine_core.py) keeps the KV cache configs init_cache_engine
        # re-allocates from; the plain vLLM engine core keeps the scheduler's only
        core = engine.llm.llm_engine.engine_core.engine_core
        core.kv_cache_configs = [engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.kv_cache_config]
        engine.sampling_params = SamplingParams(n=N, logprobs=1, max_tokens=MAX_TOKENS, top_k=50, temperature=1.0)
        engine.pad_token_id = 256
        engine.model = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
        engine.hf_config = AutoConfig.from_pretrained(path)
        engine.tokenizer = get_tokenizer(path)  # MindSpeed-RL's own path decodes prompts with it
        engine.path = path
        yield engine


@pytest.fixture
def dock(ray_cluster):
    import ray
    from mindspeed_rl.trainer.utils.transfer_dock import GRPOTransferDock, put_prompts_experience
    from mindspeed_rl.utils.metrics import Metric

    td = GRPOTransferDock.remote(
        prompts_num=len(PROMPTS), n_samples_per_prompt=N, metrics=Metric(), GBS_train=len(PROMPTS),
        addition_columns=[ROUTED_EXPERTS, ROLLOUT_LOG_PROBS],
    )  # fmt: skip
    data, indexes = put_prompts_experience({"prompts": [torch.tensor(p) for p in PROMPTS]}, N, [])
    ray.get(td.put_experience.remote(data, indexes=indexes, is_prompt=True))
    yield td
    ray.kill(td)


class NoResharding:
    """The sharding manager's infer-mode switch: the engine already holds the weights (loaded from disk)."""

    def enter_infer_mode(self) -> None:
        pass

    def exit_infer_mode(self) -> None:
        pass


def make_worker(engine, td):
    """A real ``ActorHybridWorkerBase`` without its ``__init__``. Attributes ``generate_sequences`` and the methods it
    calls read: the three configs (real ``RLConfig``; the Megatron and generate fields it reads), ``tokenizer``
    (``pad`` / ``eod`` / ``vocab_size``), ``inference_model``, ``actor_hybrid`` (real ``ActorRolloutHybrid``),
    ``sharding_manager``, ``parallel_state`` (``use_vllm=True`` reads vLLM's own), profiler / ZMQ / index state."""
    from mindspeed_rl.config_cls.rl_config import RLConfig
    from mindspeed_rl.models.actor_rollout_hybrid import ActorRolloutHybrid
    from mindspeed_rl.utils.zmq_communication import ZMQ_ROLE_NONE
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase, ActorState

    worker = object.__new__(ActorHybridWorkerBase)
    worker.rl_config = RLConfig({"n_samples_per_prompt": N, "actor_rollout_dispatch_size": N * len(PROMPTS)})
    worker.megatron_config = SimpleNamespace(
        tensor_model_parallel_size=1, context_parallel_size=1, context_parallel_algo="megatron_cp_algo",
        train_iters=4, stage="ray_grpo",
    )  # fmt: skip
    worker.generate_config = SimpleNamespace(sampling_config={"max_tokens": MAX_TOKENS}, data_parallel_size=1)
    worker.tokenizer = SimpleNamespace(pad=256, eod=256, vocab_size=VOCAB)
    worker.inference_model = engine
    worker.sharding_manager = NoResharding()
    worker.actor_hybrid = ActorRolloutHybrid(
        None, None, None, inference_model=engine, sharding_manager=NoResharding(), stage="ray_grpo"
    )
    worker.parallel_state = None
    worker.profiler_config, worker.prof_iteration, worker.idx, worker.state = None, 1, 0, ActorState.NONE
    worker.zmq_role, worker.zmq_server, worker.zmq_client = ZMQ_ROLE_NONE, None, None
    worker.enable_partial_rollout, worker.iteration = False, 0
    worker.init_transfer_dock(td)
    return worker


def hf_reference(path: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sets ``[len, layers, k]`` (sorted) and next-token log-probs ``[len, vocab]`` of a transformers forward."""
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(ids[None], output_router_logits=True)
    sets = torch.stack([r.topk(TOPK, dim=-1).indices.sort(-1).values for r in out.router_logits], dim=1)
    return sets, torch.log_softmax(out.logits[0].float(), -1)


def test_actor_rollout_on_real_vllm_puts_routing_and_log_probs_of_the_stored_tokens(vllm_engine, dock, integration):
    import ray

    integration()
    worker = make_worker(vllm_engine, dock)
    seen = []
    generate = vllm_engine.llm.generate
    vllm_engine.llm.generate = lambda prompts, **kw: seen.extend(prompts) or generate(prompts, **kw)
    try:
        worker.generate_sequences()
    finally:
        del vllm_engine.llm.generate

    assert sorted(p["prompt_token_ids"] for p in seen) == sorted(PROMPTS)  # token ids, the special token kept
    assert (
        vllm_engine._r3_last_rollout is None
        and not vllm_engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.kv_caches
    )
    data = ray.get(dock.get_experience_data.remote())
    traces = decode_group([data[ROUTED_EXPERTS][i] for i in range(N * len(PROMPTS))])
    for i, trace in enumerate(traces):
        ids = data["input_ids"][i].long()
        response = data["responses"][i]
        assert ids[: len(PROMPTS[i // N])].tolist() == PROMPTS[i // N]
        assert trace.rows == ids.numel() - 1 and trace.token_hash == token_fingerprint(ids)
        sets, log_probs = hf_reference(vllm_engine.path, ids[:-1])
        assert torch.equal(trace.ids.long().sort(-1).values, sets)
        want = log_probs[torch.arange(ids.numel() - 1), ids[1:]][-response.numel() :]
        assert torch.allclose(data[ROLLOUT_LOG_PROBS][i], want, atol=1e-3)


def test_unpatched_engine_sends_text_and_loses_the_chat_token(vllm_engine):
    """MindSpeed-RL's own path (no integration): prompts decoded with skip_special_tokens, vLLM tokenizes again."""
    seen = []
    generate = vllm_engine.llm.generate
    vllm_engine.llm.generate = lambda prompts, **kw: seen.extend(prompts) or generate(prompts, **kw)
    try:
        responses, _ = vllm_engine.generate_sequences([PROMPTS[0]], n=1, max_tokens=1)
    finally:
        del vllm_engine.llm.generate
    assert responses.shape[0] == 1 and isinstance(seen[0], str)
    routed = vllm_engine.llm.get_tokenizer().encode(seen[0])
    assert IM_START not in routed and routed != PROMPTS[0]  # vLLM would route other tokens than training sees


def test_actor_rollout_without_log_probs_is_refused(vllm_engine, integration, monkeypatch):
    from mindspeed_rl_r3.patches.mindspeed_rl_rollout import ACTOR_ROLLOUT
    from mindspeed_rl_r3.patches.vllm_ascend_capture import CaptureSession
    from mindspeed_rl_r3.routing import RoutingError

    integration()
    monkeypatch.setattr(vllm_engine, ACTOR_ROLLOUT, True, raising=False)
    before = copy.deepcopy(vllm_engine.sampling_params)
    with pytest.raises(RoutingError, match=r"sampling_config\.logprobs >= 0"):
        vllm_engine.generate_sequences([PROMPTS[1]], n=1, max_tokens=2, logprobs=None)
    assert not CaptureSession.enabled
    # upstream's update_sampling_params restores its overrides only on a clean exit; the wrapper restores them here
    after = vllm_engine.sampling_params
    assert (after.n, after.max_tokens, after.logprobs) == (before.n, before.max_tokens, before.logprobs)
