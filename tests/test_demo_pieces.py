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
