"""AQN: config, schedule, deterministic noise, bf16 rounding and the fp32 mode, router modes, actor hooks, LoRA.

Rollout stand-in: transformers' Qwen3-MoE (tiny, random weights); LoRA through peft. Megatron-side guarantees
(master weights, optimizer state, checkpoints, re-sync) are in ``test_aqn_megatron.py``.
"""

import copy
import hashlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from mindspeed_rl_r3.aqn import (
    ActorNoise,
    AQNConfig,
    AQNError,
    NoiseTarget,
    RolloutNoise,
    actor_stage_uses_noise,
    aqn_schedule,
    aqn_sigma,
    aqn_stage,
    draw_channel_noise,
    draw_noise,
    layer_index,
    name_matches,
    norm_slot,
    perturbed_weight,
    select_targets,
    sigma_table,
)
from mindspeed_rl_r3.bench.aqn import AQNBenchConfig, run_aqn_bench
from tests.hf_models import tiny_qwen3_moe

ON = dict(enabled=True)


def _noisy_norms(model, seed=0, spread=0.1):
    """Norm scales spread around 1 (trained models are not all ones), deterministic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1 + spread * torch.randn(p.shape, generator=g))
    return model


def _tokens(b=4, s=16, vocab=256, seed=0):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(sigma_start=0.0), "aqn.sigma_start"),
        (dict(sigma_end=-1e-3), "aqn.sigma_end"),
        (dict(sigma_end=float("nan")), "aqn.sigma_end"),
        (dict(num_stages=0), "aqn.num_stages"),
        (dict(num_stages=2.5), "aqn.num_stages"),
        (dict(targets=[]), "aqn.targets"),
        (dict(targets=[""]), "aqn.targets"),
        (dict(apply_to="actor"), "aqn.apply_to"),
        (dict(apply_to=["actor"]), "aqn.apply_to"),
        (dict(router="exclude"), "aqn.router"),
        (dict(precision="bf16"), "aqn.precision"),
        (dict(seed=-1), "aqn.seed"),
        (dict(enabled="yes"), "aqn.enabled"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(AQNError, match=field):
        AQNConfig(**kwargs)


def test_config_defaults_and_from_dict():
    cfg = AQNConfig()
    assert (cfg.sigma_start, cfg.sigma_end, cfg.num_stages) == (1e-2, 1e-3, 10)
    assert cfg.targets == ("post_attention_layernorm", "pre_mlp_layernorm")
    assert (cfg.apply_to, cfg.router, cfg.precision, cfg.actor) == ("rollout", "perturbed", "param_dtype", False)
    cfg = AQNConfig.from_dict({"enabled": True, "apply_to": ["rollout", "actor"], "targets": "input_layernorm"})
    assert cfg.actor and cfg.apply_to == "rollout+actor" and cfg.targets == ("input_layernorm",)
    with pytest.raises(AQNError, match="unknown aqn keys"):
        AQNConfig.from_dict({"sigma": 0.1})


# -- schedule ----------------------------------------------------------------------------------------------------


def test_stage_sigma_matches_the_formula_and_ends_exactly_at_sigma_end():
    cfg = AQNConfig(**ON)
    table = sigma_table(cfg)
    k_total = cfg.num_stages
    want = [0.0] + [
        cfg.sigma_start * (cfg.sigma_end / cfg.sigma_start) ** ((k - 1) / (k_total - 2)) for k in range(1, 10)
    ]
    assert table == pytest.approx(want, rel=1e-12)
    assert table[1] == cfg.sigma_start and table[-1] == cfg.sigma_end  # exact, not approximately
    assert [round(s, 5) for s in table] == [
        0.0,
        0.01,
        0.0075,
        0.00562,
        0.00422,
        0.00316,
        0.00237,
        0.00178,
        0.00133,
        0.001,
    ]
    # Stage k covers steps [k*M/K, (k+1)*M/K) of the 0-based global step; the sigma of every step is its stage's.
    for step in range(100):
        stage, sigma = aqn_schedule(step, 100, cfg)
        assert stage == step // 10 and sigma == table[stage]
    assert aqn_stage(10**6, 100, 10) == 9  # past the end: last stage, e.g. a resumed run trained longer


def test_small_stage_counts_are_well_defined():
    assert sigma_table(AQNConfig(num_stages=1)) == [0.0]
    assert sigma_table(AQNConfig(num_stages=2)) == [0.0, 1e-2]
    assert sigma_table(AQNConfig(num_stages=3)) == [0.0, 1e-2, 1e-3]
    assert [aqn_stage(s, 5, 10) for s in range(5)] == [0, 2, 4, 6, 8]  # fewer steps than stages: no division by 0
    assert aqn_sigma(3, 4, AQNConfig(num_stages=2)) == 1e-2
    with pytest.raises(AQNError, match="total_steps"):
        aqn_stage(0, 0, 10)
    with pytest.raises(AQNError, match="step"):
        aqn_stage(-1, 10, 10)


# -- noise draw --------------------------------------------------------------------------------------------------


def test_empirical_std_of_drawn_noise_matches_sigma():
    for sigma in (1e-2, 1e-3):
        z = torch.cat([draw_channel_noise(7, 3, layer, "mlp_input_norm", 2048, sigma) for layer in range(48)])
        assert z.dtype == torch.float32 and z.numel() == 48 * 2048
        assert z.std().item() == pytest.approx(sigma, rel=0.01)
        assert abs(z.mean().item()) < 4 * sigma / z.numel() ** 0.5


def test_noise_depends_on_seed_step_layer_and_slot_only():
    base = draw_channel_noise(0, 5, 3, "mlp_input_norm", 64, 1.0)
    assert torch.equal(base, draw_channel_noise(0, 5, 3, "mlp_input_norm", 64, 1.0))
    for other in [(1, 5, 3, "mlp_input_norm"), (0, 6, 3, "mlp_input_norm"), (0, 5, 4, "mlp_input_norm")]:
        assert not torch.equal(base, draw_channel_noise(*other, 64, 1.0))
    assert not torch.equal(base, draw_channel_noise(0, 5, 3, "attention_input_norm", 64, 1.0))
    # HF/vLLM and Megatron names of the same norm share a slot, hence a draw.
    assert norm_slot("model.layers.3.post_attention_layernorm.weight") == "mlp_input_norm"
    assert norm_slot("decoder.layers.3.pre_mlp_layernorm.weight") == "mlp_input_norm"
    assert layer_index("decoder.layers.3.pre_mlp_layernorm.weight", layer_offset=24) == 27
    assert layer_index("model.norm.weight") == -1


_CHILD = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from mindspeed_rl_r3.aqn import draw_channel_noise
h = hashlib.sha256()
for step in (0, 17):
    for layer in range(48):
        h.update(draw_channel_noise(11, step, layer, "mlp_input_norm", 2048, 1e-3).numpy().tobytes())
print(h.hexdigest())
"""


