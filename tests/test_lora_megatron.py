"""LoRA on a real megatron-core Qwen3-MoE with peft: merged rollout weights, the reference forward, the trainable
router, and Megatron <-> transformers conversion, for local (peft) expert LoRA. The same tests run with MindSpeed-LLM's
real grouped expert LoRA (``LoraParallelGroupedMLP``) in tests/upstream/test_lora_grouped.py, which overrides the
``lora_env`` fixture (the grouped experts class; None here) and ``trained``."""

import pytest
import torch

from mindspeed_rl_r3.lora.convert import hf_to_megatron, megatron_to_hf, merged_hf_state_dict
from mindspeed_rl_r3.lora.merge import merge_grouped_fc1, merge_grouped_fc2, merge_linear, merged_state_dict
from mindspeed_rl_r3.lora.names import check_name_mapping, hf_names, megatron_names, strip_wrappers
from mindspeed_rl_r3.lora.reference import adapters_disabled, lora_contribution_is_off
from mindspeed_rl_r3.lora.router import (
    INITIAL_WEIGHT_ATTR,
    initial_router_weights,
    make_router_trainable,
    snapshot_router_weights,
)
from tests.lora_models import (
    SHAPE,
    TARGETS,
    Wrapper,
    hf_logits,
    hf_qwen3,
    install_grouped_lora_experts,
    load_hf_state,
    megatron_logits,
    megatron_qwen3,
    tokens,
    train,
    wrap_lora,
)

pytestmark = pytest.mark.megatron
TOL = 1e-5


