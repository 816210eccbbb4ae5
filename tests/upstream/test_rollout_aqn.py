"""AQN on the rollout weights after each weight sync, through MindSpeed-RL 05a90d77's real ``MegatronShardingManager``
(built by the real ``ActorHybridWorkerBase._build_sharding_manager``): ``enter_infer_mode`` rebuilds the real
``MegatronStyleVllmWeightContainer`` buffers, reshards a megatron-core 0.12.1 Qwen3-MoE and loads it with the real
Megatron weight loader into the vLLM parameters; the patched method then perturbs the synced MLP-input norms.

The vLLM side is the parameter set vllm-ascend's ``Qwen3MoeForCausalLM`` holds (:class:`tests.lora_models.
VllmAscendQwen3Moe`): vllm-ascend's model needs NPU kernels. It has no modules to hook, so the noise is written into
the synced weights (``aqn.precision: param_dtype``, the default).
"""

from __future__ import annotations

import pytest
import torch

from mindspeed_rl_r3.lora.convert import megatron_to_vllm
from tests.lora_models import (
    SHAPE,
    VllmAscendQwen3Moe,
    Wrapper,
    hf_qwen3,
    install_grouped_lora_experts,
    megatron_qwen3,
)

pytestmark = pytest.mark.megatron

AQN = {"aqn": {"enabled": True, "num_stages": 2, "sigma_start": 0.05, "sigma_end": 0.01}}
NORMS = [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(SHAPE.num_layers)]


def _engine():
    """A real ``VLLMInferEngine`` without its ``__init__`` (which starts vLLM): the attributes the sharding manager
    and ``sync_model_weights`` / ``offload_model_weights`` read, as ``__init__`` sets them without EPLB."""
    from mindspeed_rl.models.rollout.vllm_engine import VLLMInferEngine

    engine = object.__new__(VLLMInferEngine)
    engine.model = _vllm_model()
    engine.cpu_model = {n: torch.empty_like(p, device="cpu") for n, p in engine.model.named_parameters()}
    engine.hf_config = _model_config()
    engine.infer_tensor_parallel_size = engine.infer_pipeline_parallel_size = engine.infer_expert_parallel_size = 1
    engine.eplb_map, engine.global_redundant_expert_num, engine.infer_local_num_experts = None, 0, -1
    return engine


def _vllm_model() -> torch.nn.Module:
    """:class:`VllmAscendQwen3Moe`'s parameters as a module tree, the way vLLM's model holds them (AQN finds each
    norm's decoder layer through its modules)."""
    root = type("Qwen3MoeForCausalLM", (torch.nn.Module,), {})()
    for name, param in VllmAscendQwen3Moe().named_parameters():
        *path, leaf = name.split(".")
        module = root
        for part, after in zip(path, [*path[1:], leaf], strict=True):
            if part not in module._modules:  # model.layers is a list, indexed by MindSpeed-RL (layers[0])
                module.add_module(part, torch.nn.ModuleList() if after.isdigit() else torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, param)
    return root


def _model_config():
    config = hf_qwen3().config
    config.lora_r = config.lora_alpha = config.lora_target_modules = None
    return config


@pytest.fixture
def worker(megatron, monkeypatch):
    """A real ``ActorHybridWorkerBase`` without its ``__init__``, after what ``initialize`` builds: the Megatron model
    (wrapped as DDP(Float16Module(model))), the rollout engine and the real sharding manager."""
    from megatron.core import parallel_state
    from mindspeed_rl.config_cls.generate_config import GenerateConfig
    from mindspeed_rl.config_cls.megatron_config import MegatronConfig
    from mindspeed_rl.config_cls.rl_config import RLConfig
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase
    from mindspeed_rl.workers.resharding import utils

    for group in ("_TP_ALLGATHER_GROUP", "_PP_ALLGATHER_GROUP", "_TP_GROUP"):
        monkeypatch.setattr(utils, group, None)  # module globals, set once per process upstream
    worker = object.__new__(ActorHybridWorkerBase)
    worker.megatron_config = MegatronConfig({"stage": "ray_grpo", "train_iters": 4}, {})
    worker.rl_config = RLConfig({})
    worker.generate_config = GenerateConfig(
        {"infer_tensor_parallel_size": 1, "infer_pipeline_parallel_size": 1, "infer_expert_parallel_size": 1}
    )
    worker.model = [Wrapper(Wrapper(grouped_qwen3()))]
    worker.parallel_state, worker.optimizer, worker.actor_offloader = parallel_state, None, None
    worker.actor_model_config = _model_config()  # what _build_rollout sets
    worker.inference_model = _engine()
    worker.sharding_manager = worker._build_sharding_manager()
    worker.iteration = 0
    return worker