def test_two_processes_draw_identical_noise_without_communication():
    h = hashlib.sha256()
    for step in (0, 17):
        for layer in range(48):
            h.update(draw_channel_noise(11, step, layer, "mlp_input_norm", 2048, 1e-3).numpy().tobytes())
    # Another process with a different thread count stands in for another TP/EP/DP rank.
    out = subprocess.run([sys.executable, "-c", _CHILD, "3"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == h.hexdigest()


def test_two_rank_copies_with_independent_objects_get_identical_noisy_weights():
    cfg = AQNConfig(**ON, sigma_start=0.05, sigma_end=0.01, seed=3)
    rank0, rank1 = _noisy_norms(tiny_qwen3_moe()).bfloat16(), _noisy_norms(tiny_qwen3_moe()).bfloat16()
    noise0, noise1 = RolloutNoise(rank0, cfg, 20), RolloutNoise(rank1, cfg, 20)
    torch.randn(1000)  # the global RNG must not matter
    m0, m1 = noise0.apply(7), noise1.apply(7)
    assert m0 == m1 and m0["aqn/changed_fraction"] > 0.5
    for (n, a), (_, b) in zip(rank0.named_parameters(), rank1.named_parameters(), strict=True):
        assert torch.equal(a, b), n


# -- target selection --------------------------------------------------------------------------------------------


def test_name_patterns_match_whole_name_parts():
    assert name_matches("post_attention_layernorm", "model.layers.0.post_attention_layernorm.weight")
    assert name_matches("mlp.gate", "model.layers.0.mlp.gate.weight")
    assert not name_matches("mlp.gate", "model.layers.0.mlp.gate_proj.weight")
    assert not name_matches("layernorm", "model.layers.0.post_attention_layernorm.weight")
    assert name_matches("*.layers.1.*layernorm.weight", "model.layers.1.input_layernorm.weight")
    targets = select_targets(tiny_qwen3_moe(), AQNConfig())
    assert [t.name for t in targets] == [f"model.layers.{i}.post_attention_layernorm.weight" for i in (0, 1)]
    assert [(t.layer, t.slot, t.channels) for t in targets] == [(0, "mlp_input_norm", 64), (1, "mlp_input_norm", 64)]


def test_targets_matching_nothing_or_not_a_norm_scale_are_errors():
    model = tiny_qwen3_moe()
    with pytest.raises(AQNError, match=r"match no parameter of Qwen3MoeForCausalLM.*model\.embed_tokens\.weight"):
        RolloutNoise(model, AQNConfig(targets=["post_mlp_norm"]), 10)
    not_a_norm = AQNConfig()  # the config refuses a target naming no norm; the model-side check still holds
    object.__setattr__(not_a_norm, "targets", ("q_proj",))
    with pytest.raises(AQNError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight of shape \[64, 64\]"):
        select_targets(model, not_a_norm)
    with pytest.raises(AQNError, match=r"input_layernorm\.weight reaches the router through attention"):
        select_targets(model, AQNConfig(targets=["input_layernorm"], router="compensated"))
    with pytest.raises(AQNError, match="match no router weight"):
        select_targets(model, AQNConfig(router="compensated", router_names=["mlp.router"]))
    with pytest.raises(AQNError, match=r"apply_to is 'rollout'"):
        ActorNoise(model, AQNConfig(), 10)


def test_hooks_refuse_a_norm_that_is_not_rmsnorm():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.ModuleDict({"post_attention_layernorm": nn.LayerNorm(16, bias=False)})])
    with pytest.raises(AQNError, match=r"layers\.0\.post_attention_layernorm\.weight \(LayerNorm\) does not compute"):
        RolloutNoise(model, AQNConfig(precision="fp32"), 10)
    RolloutNoise(model, AQNConfig(), 10)  # in-place writes do not depend on the norm's formula


# -- bf16 rounding and the fp32 mode -----------------------------------------------------------------------------


def test_bf16_rounds_small_noise_away_and_the_metric_says_how_much():
    w = torch.ones(48 * 2048, dtype=torch.bfloat16)
    z = torch.cat(list(_draws(48, 2048, sigma=1e-3).values()))
    used = perturbed_weight(w, z, "param_dtype", torch.bfloat16)
    fraction = (used != 1).float().mean().item()
    assert 0.015 < fraction < 0.04  # ~2.6%: only |z| > half a bf16 ulp survives, as a whole ulp
    assert set((used - 1).unique().tolist()) <= {-(2**-8), 0.0, 2**-7}
    assert (perturbed_weight(w, z, "fp32", torch.bfloat16) != 1).float().mean().item() > 0.99
    assert torch.equal(perturbed_weight(w, z / 10, "param_dtype", torch.bfloat16), w.float())  # 1e-4: nothing left


def _draws(layers, channels, sigma, step=1):
    targets = [NoiseTarget(f"layers.{i}.n.weight", f"layers.{i}.n", i, "n", channels) for i in range(layers)]
    return draw_noise(targets, 0, step, sigma)


def _norm_io(model, layer=0, seed=0, b=4):
    """Input and output of one post-attention norm in a forward of ``model``."""
    seen = {}
    norm = model.model.layers[layer].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    _logits(model, _tokens(b=b, seed=seed))
    handle.remove()
    return seen["x"], seen["y"]


def test_fp32_mode_keeps_the_full_perturbation_in_a_bf16_model():
    cfg = dict(**ON, sigma_start=1e-3, sigma_end=1e-3, num_stages=2)
    clean = tiny_qwen3_moe().bfloat16()
    z = draw_channel_noise(0, 1, 0, "mlp_input_norm", 64, 1e-3)
    x, y_clean = _norm_io(clean, b=32)  # 512 tokens: enough to fit a per-channel gain through bf16 rounding
    rollout = {}
    for precision in ("param_dtype", "fp32"):
        model = copy.deepcopy(clean)
        noise = RolloutNoise(model, AQNConfig(**cfg, precision=precision), 2)
        rollout[precision] = noise.apply(1)["aqn/changed_fraction"]
        y = model.model.layers[0].post_attention_layernorm(x)
        assert y.dtype == torch.bfloat16
        # Per-channel gain of the noisy over the clean output, fitted over tokens: the perturbation as seen.
        yc, yn = y_clean.float().reshape(-1, 64), y.float().reshape(-1, 64)
        gain = (yn * yc).sum(0) / (yc * yc).sum(0) - 1
        corr = torch.corrcoef(torch.stack([gain, z]))[0, 1].item()
        if precision == "fp32":
            assert corr > 0.95 and gain.std().item() == pytest.approx(1e-3, rel=0.3)
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # nothing converted or written
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean.parameters(), strict=True))
            noise.restore()
            assert torch.equal(model.model.layers[0].post_attention_layernorm(x), y_clean)
        else:
            assert (gain != 0).float().mean().item() < 0.1  # most of z rounded away with the weight
    assert rollout["param_dtype"] < 0.1 < 0.99 < rollout["fp32"]


