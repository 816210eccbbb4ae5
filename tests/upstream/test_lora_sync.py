"""The MindSpeed-RL LoRA patches against the real MindSpeed-RL weight sync (05a90d77): ``weight_adaptor.py``
(``get_weight_adaptor`` / ``Qwen3MoeMVWeightAdaptor``), ``MegatronStyleVllmWeightContainer``, the vLLM Megatron
weight loader and ``IntegratedWorker.compute_ref_log_prob``, on a tiny Qwen3-MoE (megatron-core 0.12.1, one gloo
rank) whose experts are MindSpeed-LLM's real ``LoraParallelGroupedMLP`` (a2c0733) trained for a few steps.

The vLLM side is the parameter set vllm-ascend's ``Qwen3MoeForCausalLM`` holds after loading
(:class:`tests.lora_models.VllmAscendQwen3Moe`); the merged weights are checked against
``merge(base, adapters)`` and, through transformers, against the LoRA model's own logits.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.lora.convert import megatron_to_vllm, vllm_to_hf
from mindspeed_rl_r3.lora.merge import merged_state_dict
from mindspeed_rl_r3.lora.names import vllm_names
from tests.lora_models import (
    LORA_ALPHA,
    LORA_R,
    SHAPE,
    TARGETS,
    VllmAscendQwen3Moe,
    Wrapper,
    hf_logits,
    hf_qwen3,
    install_grouped_lora_experts,
    megatron_logits,
    megatron_qwen3,
    tokens,
    train,
    wrap_lora,
)
from tests.upstream.llm_modules import mindspeed_llm_modules

ADAPTOR = "mindspeed_rl.workers.resharding.weight_adaptor"
QKV_OR_PROJ = r"decoder\.layers\.\d\.self_attention\.linear_(qkv|proj)\.weight"


@pytest.fixture(scope="module")
def grouped_cls(upstream_sources, megatron):
    """MindSpeed-LLM's real ``LoraParallelGroupedMLP``, as it runs under MindSpeed: ``jit_fuser`` is MindSpeed's
    ``dummy_compile`` (its torch.compile patch precedes megatron's import there); ``get_args()`` answers the one
    argument the forward reads."""
    from megatron.training import global_vars
    from mindspeed.core.megatron_basic.requirements_basic import dummy_compile

    name = "mindspeed_llm.tasks.posttrain.lora.moe.experts"
    with mindspeed_llm_modules(upstream_sources, name) as (experts,), pytest.MonkeyPatch.context() as mp:
        mp.setattr(experts, "jit_fuser", dummy_compile)
        mp.setattr(global_vars, "_GLOBAL_ARGS", SimpleNamespace(moe_alltoall_overlap_comm=False))
        yield experts.LoraParallelGroupedMLP


@pytest.fixture(scope="module")
def grouped_lora(grouped_cls):
    """A grouped-expert LoRA model trained for a few steps, with its base logits."""
    from mindspeed_rl_r3.lora.trainable import make_grouped_lora_trainable
    from mindspeed_rl_r3.patches import peft_megatron

    model = megatron_qwen3(seed=11)
    ids = tokens(seed=2)
    install_grouped_lora_experts(model, grouped_cls=grouped_cls)
    base_logits = megatron_logits(model, ids)
    lora = wrap_lora(model)
    make_grouped_lora_trainable(lora)
    train(lora, steps=3)
    yield lora, ids, base_logits
    peft_megatron.undo()


@pytest.fixture
def msrl(monkeypatch):
    """The real MindSpeed-RL modules under test; every attribute the LoRA patches replace is restored afterwards,
    and the resharding groups (module globals, set once per process upstream) are fresh for each container."""
    import peft
    from mindspeed_rl.workers import integrated_worker
    from mindspeed_rl.workers.resharding import utils, weight_adaptor

    for cls in (weight_adaptor.Qwen3MoeMVWeightAdaptor, weight_adaptor.Qwen3MvWeightAdaptor):
        for attr in ("replace_name_i2t", "adjust_megatron_param_dict"):
            if attr in cls.__dict__:
                monkeypatch.setattr(cls, attr, cls.__dict__[attr])
    worker = integrated_worker.IntegratedWorker.__ray_actor_class__
    monkeypatch.setattr(worker, "compute_ref_log_prob", worker.__dict__["compute_ref_log_prob"])
    monkeypatch.setattr(peft, "get_peft_model", peft.get_peft_model)
    for group in ("_TP_ALLGATHER_GROUP", "_PP_ALLGATHER_GROUP", "_TP_GROUP"):
        monkeypatch.setattr(utils, group, None)
    return SimpleNamespace(adaptor=weight_adaptor, worker=integrated_worker, utils=utils)


def _model_config():
    """What ``_build_rollout`` hands the weight adaptor: the HF config plus the LoRA settings."""
    config = hf_qwen3().config
    config.lora_r, config.lora_alpha, config.lora_target_modules = LORA_R, LORA_ALPHA, list(TARGETS)
    return config


def _container(lora, infer_ep: int = 1, moe_tp_extend_ep: bool = False):
    """The real container over the LoRA model (wrapped as DDP(Float16Module(peft model))) and the vLLM parameters."""
    from megatron.core import parallel_state
    from mindspeed_rl.workers.resharding import utils
    from mindspeed_rl.workers.resharding.vllm_weight_container import MegatronStyleVllmWeightContainer
    from mindspeed_rl.workers.resharding.weight_adaptor import get_weight_adaptor

    utils._TP_ALLGATHER_GROUP = utils._PP_ALLGATHER_GROUP = None  # once per process upstream
    config = _model_config()
    vllm_model = type("Qwen3MoeForCausalLM", (VllmAscendQwen3Moe,), {})(infer_ep=infer_ep)
    container = MegatronStyleVllmWeightContainer(
        megatron_model=[Wrapper(Wrapper(lora))],
        vllm_model=vllm_model,
        model_config=config,
        infer_tensor_parallel_size=1,
        infer_pipeline_parallel_size=1,
        infer_expert_parallel_size=infer_ep,
        num_layer_list=None,
        moe_tp_extend_ep=moe_tp_extend_ep,
        parallel_state=parallel_state,
        weight_adaptor=get_weight_adaptor("Qwen3MoeForCausalLM")(config),
    )
    for buffer in container.weight_buffers:
        buffer.rebuild()  # MegatronShardingManager.onload_infer_params
    return container, vllm_model


def _load(params, vllm_model, infer_ep: int = 1) -> dict[str, torch.Tensor]:
    """``VLLMInferEngine.sync_model_weights``: the real Megatron weight loader into the vLLM parameters."""
    from mindspeed_rl.models.rollout.vllm_adapter.megatron_weight_loaders import (
        InferParallelConfig,
        load_megatron_weights,
    )

    load_megatron_weights(params, vllm_model, InferParallelConfig(1, 1, infer_ep, -1), _model_config())
    return {n: p.detach().clone() for n, p in vllm_model.named_parameters()}


def _sync(lora) -> dict[str, torch.Tensor]:
    """One full sync (``enter_infer_mode``): container -> loader; the vLLM parameters the rollout runs."""
    container, vllm_model = _container(lora)
    return _load(container.get_infer_params(), vllm_model)


def _hf_model(vllm_state: dict[str, torch.Tensor]):
    """The transformers model holding the synced weights. The package converts to transformers 5 (fused
    ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]``); this environment pins 4.57, which keeps
    one module per expert."""
    state, i = {}, SHAPE.moe_ffn_hidden_size
    for name, value in vllm_to_hf(vllm_state, SHAPE, "ascend").items():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in ("gate_up_proj", "down_proj") or not prefix.endswith("mlp.experts"):
            state[name] = value
            continue
        for e, tensor in enumerate(value):
            if leaf == "down_proj":
                state[f"{prefix}.{e}.down_proj.weight"] = tensor
            else:
                state[f"{prefix}.{e}.gate_proj.weight"], state[f"{prefix}.{e}.up_proj.weight"] = tensor[:i], tensor[i:]
    hf = hf_qwen3()
    hf.load_state_dict(state)
    return hf


def _expected(lora) -> dict[str, torch.Tensor]:
    return megatron_to_vllm(merged_state_dict(lora), SHAPE, "ascend")


def test_real_lora_grouped_experts_run_on_cpu(grouped_cls, grouped_lora):
    lora, ids, base_logits = grouped_lora
    experts = lora.base_model.model.decoder.layers[0].mlp.experts
    assert type(experts) is grouped_cls and experts.weight1_lora_b.requires_grad and not experts.weight1.requires_grad
    assert experts.weight1_lora_b.abs().sum() > 0  # trained away from its zero start
    assert (megatron_logits(lora, ids) - base_logits).abs().max() > 0.05


def test_unpatched_sync_fails_on_base_layer_names(msrl, grouped_lora):
    lora, *_ = grouped_lora
    container, _ = _container(lora)
    with pytest.raises(KeyError, match=QKV_OR_PROJ):
        container.get_infer_params()


def test_patched_sync_gives_the_rollout_the_trained_policy(msrl, grouped_lora):
    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    lora, ids, base_logits = grouped_lora
    expected = _expected(lora)
    adaptor = msrl.adaptor.Qwen3MoeMVWeightAdaptor
    adaptor.replace_name_i2t = mindspeed_rl_lora.replace_name_i2t_lora_wrapper(adaptor.replace_name_i2t)
    names_only = _sync(lora)  # upstream merges attention LoRA once the names resolve, never the grouped experts
    qkv, w13 = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.experts.w13_weight"
    assert torch.equal(names_only[qkv], expected[qkv])
    assert not torch.equal(names_only[w13], expected[w13])

    mindspeed_rl_lora.apply()
    container, vllm_model = _container(lora)
    rollout = _load(container.get_infer_params(), vllm_model)
    assert list(rollout) == vllm_names(SHAPE)
    for name in rollout:
        assert torch.equal(rollout[name], expected[name]), name  # exactly merge(base, adapters)
    hf = _hf_model(rollout)
    adapter_logits = megatron_logits(lora, ids)
    assert (hf_logits(hf, ids) - adapter_logits).abs().max() <= 1e-5
    assert (adapter_logits - base_logits).abs().max() > 0.05
    assert torch.equal(megatron_logits(lora, ids), adapter_logits)  # the sync left the trained parameters alone

    train(lora, steps=2, seed=7)  # the next iteration's sync, through the same container, follows training
    again = _load(container.get_infer_params(), vllm_model)
    expected = _expected(lora)
    assert all(torch.equal(again[n], expected[n]) for n in again)
    assert not torch.equal(again[w13], rollout[w13])


def test_expert_parallel_update_path_merges_local_experts(msrl, grouped_lora):
    """Rollout EP 2 with ``moe_tp_extend_ep``: experts go through ``_update_weight_buffers_ep`` (this rank keeps the
    first half). Its peer exchange (``_send_receive_experts``, HCCL P2P) needs a second rank and is not run."""
    from mindspeed_rl.workers.resharding.utils import _build_infer_param_dict

    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    lora, *_ = grouped_lora
    mindspeed_rl_lora.apply()
    container, vllm_model = _container(lora, infer_ep=2, moe_tp_extend_ep=True)
    container._update_weight_buffers_intra_pp()
    container._update_weight_buffers_ep()
    rollout = _load(_build_infer_param_dict(container._get_all_params()), vllm_model, infer_ep=2)
    expected = _expected(lora)
    local = SHAPE.num_experts // 2
    for name, tensor in rollout.items():
        want = expected[name][:local] if ".mlp.experts." in name else expected[name]
        assert torch.equal(tensor, want), name


def _worker(msrl, monkeypatch, lora, ids, share_backbone: bool, lora_targets=TARGETS):
    """The real ``IntegratedWorker`` (its Ray actor class) around the LoRA model. The TransferDock round trip of
    ``ReferenceWorkerBase.compute_ref_log_prob`` is replaced by one reference forward kept in ``ref_output``."""
    import ray
    from mindspeed_rl.workers.reference_worker import ReferenceWorkerBase

    # the dock stand-in below answers update_metrics.remote with a plain value: ray.get hands it back
    monkeypatch.setattr(ray, "get", lambda value, *args, **kwargs: value)
    monkeypatch.setattr(
        ReferenceWorkerBase,
        "compute_ref_log_prob",
        lambda self: setattr(self, "ref_output", megatron_logits(self.ref_model[0], ids)),
    )
    cls = msrl.worker.IntegratedWorker.__ray_actor_class__
    worker = cls.__new__(cls)
    worker.megatron_config = SimpleNamespace(lora_target_modules=list(lora_targets))
    worker.rl_config = SimpleNamespace(share_backbone=share_backbone)
    worker.ref_model = [Wrapper(Wrapper(lora))]
    worker.ref_manager = SimpleNamespace(onload_param=lambda: None, offload_param=lambda: None)
    worker.td = SimpleNamespace(update_metrics=SimpleNamespace(remote=lambda *a, **k: None))
    worker.profiler_config, worker.prof_iteration, worker.ref_forward_micro_batch_size = None, 0, None
    return worker


@pytest.mark.parametrize("share_backbone", [True, False])
def test_reference_worker_runs_the_base_model(msrl, monkeypatch, grouped_lora, share_backbone):
    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    lora, ids, base_logits = grouped_lora
    worker = _worker(msrl, monkeypatch, lora, ids, share_backbone)
    worker.compute_ref_log_prob()
    assert not torch.equal(worker.ref_output, base_logits)  # upstream leaves grouped expert LoRA on
    mindspeed_rl_lora.apply()
    worker.compute_ref_log_prob()
    assert torch.equal(worker.ref_output, base_logits)
    worker.megatron_config.lora_target_modules = []  # no LoRA: the wrapper stays out of the way
    worker.compute_ref_log_prob()
    assert not torch.equal(worker.ref_output, base_logits)


def test_shared_backbone_reference_keeps_the_initial_router(msrl, monkeypatch, grouped_cls):
    import peft

    from mindspeed_rl_r3.patches import mindspeed_rl_lora, peft_megatron

    mindspeed_rl_lora.apply(router_trainable=True)
    with pytest.raises(RuntimeError, match="already patched with router_trainable=True"):
        mindspeed_rl_lora.apply(router_trainable=False)
    model = megatron_qwen3(seed=6)
    ids = tokens(seed=3)
    install_grouped_lora_experts(model, grouped_cls=grouped_cls)
    base_logits = megatron_logits(model, ids)
    lora = wrap_lora(model)  # through the patched peft.get_peft_model
    assert peft.get_peft_model.router_trainable
    router = lora.base_model.model.decoder.layers[0].mlp.router.weight
    assert router.requires_grad and lora.base_model.model.decoder.layers[0].mlp.experts.weight1_lora_b.requires_grad
    worker = _worker(msrl, monkeypatch, lora, ids, share_backbone=True)
    worker.compute_ref_log_prob()  # first reference forward, before any update: snapshots the router
    assert torch.equal(worker.ref_output, base_logits)
    initial = router.detach().clone()
    train(lora, steps=3)
    assert not torch.equal(router, initial)
    worker.compute_ref_log_prob()
    assert torch.equal(worker.ref_output, base_logits)
    assert torch.equal(_sync(lora)["model.layers.0.mlp.gate.weight"], router.detach())  # the trained router syncs
    peft_megatron.undo()


def test_apply_is_idempotent_and_check_reports(msrl):
    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    before = mindspeed_rl_lora.check_adaptor_names()
    assert before["found"] and not before["compatible"]
    assert "linear_qkv.weight' (not a parameter of the LoRA model)" in before["detail"]
    first = mindspeed_rl_lora.apply()
    adaptor = msrl.adaptor
    wrapped = adaptor.Qwen3MoeMVWeightAdaptor.replace_name_i2t
    assert mindspeed_rl_lora.apply() == first
    assert adaptor.Qwen3MoeMVWeightAdaptor.replace_name_i2t is wrapped
    worker = msrl.worker.IntegratedWorker.__ray_actor_class__
    assert worker.compute_ref_log_prob.__wrapped__.__wrapped__.__name__ == "compute_ref_log_prob"  # ours, mstx's
    rows = mindspeed_rl_lora.check()
    assert all(r["found"] and r["compatible"] for r in rows), [r for r in rows if not r["compatible"]]
    assert rows[-1]["name"].endswith("Qwen3MoeMVWeightAdaptor names under LoRA (vLLM -> Megatron)")
    config = _model_config()
    assert adaptor.Qwen3MvWeightAdaptor(config).replace_name_i2t("model.layers.3.self_attn.o_proj.weight") == (
        "decoder.layers.3.self_attention.linear_proj.base_layer.weight"
    )
    moe = adaptor.get_weight_adaptor("Qwen3MoeForCausalLM")(config)
    assert moe.replace_name_i2t("model.layers.0.mlp.experts.w13_weight") == "decoder.layers.0.mlp.experts.weight1"
    moe.model_config.lora_r = None
    with pytest.raises(ValueError, match="lora_r=None"):
        moe.adjust_megatron_param_dict({"x.weight1": 0, "x.weight1_lora_a": 0, "x.weight1_lora_b": 0}, 1)
