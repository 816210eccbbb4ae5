"""Builders shared by the rollout tests on the real vLLM 0.11 engine: a tiny Qwen3-MoE on disk (random, or the
weights of a megatron-core model so rollout and training run one policy), a real ``VLLMInferEngine`` around a real
vLLM ``LLM`` with the package's capture wrappers on vLLM's own classes, a real ``ActorHybridWorkerBase`` for its
rollout path, and a transformers reference forward."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mindspeed_rl_r3.lora.names import Qwen3MoeShape

LAYERS, EXPERTS, TOPK, VOCAB = 2, 8, 2, 320
PAD = 256  # <|endoftext|>: pad and eos
IM_START = 257  # a special token: MindSpeed-RL's own path decodes prompts with skip_special_tokens and loses it
SHAPE = Qwen3MoeShape(
    num_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16, num_experts=EXPERTS,
    moe_ffn_hidden_size=32, vocab_size=VOCAB,
)  # fmt: skip
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V1": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def save_tokenizer(path: str) -> None:
    """A byte-level tokenizer whose ids 256.. are special tokens (``<|endoftext|>`` is pad and eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab |= {s: 256 + i for i, s in enumerate(specials)}
    vocab |= {f"<extra_{i}>": i for i in range(len(vocab), VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0]).save_pretrained(path)


def hf_config():
    from transformers import Qwen3MoeConfig

    s = SHAPE
    return Qwen3MoeConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=128,
        moe_intermediate_size=s.moe_ffn_hidden_size, num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_query_groups, head_dim=s.head_dim,
        num_experts=s.num_experts, num_experts_per_tok=TOPK, norm_topk_prob=True, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=PAD, rms_norm_eps=1e-6, rope_theta=10000.0,
    )  # fmt: skip


def save_tiny_model(path: str, hf_state: dict[str, torch.Tensor] | None = None) -> None:
    """A tiny Qwen3-MoE (fp32) and the tokenizer at ``path``: random (seed 0, routers far from ties), or
    ``hf_state`` (transformers 5 naming, what :func:`mindspeed_rl_r3.lora.convert.megatron_to_hf` gives)."""
    from transformers import Qwen3MoeForCausalLM

    from tests.lora_models import load_hf_state

    save_tokenizer(path)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(hf_config())
    if hf_state is None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0, 0.5)  # routing far from ties
    else:
        load_hf_state(model, hf_state)
    model.save_pretrained(path, safe_serialization=True)


def megatron_qwen3(seed: int = 0):
    """The megatron-core GPTModel of the same Qwen3-MoE (the package's demo builder: local spec, qk-norm, SwiGLU
    experts, RoPE, untied output), fp32, routers far from ties; and its weights in transformers naming."""
    from megatron.core import tensor_parallel

    from mindspeed_rl_r3.demo.model import DemoModelSettings, megatron_model
    from mindspeed_rl_r3.lora.convert import megatron_to_hf
    from mindspeed_rl_r3.lora.merge import merged_state_dict

    settings = DemoModelSettings.from_shape(SHAPE, TOPK, max_len=256, rope_theta=10000.0, eps=1e-6)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = megatron_model(settings, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.001)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.router.weight"):
                param.normal_(0, 0.5)
            elif name.endswith("linear_fc2.weight"):
                param.mul_(3.0)  # the experts matter to the residual stream
    return model, megatron_to_hf(merged_state_dict(model), SHAPE)



class NoResharding:
    """The sharding manager's mode switches: the engine already holds the weights (loaded from disk), the training
    model keeps its own."""

    def enter_infer_mode(self) -> None:
        pass

    def exit_infer_mode(self) -> None:
        pass

    def enter_forward_mode(self) -> None:
        pass

    def exit_forward_mode(self) -> None:
        pass

    def enter_train_mode(self) -> None:
        pass

    def exit_train_mode(self) -> None:
        pass


@contextlib.contextmanager
def _vllm_capture_installed(vllm_capture: Any) -> Iterator[None]:
    vllm_capture.apply()
    try:
        yield
    finally:
        vllm_capture.undo()


