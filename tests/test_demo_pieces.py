import pytest
import torch

from mindspeed_rl_r3.cli.main import main
from mindspeed_rl_r3.demo.grpo import group_advantages, grpo_loss, token_log_probs
from mindspeed_rl_r3.demo.model import DemoModelSettings, checkpoint_weights, hf_model, initial_hf_state
from mindspeed_rl_r3.demo.tokenizer import ByteTokenizer
from mindspeed_rl_r3.demo.workers import DemoSettings, RolloutWorker, rollout_worker_class


def test_byte_tokenizer_round_trip_and_chat_markers():
    tok = ByteTokenizer()
    text = "Natalia sold 48/2 = 24 clips. #### 72 – ok"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.chat_prompt("What is 2+3?")
    assert prompt[0] == tok.IM_START and prompt.count(tok.IM_END) == 1
    assert tok.decode(prompt, skip_special=False).startswith("<|im_start|>user\nWhat is 2+3?<|im_end|>")
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        ByteTokenizer(200)


def test_group_advantages_normalise_within_groups():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=3)
    assert torch.allclose(adv[:3].mean(), torch.tensor(0.0), atol=1e-6)
    assert adv[0] > 0 > adv[1] and torch.equal(adv[3:], torch.zeros(3))  # a uniform group carries no signal
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_grpo_loss_gradient_sign_and_clipping():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    logp = token_log_probs(logits, tokens)
    old = logp.detach()
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), mask, ref_logp=old, kl_coef=0.1)
    loss.backward()
    assert stats["clip_frac"] == 0.0 and stats["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    # Positive advantage raises the sampled token's logit at response positions of sample 0.
    assert logits.grad[0, 1, tokens[0, 2]] < 0
    far = grpo_loss(old + 1.0, old, torch.tensor([1.0, 1.0]), mask)[1]
    assert far["clip_frac"] == 1.0


def test_checkpoint_weights_are_what_save_pretrained_writes(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    settings = DemoModelSettings(layers=2, experts=4, topk=2)
    state = initial_hf_state(settings, seed=0)
    model = hf_model(settings)
    model.load_state_dict(state)
    model.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    ours = dict(checkpoint_weights(state))
    assert set(ours) == set(written) and "model.layers.1.mlp.experts.3.up_proj.weight" in ours
    assert all(torch.equal(ours[name], written[name]) for name in ours)


def test_rollout_engine_choice(monkeypatch, capsys, tmp_path):
    assert rollout_worker_class(DemoSettings(rollout="hf")) is RolloutWorker
    with pytest.raises(ValueError, match="one of \\('vllm', 'hf'\\), got 'sglang'"):
        rollout_worker_class(DemoSettings(rollout="sglang"))
    # the default engine without vLLM 0.27: one line naming what was found and both ways out, before Ray starts
    monkeypatch.setattr("mindspeed_rl_r3.patches.vllm_capture.installed_version", lambda: "0.11.0")
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "found 0.11.0" in err and "--rollout hf" in err and ".[cpu,vllm]" in err


def test_arithmetic_problems_score_with_the_gsm8k_reward():
    from mindspeed_rl_r3.data.gsm8k import gsm8k_reward
    from mindspeed_rl_r3.demo.pipeline import label, load_problems
    from mindspeed_rl_r3.demo.problems import arithmetic_gsm8k

    rows = arithmetic_gsm8k(50, seed=3)
    assert rows == arithmetic_gsm8k(50, seed=3)
    for row in rows:
        assert row["question"].startswith("What is ") and "<<" in row["answer"]
        assert gsm8k_reward(row["answer"], label(row["answer"])) == 1.0 and int(label(row["answer"])) >= 0
    pool, held_out, _ = load_problems(None, 8, 64, seed=0)
    assert len(pool) == 8 and len(held_out) == 64
    assert not {p["question"] for p in pool} & {p["question"] for p in held_out}  # held out from GRPO
    with pytest.raises(ValueError, match="distinct questions"):
        load_problems(None, 100, 100, seed=0)  # only ~155 sums and differences of 0..9 exist


def test_every_step_trains_on_the_pool_in_the_same_order():
    from mindspeed_rl_r3.demo.pipeline import step_batch

    pool = [{"question": str(i), "answer": "#### 0"} for i in range(5)]
    assert [p["question"] for p in step_batch(pool, 0, 3)] == ["0", "1", "2"]
    assert [p["question"] for p in step_batch(pool, 1, 3)] == ["3", "4", "0"]  # cycled
    assert step_batch(pool, 4, 5) == pool


def test_warm_start_is_cached_and_keeps_router_and_mlp_norm_frozen(tmp_path):
    pytest.importorskip("transformers")
    import random

    from mindspeed_rl_r3.demo.problems import arithmetic_gsm8k
    from mindspeed_rl_r3.demo.warm_start import WarmStartSettings, _noisy_final_answers, cache_path, warm_start_state

    model = DemoModelSettings(layers=2, experts=4, topk=2, hidden=64, heads=2, kv_heads=1)
    warm = WarmStartSettings(steps=3, batch=4, threads=1)
    assert cache_path(model, warm, 0, tmp_path) == cache_path(model, WarmStartSettings(steps=3, batch=4), 0, tmp_path)
    assert cache_path(model, warm, 0, tmp_path) != cache_path(model, warm, 1, tmp_path)
    state, info = warm_start_state(model, warm, 0, tmp_path)
    assert info["source"] == "trained" and cache_path(model, warm, 0, tmp_path).is_file()
    again, info = warm_start_state(model, warm, 0, tmp_path)
    assert info["source"] == "cache" and all(torch.equal(state[k], again[k]) for k in state)
    init = initial_hf_state(model, 0)
    for name, value in state.items():
        frozen = any(part in name for part in warm.frozen)
        assert torch.equal(value, init[name]) == frozen, name  # everything else trained (Adam moves every entry)
    rows = arithmetic_gsm8k(400, seed=1)
    noisy = _noisy_final_answers(rows, 0.5, random.Random(0))
    changed = [(a, b) for a, b in zip(rows, noisy, strict=True) if a != b]
    assert 150 < len(changed) < 250
    for a, b in changed:  # the worked line stays right, only the final answer is off
        assert a["answer"].rsplit("#### ", 1)[0] == b["answer"].rsplit("#### ", 1)[0]


@pytest.mark.shared_data
def test_real_gsm8k_plugs_in_with_data():
    from pathlib import Path

    from mindspeed_rl_r3.demo.pipeline import label, load_problems

    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"real GSM8K not present at {path}")
    pool, held_out, source = load_problems(str(path), 8, 64, seed=0)
    assert source == str(path) and len(pool) == 8 and len(held_out) == 64
    assert all(label(row["answer"]) for row in pool + held_out)  # every row has a final number to score against
    assert not {p["question"] for p in pool} & {p["question"] for p in held_out}
