"""The MindSpeed-RL LoRA patches against fakes of its weight adaptor, weight container, vLLM weight loader and
integrated worker (tests/fakes/mindspeed_rl), with a trained grouped-expert LoRA Qwen3-MoE on real megatron-core."""

import sys
from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.lora.convert import megatron_to_vllm, vllm_to_hf
from mindspeed_rl_r3.lora.merge import merged_state_dict
from mindspeed_rl_r3.lora.names import vllm_names
from tests.lora_models import (
    FAKES,
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

FAKE_PACKAGES = ("mindspeed_llm", "mindspeed_rl")


def _drop_fake_modules():
    for name in [m for m in sys.modules if m.split(".")[0] in FAKE_PACKAGES]:
        sys.modules.pop(name)


@pytest.fixture
def fakes(monkeypatch):
    """Fresh (unpatched) fake MindSpeed-RL / MindSpeed-LLM modules; removed again afterwards."""
    import peft

    _drop_fake_modules()
    monkeypatch.syspath_prepend(FAKES)
    monkeypatch.setattr(peft, "get_peft_model", peft.get_peft_model)
    yield
    _drop_fake_modules()


@pytest.fixture(scope="module")
def grouped_lora(megatron):
    """A grouped-expert LoRA model trained for a few steps, with its base logits."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from mindspeed_rl_r3.lora.trainable import make_grouped_lora_trainable
    from mindspeed_rl_r3.patches import peft_megatron

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(FAKES)
        model = megatron_qwen3(seed=11)
        ids = tokens(seed=2)
        install_grouped_lora_experts(model)
        base_logits = megatron_logits(model, ids)
        lora = wrap_lora(model)
        make_grouped_lora_trainable(lora)
        train(lora, steps=3)
        yield lora, ids, base_logits
        peft_megatron.undo()
    _drop_fake_modules()


def _model_config():
    """What MindSpeed-RL's ``_build_rollout`` hands the weight adaptor: the HF config plus the LoRA settings."""
    return SimpleNamespace(
        lora_target_modules=list(TARGETS),
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        num_attention_heads=SHAPE.num_attention_heads,
        num_key_value_heads=SHAPE.num_query_groups,
        num_experts=SHAPE.num_experts,
        hidden_size=SHAPE.hidden_size,
    )


def _sync(lora, infer_ep=1, moe_tp_extend_ep=False):
    """One weight sync through the fake container and vLLM loader: the vllm-ascend parameters the rollout runs."""
    from mindspeed_rl.models.rollout.vllm_adapter.megatron_weight_loaders import (
        InferParallelConfig,
        qwen_megatron_weight_loader,
    )
    from mindspeed_rl.workers.resharding.vllm_weight_container import MegatronStyleVllmWeightContainer
    from mindspeed_rl.workers.resharding.weight_adaptor import get_weight_adaptor

    config = _model_config()
    vllm_model = VllmAscendQwen3Moe()
    container = MegatronStyleVllmWeightContainer(
        megatron_model=[Wrapper(Wrapper(lora))],
        vllm_model=vllm_model,
        model_config=config,
        infer_tensor_parallel_size=1,
        infer_pipeline_parallel_size=1,
        infer_expert_parallel_size=infer_ep,
        num_layer_list=None,
        moe_tp_extend_ep=moe_tp_extend_ep,
        weight_adaptor=get_weight_adaptor("Qwen3MoeForCausalLM")(config),
    )
    weights = container.get_infer_params()
    qwen_megatron_weight_loader(weights, vllm_model, InferParallelConfig(1, 1, 1), config)
    return {n: p.detach() for n, p in vllm_model.named_parameters()}


def test_unpatched_sync_fails_on_base_layer_names(fakes, grouped_lora):
    lora, *_ = grouped_lora
    with pytest.raises(KeyError, match=r"decoder\.layers\.\d\.self_attention\.linear_(qkv|proj)\.weight"):
        _sync(lora)


@pytest.mark.parametrize(("infer_ep", "moe_tp_extend_ep"), [(1, False), (2, True)])
def test_patched_sync_gives_the_rollout_the_trained_policy(fakes, grouped_lora, infer_ep, moe_tp_extend_ep):
    from mindspeed_rl.workers.resharding import weight_adaptor

    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    lora, ids, base_logits = grouped_lora
    expected = megatron_to_vllm(merged_state_dict(lora), SHAPE, "ascend")
    adaptor = weight_adaptor.Qwen3MoeMVWeightAdaptor
    adaptor.replace_name_i2t = mindspeed_rl_lora.replace_name_i2t_lora_wrapper(adaptor.replace_name_i2t)
    names_only = _sync(lora, infer_ep, moe_tp_extend_ep)  # attention merged upstream, experts not
    assert torch.equal(
        names_only["model.layers.0.self_attn.qkv_proj.weight"], expected["model.layers.0.self_attn.qkv_proj.weight"]
    )
    assert not torch.equal(
        names_only["model.layers.0.mlp.experts.w13_weight"], expected["model.layers.0.mlp.experts.w13_weight"]
    )
    mindspeed_rl_lora.apply()
    rollout = _sync(lora, infer_ep, moe_tp_extend_ep)
    assert list(rollout) == vllm_names(SHAPE)
    for name in rollout:
        assert torch.equal(rollout[name], expected[name]), name  # exactly merge(base, adapters)
    hf = hf_qwen3()
    hf.load_state_dict(vllm_to_hf(rollout, SHAPE, "ascend"))
    adapter_logits = megatron_logits(lora, ids)
    assert (hf_logits(hf, ids) - adapter_logits).abs().max() <= 1e-5
    assert (adapter_logits - base_logits).abs().max() > 0.05
    # the sync read the trained parameters without changing them
    assert torch.equal(megatron_logits(lora, ids), adapter_logits)


def test_rollout_follows_training(fakes, megatron):
    """After more optimizer steps the next sync again equals merge(base, adapters), and the rollout moved."""
    from mindspeed_rl_r3.lora.trainable import make_grouped_lora_trainable
    from mindspeed_rl_r3.patches import mindspeed_rl_lora, peft_megatron

    mindspeed_rl_lora.apply()
    model = megatron_qwen3(seed=4)
    install_grouped_lora_experts(model)
    lora = wrap_lora(model)
    make_grouped_lora_trainable(lora)
    synced = []
    for _ in range(2):
        train(lora, steps=2)
        rollout = _sync(lora, 2, True)
        expected = megatron_to_vllm(merged_state_dict(lora), SHAPE, "ascend")
        assert all(torch.equal(rollout[n], expected[n]) for n in rollout)
        synced.append(rollout)
    w13 = "model.layers.1.mlp.experts.w13_weight"
    assert not torch.equal(synced[0][w13], synced[1][w13])
    peft_megatron.undo()


@pytest.mark.parametrize("share_backbone", [True, False])
def test_reference_worker_runs_the_base_model(fakes, grouped_lora, share_backbone):
    from mindspeed_rl.workers.integrated_worker import IntegratedWorker

    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    lora, ids, base_logits = grouped_lora
    worker = IntegratedWorker.__ray_actor_class__(
        SimpleNamespace(lora_target_modules=list(TARGETS)), SimpleNamespace(share_backbone=share_backbone)
    )
    worker.ref_model = [Wrapper(Wrapper(lora))]
    worker.reference_forward = lambda models: megatron_logits(models[0], ids)
    worker.compute_ref_log_prob()
    assert not torch.equal(worker.ref_output, base_logits)  # upstream leaves grouped expert LoRA on
    mindspeed_rl_lora.apply()
    worker.compute_ref_log_prob()
    assert torch.equal(worker.ref_output, base_logits)
    worker.megatron_config.lora_target_modules = []  # no LoRA: the wrapper stays out of the way
    worker.compute_ref_log_prob()
    assert not torch.equal(worker.ref_output, base_logits)


def test_shared_backbone_reference_keeps_the_initial_router(fakes, megatron):
    import peft
    from mindspeed_rl.workers.integrated_worker import IntegratedWorker

    from mindspeed_rl_r3.patches import mindspeed_rl_lora, peft_megatron

    mindspeed_rl_lora.apply(router_trainable=True)
    with pytest.raises(RuntimeError, match="already patched with router_trainable=True"):
        mindspeed_rl_lora.apply(router_trainable=False)
    model = megatron_qwen3(seed=6)
    ids = tokens(seed=3)
    install_grouped_lora_experts(model)
    base_logits = megatron_logits(model, ids)
    lora = wrap_lora(model)  # through the patched peft.get_peft_model
    assert peft.get_peft_model.router_trainable
    router = lora.base_model.model.decoder.layers[0].mlp.router.weight
    assert router.requires_grad
    assert lora.base_model.model.decoder.layers[0].mlp.experts.weight1_lora_b.requires_grad
    worker = IntegratedWorker.__ray_actor_class__(
        SimpleNamespace(lora_target_modules=list(TARGETS)), SimpleNamespace(share_backbone=True)
    )
    worker.ref_model = [Wrapper(Wrapper(lora))]
    worker.reference_forward = lambda models: megatron_logits(models[0], ids)
    worker.compute_ref_log_prob()  # first reference forward, before any update: snapshots the router
    assert torch.equal(worker.ref_output, base_logits)
    initial = router.detach().clone()
    train(lora, steps=3)
    assert not torch.equal(router, initial)
    worker.compute_ref_log_prob()
    assert torch.equal(worker.ref_output, base_logits)
    rollout = _sync(lora, 2, True)
    assert torch.equal(rollout["model.layers.0.mlp.gate.weight"], router.detach())  # the trained router is synced
    peft_megatron.undo()


def test_apply_is_idempotent_and_check_reports(fakes):
    from mindspeed_rl.workers.integrated_worker import IntegratedWorker
    from mindspeed_rl.workers.resharding import weight_adaptor

    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    before = mindspeed_rl_lora.check_adaptor_names()
    assert before["found"] and not before["compatible"]
    assert "linear_qkv.weight' (not a parameter of the LoRA model)" in before["detail"]
    first = mindspeed_rl_lora.apply()
    wrapped = weight_adaptor.Qwen3MoeMVWeightAdaptor.replace_name_i2t
    assert mindspeed_rl_lora.apply() == first
    assert weight_adaptor.Qwen3MoeMVWeightAdaptor.replace_name_i2t is wrapped
    assert IntegratedWorker.__ray_actor_class__.compute_ref_log_prob.__wrapped__.__name__ == "compute_ref_log_prob"
    rows = mindspeed_rl_lora.check()
    assert all(r["found"] and r["compatible"] for r in rows), [r for r in rows if not r["compatible"]]
    assert rows[-1]["name"].endswith("Qwen3MoeMVWeightAdaptor names under LoRA (vLLM -> Megatron)")
    adaptor = weight_adaptor.Qwen3MvWeightAdaptor(_model_config())
    assert adaptor.replace_name_i2t("model.layers.3.self_attn.o_proj.weight") == (
        "decoder.layers.3.self_attention.linear_proj.base_layer.weight"
    )
    moe = weight_adaptor.Qwen3MoeMVWeightAdaptor(_model_config())
    assert moe.replace_name_i2t("model.layers.0.mlp.experts.w13_weight") == "decoder.layers.0.mlp.experts.weight1"
    with pytest.raises(ValueError, match="lora_r=None"):
        moe.model_config.lora_r = None
        moe.adjust_megatron_param_dict({"x.weight1": 0, "x.weight1_lora_a": 0, "x.weight1_lora_b": 0}, 1)


def test_add_base_layer():
    from mindspeed_rl_r3.patches.mindspeed_rl_lora import add_base_layer

    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert add_base_layer(name, ["linear_qkv"]) == "decoder.layers.0.self_attention.linear_qkv.base_layer.weight"
    assert add_base_layer(name, ["linear_proj"]) == name
    assert add_base_layer("decoder.layers.0.mlp.experts.weight1", TARGETS) == "decoder.layers.0.mlp.experts.weight1"
    once = add_base_layer(name, TARGETS)
    assert add_base_layer(once, TARGETS) == once


def test_against_the_real_weight_adaptor():
    """With MINDSPEED_RL_SRC set: the real Qwen3-MoE adaptor fails the name check, and passes once patched."""
    import importlib.util
    import os
    from pathlib import Path

    from mindspeed_rl_r3.patches import mindspeed_rl_lora

    src = os.environ.get("MINDSPEED_RL_SRC")
    if not src:
        pytest.skip("set MINDSPEED_RL_SRC to a MindSpeed-RL checkout")
    path = Path(src) / "mindspeed_rl" / "workers" / "resharding" / "weight_adaptor.py"
    spec = importlib.util.spec_from_file_location("_real_weight_adaptor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only abc, re and torch
    adaptor = module.Qwen3MoeMVWeightAdaptor
    before = mindspeed_rl_lora.check_adaptor_names(adaptor)
    assert not before["compatible"] and "linear_qkv.weight' (not a parameter of the LoRA model)" in before["detail"]
    adaptor.replace_name_i2t = mindspeed_rl_lora.replace_name_i2t_lora_wrapper(adaptor.replace_name_i2t)
    after = mindspeed_rl_lora.check_adaptor_names(adaptor)
    assert after["compatible"], after["detail"]
