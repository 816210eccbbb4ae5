"""AQN against real megatron-core on CPU: the actor's master weights, optimizer state and checkpoints never hold
noise; the rollout copy is re-synced every step so noise never accumulates; actor hooks use the rollout's z."""

import io

import pytest
import torch

from mindspeed_rl_r3.aqn import ActorNoise, AQNConfig, AQNError, RolloutNoise
from tests.hf_models import tiny_qwen3_moe
from tests.megatron_models import batch, capture_routing, gpt_model, moe_config

pytestmark = pytest.mark.megatron

STEPS = 4  # one step per stage of _cfg()


def _actor(seed=0):
    torch.manual_seed(seed)
    model = gpt_model(moe_config(2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking norm scales, exactly representable in bf16 like a bf16 actor's
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)).bfloat16().float())
    return model


def _rollout_copy(actor):
    """A rollout engine's copy of the actor: the same architecture in bf16, filled by a sync."""
    rollout = gpt_model(moe_config(2)).bfloat16()
    _sync(rollout, actor)
    return rollout


def _sync(rollout, actor):
    """MindSpeed-RL's weight sync: every rollout weight is re-copied in place from the actor's (cast to its dtype)."""
    with torch.no_grad():
        for (name, r), (source, a) in zip(rollout.named_parameters(), actor.named_parameters(), strict=True):
            assert name == source
            r.copy_(a)


def _train_step(model, opt, step):
    tokens, positions, mask = batch(2, 16, seed=step)
    model(tokens, positions, mask, labels=tokens).float().mean().backward()
    opt.step()
    opt.zero_grad()


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _assert_same(x, y, f"{what}.{key}")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what}.{key}"


def _cfg(**kw):
    base = dict(enabled=True, sigma_start=0.05, sigma_end=0.01, num_stages=4, router="compensated")
    return AQNConfig(**{**base, **kw})