@pytest.fixture(scope="module")
def lora_env(megatron):
    """peft repaired for megatron-core (undone afterwards); the grouped experts class: none in this environment."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from mindspeed_rl_r3.patches import peft_megatron

    yield None
    peft_megatron.undo()


def _hf_from(state):
    hf = hf_qwen3()
    load_hf_state(hf, megatron_to_hf(state, SHAPE))
    return hf


def _build(layout, router_trainable=False, steps=3, grouped_cls=None):
    """Base logits, base state, then LoRA (peft, plus grouped experts ``grouped_cls`` for 'grouped') trained for
    ``steps``."""
    from mindspeed_rl_r3.patches.mindspeed_rl_lora import get_peft_model_lora_wrapper

    model = megatron_qwen3()
    ids = tokens()
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    if layout == "grouped":
        # the base model, experts as MindSpeed's grouped GEMM layout
        install_grouped_lora_experts(model, grouped_cls=grouped_cls)
    base_logits = megatron_logits(model, ids)
    import peft

    original = peft.get_peft_model
    peft.get_peft_model = get_peft_model_lora_wrapper(original, router_trainable=router_trainable)
    try:
        lora = wrap_lora(model)
    finally:
        peft.get_peft_model = original
    snapshot_router_weights(lora)
    train(lora, steps=steps)
    return lora, ids, base_logits, base_state


@pytest.fixture(scope="module")
def trained(lora_env):
    return ("local", *_build("local"))


def test_megatron_and_transformers_logits_match(lora_env):
    model = megatron_qwen3(seed=3)
    ids = tokens(seed=4)
    state = {n: p.detach() for n, p in model.named_parameters()}
    hf = _hf_from(state)
    assert list(hf.state_dict()) == hf_names(SHAPE)
    meg_logits = megatron_logits(model, ids)
    assert (hf_logits(hf, ids) - meg_logits).abs().max() <= TOL
    # and back: a fresh Megatron model loaded from the transformers weights
    fresh = megatron_qwen3(seed=9)
    fresh.load_state_dict(hf_to_megatron(hf.state_dict(), SHAPE), strict=False)
    assert all(torch.equal(p, state[n]) for n, p in fresh.named_parameters())
    assert torch.equal(megatron_logits(fresh, ids), meg_logits)


def test_real_model_names_match_the_name_lists(trained):
    layout, lora, *_ = trained
    names = [n for n, _ in lora.named_parameters()]
    assert [strip_wrappers(n) for n in names] == megatron_names(SHAPE, layout, TARGETS)
    for naming in ("vllm", "hf"):
        check_name_mapping(names, SHAPE, naming)
    trainable = {strip_wrappers(n) for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    if layout == "grouped":
        assert "decoder.layers.1.mlp.experts.weight2_lora_b" in trainable


def test_merged_weights_reproduce_the_adapter_forward(trained):
    layout, lora, ids, base_logits, _ = trained
    adapter_logits = megatron_logits(lora, ids)
    assert (adapter_logits - base_logits).abs().max() > 0.05  # the adapters really moved the policy
    merged = merged_state_dict(lora)
    assert list(merged) == megatron_names(SHAPE, layout)
    hf = hf_qwen3()
    load_hf_state(hf, merged_hf_state_dict([Wrapper(lora)], SHAPE))  # one call, through any wrapper
    assert (hf_logits(hf, ids) - adapter_logits).abs().max() <= TOL
    fresh = megatron_qwen3(seed=5)  # local experts: grouped weights go through the transformers layout
    local = merged if layout == "local" else hf_to_megatron(megatron_to_hf(merged, SHAPE), SHAPE)
    fresh.load_state_dict(local, strict=False)
    assert (megatron_logits(fresh, ids) - adapter_logits).abs().max() <= TOL


def test_rollout_weights_equal_merge_of_base_and_adapters_after_training(trained):
    _, lora, _, _, base_state = trained
    merged = merged_state_dict(lora)
    modules = dict(lora.named_modules())
    for name, value in merged.items():
        module = modules["base_model.model." + name.rsplit(".", 1)[0]]
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            assert torch.equal(module.base_layer.weight, base_state[name]), name  # training left the base alone
            assert torch.equal(value, merge_linear(base_state[name], a, b, module.scaling["default"])), name
            assert not torch.equal(value, base_state[name]), name
        elif name.endswith(("experts.weight1", "experts.weight2")):
            fc = "fc1" if name.endswith("1") else "fc2"
            prefix = name.rsplit(".", 1)[0]
            base = torch.stack([base_state[f"{prefix}.local_experts.{e}.linear_{fc}.weight"].t() for e in range(8)])
            weight = getattr(module, name[-7:])
            assert torch.equal(weight, base.reshape(weight.shape)), name
            merge = merge_grouped_fc1 if fc == "fc1" else merge_grouped_fc2
            a, b = getattr(module, name[-7:] + "_lora_a"), getattr(module, name[-7:] + "_lora_b")
            assert torch.equal(value, merge(weight, a, b, module.lora_r, module.scaling)), name
            assert not torch.equal(value, weight), name
        else:
            assert torch.equal(value, base_state[name]), name  # norms, embeddings, router: synced unchanged
    assert all(torch.equal(x, y) for x, y in zip(merged.values(), merged_state_dict(lora).values(), strict=True))


def test_reference_forward_equals_the_base_model_exactly(trained):
    layout, lora, ids, base_logits, _ = trained
    adapter_logits = megatron_logits(lora, ids)
    with adapters_disabled(lora) as off:
        assert lora_contribution_is_off(lora)
        assert torch.equal(megatron_logits(lora, ids), base_logits)
    assert off.peft_layers == (4 if layout == "grouped" else 36)
    assert off.grouped_experts == (2 if layout == "grouped" else 0)
    assert torch.equal(megatron_logits(lora, ids), adapter_logits)  # everything restored
    assert all(p.requires_grad for n, p in lora.named_parameters() if "lora" in n)
    with lora.disable_adapter():  # upstream's reference: peft only
        peft_only = megatron_logits(lora, ids)
    assert torch.equal(peft_only, base_logits) == (layout == "local")  # grouped expert LoRA stays on upstream


def test_reference_is_restored_after_an_exception(trained):
    _, lora, ids, _, _ = trained
    adapter_logits = megatron_logits(lora, ids)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(lora):
        raise RuntimeError("boom")
    assert torch.equal(megatron_logits(lora, ids), adapter_logits)


@pytest.mark.parametrize("router_trainable", [False, True])
def test_router_trainable_option(lora_env, router_trainable):
    layout = "local" if lora_env is None else "grouped"
    lora, ids, base_logits, base_state = _build(layout, router_trainable=router_trainable, grouped_cls=lora_env)
    routers = {n: p for n, p in lora.named_parameters() if n.endswith("mlp.router.weight")}
    merged = merged_state_dict(lora)
    for name, param in routers.items():
        clean = strip_wrappers(name)
        assert param.requires_grad == router_trainable
        assert torch.equal(merged[clean], param)  # the live router is what the rollout gets
        assert torch.equal(param, base_state[clean]) != router_trainable  # bit-identical unless trained
    assert (hf_logits(_hf_from(merged), ids) - megatron_logits(lora, ids)).abs().max() <= TOL
    with adapters_disabled(lora) as off:  # initial router snapshot: the reference is still the base model
        assert torch.equal(megatron_logits(lora, ids), base_logits)
    assert off.routers == 2


def test_make_router_trainable_restores_sequence_parallel(lora_env):
    model = megatron_qwen3()
    for _, p in model.named_parameters():
        p.requires_grad_(False)
        if hasattr(p, "sequence_parallel"):
            del p.sequence_parallel  # what MindSpeed-LLM does to frozen parameters after peft wrapping
    names = make_router_trainable(model, sequence_parallel=True)
    assert names == [f"decoder.layers.{i}.mlp.router.weight" for i in range(SHAPE.num_layers)]
    router = model.decoder.layers[0].mlp.router
    assert router.weight.requires_grad and router.weight.sequence_parallel is True
    assert snapshot_router_weights(model) == 2 and snapshot_router_weights(model) == 0
    initial = getattr(router, INITIAL_WEIGHT_ATTR).clone()
    with torch.no_grad():
        router.weight.add_(1.0)
    trained = router.weight.detach().clone()
    with initial_router_weights(model) as swapped:
        assert swapped == 2 and torch.equal(router.weight, initial)
    assert torch.equal(router.weight, trained)
    with pytest.raises(ValueError, match=r"no '\*\.mlp\.router' module"):
        make_router_trainable(torch.nn.Linear(2, 2))