def grouped_qwen3():
    """The tiny Qwen3-MoE with megatron-core's ``GroupedMLP`` experts (``moe_grouped_gemm``, as MindSpeed-RL's
    Qwen3-MoE weight sync requires: it reads ``mlp.experts.weight1`` / ``weight2``)."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    model = megatron_qwen3(seed=4)
    install_grouped_lora_experts(model, grouped_cls=lambda n, config, _lora: GroupedMLP(n, config))
    return model


def _synced(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def test_aqn_noise_follows_each_weight_sync(worker, integration):
    from mindspeed_rl_r3.integration.runtime import active
    from mindspeed_rl_r3.patches.mindspeed_rl_aqn import attach_noise
    from mindspeed_rl_r3.patches.mindspeed_rl_rollout import ROLLOUT_NOISE

    integration(AQN)
    assert attach_noise(worker, active()) == ["rollout noise (built at the first weight sync)"]  # end of initialize
    engine, manager = worker.inference_model, worker.sharding_manager
    unwrapped = worker.model[0].module.module
    expected = megatron_to_vllm({n: p.detach() for n, p in unwrapped.named_parameters()}, SHAPE, "ascend")

    worker.iteration = 3  # of train_iters 4 with 2 stages: the noisy stage
    manager.enter_infer_mode()  # the real resharding + sync, then the noise
    noisy = _synced(engine)
    noise = getattr(engine, ROLLOUT_NOISE)
    assert noise.last_metrics["aqn/sigma"] == pytest.approx(0.05)
    assert active().take_metrics()["aqn/sigma@sum"] == [pytest.approx(0.05)]
    for name, value in noisy.items():
        if name in NORMS:
            assert not torch.equal(value, expected[name]), name
            assert (value - expected[name]).abs().max() < 0.2, name
        else:
            assert torch.equal(value, expected[name]), name  # everything else is the plain sync
    assert all(torch.equal(p, expected[n]) for n, p in
               megatron_to_vllm(dict(unwrapped.named_parameters()), SHAPE, "ascend").items())  # fmt: skip
    manager.exit_infer_mode()  # the engine's weights go back to its CPU copies, the buffers are destroyed

    worker.iteration = 3  # the same step again: the same draw on freshly synced weights, never accumulated
    manager.enter_infer_mode()
    assert all(torch.equal(p, noisy[n]) for n, p in _synced(engine).items())
    manager.exit_infer_mode()

    worker.iteration = 0  # stage 0 is noise-free: exactly the synced weights
    manager.enter_infer_mode()
    assert noise.last_metrics["aqn/sigma"] == 0.0
    assert all(torch.equal(p, expected[n]) for n, p in _synced(engine).items())


def test_without_the_integration_the_sync_is_upstreams_own(worker):
    worker.iteration = 3
    worker.sharding_manager.enter_infer_mode()
    unwrapped = worker.model[0].module.module
    expected = megatron_to_vllm({n: p.detach() for n, p in unwrapped.named_parameters()}, SHAPE, "ascend")
    assert all(torch.equal(p, expected[n]) for n, p in _synced(worker.inference_model).items())
    assert not hasattr(worker.inference_model, "_r3_rollout_noise")