def test_fp32_hook_handles_fused_add_norm_outputs():
    class FusedAddRMSNorm(nn.Module):  # vLLM RMSNorm.forward_native: (norm(x + residual), x + residual)
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
            self.variance_epsilon = 1e-6

        def forward(self, x, residual=None):
            if residual is not None:
                x = residual = x + residual
            h = x.float()
            out = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype) * self.weight
            return out if residual is None else (out, residual)

    model = nn.Module()
    model.layers = nn.ModuleList([nn.ModuleDict({"post_attention_layernorm": FusedAddRMSNorm(32)})])
    noise = RolloutNoise(model, AQNConfig(**ON, sigma_start=0.1, sigma_end=0.1, num_stages=2, precision="fp32"), 2)
    noise.apply(1)
    x, r = torch.randn(8, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    out, residual = model.layers[0].post_attention_layernorm(x, r)
    z = draw_channel_noise(0, 1, 0, "mlp_input_norm", 32, 0.1)
    want = torch.nn.functional.rms_norm((x + r).float(), (32,), 1 + z, 1e-6).bfloat16()
    assert torch.equal(residual, x + r) and torch.equal(out, want)


# -- router modes ------------------------------------------------------------------------------------------------


def _layer_topk(model, inputs):
    """Expert ids each layer's router picks for given post-attention-norm inputs."""
    ids = []
    with torch.no_grad():
        for layer, x in zip(model.model.layers, inputs, strict=True):
            h = layer.post_attention_layernorm(x).reshape(-1, x.shape[-1])
            ids.append(layer.mlp.gate(h)[2].sort(dim=-1).values)
    return ids


@pytest.mark.parametrize("precision", ["param_dtype", "fp32"])
def test_compensated_router_keeps_top_k_while_perturbed_changes_it(precision):
    clean = _noisy_norms(tiny_qwen3_moe(seed=1))
    inputs = [_norm_io(clean, layer, seed=2)[0] for layer in range(2)]
    want = _layer_topk(clean, inputs)
    changed = {}
    for router in ("perturbed", "compensated"):
        model = copy.deepcopy(clean)
        cfg = AQNConfig(**ON, sigma_start=0.1, sigma_end=0.1, num_stages=2, router=router, precision=precision)
        RolloutNoise(model, cfg, 2).apply(1)
        got = _layer_topk(model, inputs)
        changed[router] = sum((g != w).any(-1).sum().item() for g, w in zip(got, want, strict=True))
        # Either way the experts see the noise: the norm output differs from the clean one.
        assert not torch.equal(
            model.model.layers[0].post_attention_layernorm(inputs[0]),
            clean.model.layers[0].post_attention_layernorm(inputs[0]),
        )
    assert changed["perturbed"] > 0
    assert changed["compensated"] == 0


# -- actor hooks, reference forward, LoRA ------------------------------------------------------------------------


def test_stage_table_for_actor_noise():
    on = AQNConfig(**ON, apply_to="rollout+actor")
    assert [actor_stage_uses_noise(on, s) for s in ("old_log_prob", "update", "reference")] == [True, True, False]
    assert not actor_stage_uses_noise(AQNConfig(**ON), "update")
    with pytest.raises(AQNError, match="unknown stage"):
        actor_stage_uses_noise(on, "rollout")


def test_noise_free_first_stage_leaves_everything_bitwise_clean():
    cfg = AQNConfig(**ON, apply_to="rollout+actor", num_stages=2)
    clean = _noisy_norms(tiny_qwen3_moe())
    ids = _tokens()
    want = _logits(clean, ids)
    rollout, actor = copy.deepcopy(clean), copy.deepcopy(clean)
    assert RolloutNoise(rollout, cfg, 4).apply(1) == {"aqn/sigma": 0.0, "aqn/stage": 0.0, "aqn/changed_fraction": 0.0}
    assert torch.equal(_logits(rollout, ids), want)
    noise = ActorNoise(actor, cfg, 4)
    for step, noisy in ((0, False), (2, True), (1, False)):
        noise.set_step(step)
        assert torch.equal(_logits(actor, ids), want) != noisy, step


def test_actor_hooks_compute_with_the_rollouts_weight_and_never_write_it():
    for precision in ("param_dtype", "fp32"):
        cfg = AQNConfig(
            **ON, apply_to="rollout+actor", sigma_start=0.05, sigma_end=0.05, num_stages=2, precision=precision
        )
        master = _noisy_norms(tiny_qwen3_moe())
        rollout = copy.deepcopy(master).bfloat16()  # the sync casts to the engine's dtype
        rollout_noise = RolloutNoise(rollout, cfg, 2)
        rollout_noise.apply(1)
        actor = copy.deepcopy(master)
        noise = ActorNoise(actor, cfg, 2, rollout_dtype=torch.bfloat16)
        before = {n: p.clone() for n, p in actor.state_dict().items()}
        noise.set_step(1)
        x = _norm_io(master)[0]
        for i in range(2):
            name = f"model.layers.{i}.post_attention_layernorm.weight"
            norm = actor.model.layers[i].post_attention_layernorm
            z = draw_channel_noise(0, 1, i, "mlp_input_norm", 64, 0.05)
            if precision == "fp32":  # both sides add the same fp32 z to their own copy of w
                assert torch.equal(rollout_noise._hooks.deltas[name], z)
                effective = norm.weight + z
            else:  # the actor takes the rollout's rounded weight wherever the rounding kept some noise
                effective = rollout.model.layers[i].post_attention_layernorm.weight.float()
                changed = effective != norm.weight.bfloat16().float()
                assert changed.float().mean() > 0.9
                effective = torch.where(changed, effective, norm.weight)
            want = torch.nn.functional.rms_norm(x, (64,), effective, norm.variance_epsilon)
            torch.testing.assert_close(norm(x), want, rtol=0, atol=1e-6)
        out = actor(input_ids=_tokens(), labels=_tokens())
        out.loss.backward()
        assert all(torch.equal(before[n], p) for n, p in actor.state_dict().items())  # checkpoint view: clean


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )


def test_reference_forward_is_clean_with_and_without_a_shared_backbone():
    pytest.importorskip("peft")
    cfg = AQNConfig(**ON, apply_to="rollout+actor", sigma_start=0.05, sigma_end=0.05, num_stages=2)
    base = _noisy_norms(tiny_qwen3_moe())
    ids = _tokens()
    clean_base = _logits(base, ids)

    # Separate reference model: the actor's hooks live on the actor's modules only.
    reference = copy.deepcopy(base)
    actor = copy.deepcopy(base)
    noise = ActorNoise(actor, cfg, 2)
    noise.set_step(1)
    assert not torch.equal(_logits(actor, ids), clean_base)
    assert torch.equal(_logits(reference, ids), clean_base)

    # Shared backbone: the reference is the LoRA actor under disable_adapter(); the noise must be off there too.
    shared = _lora(copy.deepcopy(base))
    noise = ActorNoise(shared, cfg, 2)
    noise.set_step(1)
    with shared.disable_adapter():
        leaked = _logits(shared, ids)
        with noise.disabled():
            ref = _logits(shared, ids)
    assert torch.equal(ref, clean_base)
    assert not torch.equal(leaked, clean_base)  # the switch is what keeps it clean
    assert noise.enabled and not torch.equal(_logits(shared, ids), _logits(_lora(copy.deepcopy(base)), ids))