def test_rollout_noise_never_reaches_master_weights_optimizer_state_or_checkpoints(megatron):
    cfg = _cfg()
    actor, twin = _actor(), _actor()  # twin: the same training without AQN anywhere
    rollout = _rollout_copy(actor)
    noise = RolloutNoise(rollout, cfg, STEPS)
    assert [t.router for t in noise.targets] == [f"decoder.layers.{i}.mlp.router.weight" for i in (0, 1)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (actor, twin)]
    history = []
    fresh = _rollout_copy(actor)
    for step in range(STEPS):
        _sync(rollout, actor)
        metrics = noise.apply(step)
        history.append(metrics)
        # No accumulation: the noisy copy equals a fresh copy of the master perturbed once for this step.
        _sync(fresh, actor)
        RolloutNoise(fresh, cfg, STEPS).apply(step)
        _assert_same(dict(rollout.named_parameters()), dict(fresh.named_parameters()), f"rollout@{step}")
        if step == STEPS - 1:
            with torch.no_grad():  # the rollout generates with the noisy copy
                rollout(*batch(2, 16, seed=100 + step))
        if metrics["aqn/sigma"] > 0:
            norm = "decoder.layers.0.pre_mlp_layernorm.weight"
            assert not torch.equal(rollout.state_dict()[norm], actor.state_dict()[norm].bfloat16())
        for model, opt in zip((actor, twin), opts, strict=True):
            _train_step(model, opt, step)
    assert [m["aqn/stage"] for m in history] == [0, 1, 2, 3]
    assert history[0]["aqn/changed_fraction"] == 0 and history[1]["aqn/changed_fraction"] > 0.9
    assert history[-1]["aqn/sigma"] == 0.01
    # Master weights, optimizer state and the saved checkpoint are bitwise those of training without AQN.
    _assert_same(dict(actor.named_parameters()), dict(twin.named_parameters()), "params")
    _assert_same(opts[0].state_dict(), opts[1].state_dict(), "optimizer")
    saved = io.BytesIO()
    torch.save({"model": actor.state_dict(), "optimizer": opts[0].state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    _assert_same(loaded["model"], twin.state_dict(), "checkpoint")
    _assert_same(loaded["optimizer"], opts[1].state_dict(), "checkpoint optimizer")


def test_a_missed_sync_is_refused_and_restore_puts_the_clean_weights_back(megatron):
    actor = _actor()
    rollout = _rollout_copy(actor)
    noise = RolloutNoise(rollout, _cfg(), STEPS)
    noise.apply(3)
    with pytest.raises(AQNError, match=r"pre_mlp_layernorm\.weight still holds the noise AQN added at step 3"):
        noise.apply(4)
    # A sync that refreshes the norms but not the routers is caught too (compensation rescaled them).
    with torch.no_grad():
        for name, p in rollout.named_parameters():
            if "layernorm" in name:
                p.copy_(actor.state_dict()[name])
    with pytest.raises(AQNError, match=r"mlp\.router\.weight still holds"):
        noise.apply(4)
    noise.restore()
    _assert_same(dict(rollout.named_parameters()), dict(_rollout_copy(actor).named_parameters()), "restored")
    noise.apply(4)  # after a restore, applying again is legitimate


def _first_layer_routing(model, tokens, positions, mask):
    maps, handles = capture_routing(model)
    with torch.no_grad():
        out = model(tokens, positions, mask)
    for h in handles:
        h.remove()
    return maps[1], out


def test_actor_hooks_use_the_rollouts_noise_without_writing_parameters(megatron):
    step = 2
    for router in ("perturbed", "compensated"):
        cfg = _cfg(apply_to="rollout+actor", router=router, sigma_start=0.2, sigma_end=0.2)
        actor = _actor()
        clean = _actor()
        # The rollout engine is transformers' Qwen3-MoE with HF names, synced from the actor's norms.
        rollout = tiny_qwen3_moe().bfloat16()
        with torch.no_grad():
            for i in range(2):
                src = actor.decoder.layers[i].pre_mlp_layernorm.weight
                rollout.model.layers[i].post_attention_layernorm.weight.copy_(src)
        RolloutNoise(rollout, cfg, STEPS).apply(step)
        noise = ActorNoise(actor, cfg, STEPS, rollout_dtype=torch.bfloat16)
        before = {n: p.clone() for n, p in actor.state_dict().items() if isinstance(p, torch.Tensor)}
        noise.set_step(step)
        for i in range(2):
            w = actor.decoder.layers[i].pre_mlp_layernorm.weight
            delta = noise._hooks.deltas[f"decoder.layers.{i}.pre_mlp_layernorm.weight"]
            # Same z across namings: the actor computes with exactly the rollout's noisy weight.
            assert torch.equal(w + delta, rollout.model.layers[i].post_attention_layernorm.weight.float())
        tokens, positions, mask = batch(4, 32, seed=5)
        noisy_map, noisy_out = _first_layer_routing(actor, tokens, positions, mask)
        clean_map, clean_out = _first_layer_routing(clean, tokens, positions, mask)
        assert not torch.equal(noisy_out, clean_out)
        if router == "compensated":
            assert torch.equal(noisy_map, clean_map)
        else:
            assert not torch.equal(noisy_map, clean_map)
        with noise.disabled():
            assert torch.equal(_first_layer_routing(actor, tokens, positions, mask)[1], clean_out)
        # Gradients flow through the hooked norm, and nothing is written to a parameter or the checkpoint view.
        actor(tokens, positions, mask, labels=tokens).float().mean().backward()
        assert actor.decoder.layers[0].pre_mlp_layernorm.weight.grad.abs().sum() > 0
        _assert_same({n: actor.state_dict()[n] for n in before}, before, "actor state_dict")
        noise.remove()
        assert torch.equal(_first_layer_routing(actor, tokens, positions, mask)[1], clean_out)


def test_megatron_layers_seed_by_global_layer_number_on_every_pipeline_stage(megatron):
    actor = _actor()
    assert [t.layer for t in ActorNoise(actor, _cfg(apply_to="rollout+actor"), STEPS).targets] == [0, 1]
    # A later pipeline stage: local names restart at decoder.layers.0, layer_number stays global (1-based).
    for i, layer in enumerate(actor.decoder.layers):
        layer.layer_number = 25 + i
    targets = RolloutNoise(actor, _cfg(), STEPS).targets
    assert [(t.name, t.layer) for t in targets] == [
        ("decoder.layers.0.pre_mlp_layernorm.weight", 24),
        ("decoder.layers.1.pre_mlp_layernorm.weight", 25),
    ]
    assert [t.layer for t in RolloutNoise(actor, _cfg(), STEPS, layer_offset=10).targets] == [10, 11]