@contextlib.contextmanager
def vllm_engine(path: str, n: int, max_tokens: int, **sampling: Any) -> Iterator[Any]:
    """A real ``VLLMInferEngine`` around a real vLLM ``LLM`` loaded from ``path``, built without its ``__init__``,
    which loads Megatron weight loaders, vllm-ascend's NPU patches and MindSpeed-RL's EngineCore patch. Attributes the
    exercised methods read: ``llm``, ``sampling_params``, ``pad_token_id`` (``_post_process_outputs``), ``model``,
    ``hf_config``, ``tokenizer``.

    Routing capture: vllm-ascend's ``AscendFusedMoE`` / ``NPUModelRunner`` need NPU kernels, so the package's capture
    wrappers go on the vLLM classes they mirror (``FusedMoE.forward_impl``, ``GPUModelRunner.execute_model``, which
    vLLM's CPU runner inherits) through :mod:`mindspeed_rl_r3.patches.vllm_capture`, undone on exit."""
    from mindspeed_rl.models.rollout.vllm_engine import VLLMInferEngine
    from mindspeed_rl.utils import get_tokenizer
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from mindspeed_rl_r3.patches import mindspeed_rl_rollout, vllm_capture

    with pytest.MonkeyPatch.context() as mp, _vllm_capture_installed(vllm_capture):
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
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
        runner = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        # MindSpeed-RL's EngineCore patch (vllm_adapter/engine_core.py) keeps the KV cache configs init_cache_engine
        # re-allocates from; the plain vLLM engine core keeps the scheduler's only
        engine.llm.llm_engine.engine_core.engine_core.kv_cache_configs = [runner.kv_cache_config]
        engine.sampling_params = SamplingParams(
            n=n, logprobs=1, max_tokens=max_tokens, top_k=50, temperature=1.0, **sampling
        )
        engine.pad_token_id = PAD
        engine.model = runner.get_model()
        engine.hf_config = AutoConfig.from_pretrained(path)
        engine.tokenizer = get_tokenizer(path)  # MindSpeed-RL's own path decodes prompts with it
        engine.path = path
        yield engine


def kv_caches(engine: Any) -> Any:
    return engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.kv_caches


def rollout_worker(engine: Any, td: Any, *, n: int, max_tokens: int, dispatch_size: int, **rl: Any) -> Any:
    """A real ``ActorHybridWorkerBase`` without its ``__init__``. Attributes ``generate_sequences`` and the methods it
    calls read: the three configs (real ``RLConfig``; the Megatron and generate fields it reads), ``tokenizer``
    (``pad`` / ``eod`` / ``vocab_size``), ``inference_model``, ``actor_hybrid`` (real ``ActorRolloutHybrid``),
    ``sharding_manager``, ``parallel_state`` (``use_vllm=True`` reads vLLM's own), profiler / ZMQ / index state.
    ``rl`` goes into the ``RLConfig`` (``partial_rollout_max_split > 1`` enables partial rollout, as ``__init__``
    does)."""
    from mindspeed_rl.config_cls.rl_config import RLConfig
    from mindspeed_rl.models.actor_rollout_hybrid import ActorRolloutHybrid
    from mindspeed_rl.utils.zmq_communication import ZMQ_ROLE_NONE
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase, ActorState

    worker = object.__new__(ActorHybridWorkerBase)
    worker.rl_config = RLConfig({"n_samples_per_prompt": n, "actor_rollout_dispatch_size": dispatch_size, **rl})
    worker.megatron_config = SimpleNamespace(
        tensor_model_parallel_size=1, context_parallel_size=1, context_parallel_algo="megatron_cp_algo",
        train_iters=4, stage="ray_grpo",
    )  # fmt: skip
    worker.generate_config = SimpleNamespace(
        sampling_config={"max_tokens": max_tokens}, data_parallel_size=1, max_model_len=128
    )
    worker.tokenizer = SimpleNamespace(pad=PAD, eod=PAD, vocab_size=VOCAB)
    worker.inference_model = engine
    worker.sharding_manager = NoResharding()
    worker.actor_hybrid = ActorRolloutHybrid(
        None, None, None, inference_model=engine, sharding_manager=NoResharding(), stage="ray_grpo"
    )
    worker.parallel_state = None
    worker.profiler_config, worker.prof_iteration, worker.idx, worker.state = None, 1, 0, ActorState.NONE
    worker.zmq_role, worker.zmq_server, worker.zmq_client = ZMQ_ROLE_NONE, None, None
    worker.enable_partial_rollout = worker.rl_config.partial_rollout_max_split > 1  # what __init__ sets
    worker.iteration = 0
    worker.init_transfer_dock(td)
    return worker


@functools.lru_cache(maxsize=2)
def _hf_model(path: str) -> Any:
    from transformers import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_reference(path: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sets ``[len, layers, k]`` (sorted) and next-token log-probs ``[len, vocab]`` of a transformers forward."""
    model = _hf_model(path)
    with torch.no_grad():
        out = model(ids[None], output_router_logits=True)
    sets = torch.stack([r.topk(TOPK, dim=-1).indices.sort(-1).values for r in out.router_logits], dim=1)
    return sets, torch.log_softmax(out.logits[0].float(), -1)