def test_lora_training_with_actor_noise_updates_only_adapter_parameters():
    pytest.importorskip("peft")
    cfg = AQNConfig(
        **ON, apply_to="rollout+actor", sigma_start=0.05, sigma_end=0.01, num_stages=3, router="compensated"
    )
    model = _lora(_noisy_norms(tiny_qwen3_moe()))
    noise = ActorNoise(model, cfg, 6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(6):
        metrics = noise.set_step(step)
        for micro in range(2):
            ids = _tokens(seed=10 * step + micro)
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert metrics["aqn/stage"] == 2.0 and metrics["aqn/sigma"] == 0.01
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(before[name], p), name
        else:
            assert torch.equal(before[name], p) and p.grad is None, name
    in_state = {id(p) for p in opt.state}
    assert len(in_state) == len(trainable)
    assert all("lora_" in n for n, p in model.named_parameters() if id(p) in in_state)


def test_bench_reports_apply_time_on_one_core_and_restores_threads():
    threads = torch.get_num_threads()
    result = run_aqn_bench(AQNBenchConfig(layers=4, channels=256, num_experts=8, repeats=3))
    assert torch.get_num_threads() == threads and result["threads"] == 1
    assert result["apply_ms"] > 0 and result["draw_ms"] > 0 and result["apply_compensated_ms"] > 0
    assert 0.0 < result["changed_fraction_bf16"] < 0.1 and result["changed_fraction_fp32"] == 1.0
