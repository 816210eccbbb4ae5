"""Fake-quantization evaluation of trained policies: what NVFP4 / INT4 post-training quantization does to them.

AQN is meant to make the policy robust to low-bit quantization of its weights. For each trained policy (merged
weights in transformers naming), in fp32 so the quantization is the only difference:

- ``reward``: greedy (temperature 0) reward on a fixed set of held-out problems, unquantized and fake-quantized;
  ``reward_drop`` = unquantized - quantized.
- log-prob drift on answers sampled from the *unquantized* policy (temperature 1, fixed seed): ``kl`` = mean over
  response tokens of the full-vocabulary KL(unquantized || quantized), ``mean_abs_dlogp`` = mean |log p_q - log p| of
  the sampled tokens, ``k3`` = its k3 estimate.

Quantized: every attention projection and expert weight (``q/k/v/o_proj``, ``experts.gate_up_proj``,
``experts.down_proj``). Kept in full precision, as NVFP4 checkpoints do: embeddings, ``lm_head``, the router
(``mlp.gate``) and the norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mindspeed_rl_r3.aqn.quantize import FORMATS, fake_quantize_state
from mindspeed_rl_r3.data.gsm8k import gsm8k_reward
from mindspeed_rl_r3.demo.model import DemoModelSettings, hf_model
from mindspeed_rl_r3.demo.tokenizer import ByteTokenizer

_QUANTIZED_SUFFIXES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
)


def quantized_weight(name: str) -> bool:
    """Whether the evaluation quantizes this transformers parameter (linear and expert weights only)."""
    return name.endswith(_QUANTIZED_SUFFIXES)


def _generate(model, tok: ByteTokenizer, prompts: list[list[int]], max_new: int, sample: bool, seed: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    torch.manual_seed(seed)
    extra = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
            **extra,
        )
    responses = []
    for row in out[:, width:].tolist():
        responses.append(row[: row.index(tok.eos_id) + 1] if tok.eos_id in row else row)
    return responses


def _teacher_forced(model, tok: ByteTokenizer, prompts, responses) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full log-softmax at every response position ``[N, R, V]``, the sampled tokens ``[N, R]`` and their mask."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    longest = max(len(r) for r in responses)
    ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
    index = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=torch.bool)
    tokens = torch.full((len(seqs), longest), tok.pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        index[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        mask[i, : len(r)] = True
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long) if r else tokens[i, :0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return torch.log_softmax(picked, dim=-1), tokens, mask


def _policy(state: Mapping[str, torch.Tensor], settings: DemoModelSettings, problems: list[dict[str, str]]):
    """The fp32 transformers model holding ``state``, its tokenizer and the chat prompts of ``problems``."""
    tok = ByteTokenizer(settings.vocab)
    model = hf_model(settings)
    model.load_state_dict(dict(state))
    return model, tok, [tok.chat_prompt(p["question"]) for p in problems]


def _greedy_reward(model, tok: ByteTokenizer, prompts, labels: list[str], max_new_tokens: int) -> float:
    greedy = _generate(model, tok, prompts, max_new_tokens, False, 0)
    return sum(gsm8k_reward(tok.decode(r), y) for r, y in zip(greedy, labels, strict=True)) / len(labels)


def greedy_reward(
    state: Mapping[str, torch.Tensor],
    settings: DemoModelSettings,
    problems: list[dict[str, str]],
    labels: list[str],
    *,
    max_new_tokens: int,
) -> float:
    """Mean GSM8K reward of greedy (temperature 0) answers of the fp32 policy ``state`` to ``problems``."""
    return _greedy_reward(*_policy(state, settings, problems), labels, max_new_tokens)


def evaluate_policy(
    state: Mapping[str, torch.Tensor],
    settings: DemoModelSettings,
    problems: list[dict[str, str]],
    labels: list[str],
    *,
    max_new_tokens: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """``{"unquantized": {...}, "nvfp4": {...}, "int4": {...}}`` for one policy; see the module docstring."""
    model, tok, prompts = _policy(state, settings, problems)
    sampled = _generate(model, tok, prompts, max_new_tokens, True, seed)
    base_logp, tokens, mask = _teacher_forced(model, tok, prompts, sampled)
    results: dict[str, dict[str, float]] = {}
    for fmt in ("unquantized", *FORMATS):
        entry: dict[str, float] = {}
        if fmt != "unquantized":
            quantized, stats = fake_quantize_state(state, fmt, quantized_weight)
            model.load_state_dict(quantized)
            entry.update(stats)
            logp, _, _ = _teacher_forced(model, tok, prompts, sampled)
            kl = (base_logp.exp() * (base_logp - logp)).sum(-1)[mask]
            d = (logp.gather(-1, tokens.unsqueeze(-1)) - base_logp.gather(-1, tokens.unsqueeze(-1))).squeeze(-1)[mask]
            entry.update(kl=float(kl.mean()), mean_abs_dlogp=float(d.abs().mean()), k3=float((d.exp() - 1 - d).mean()))
        entry["reward"] = _greedy_reward(model, tok, prompts, labels, max_new_tokens)
        results[fmt] = entry
    for fmt in FORMATS:
        results[fmt]["reward_drop"] = results["unquantized"]["reward"] - results[fmt]["reward"]
    return results


def compare_aqn(evals: Mapping[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float | None]]:
    """Per format, AQN on minus AQN off of ``reward_drop`` and ``kl`` (negative: AQN made the policy more robust)."""
    if set(evals) != {"aqn_on", "aqn_off"}:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for fmt in FORMATS:
        on, off = evals["aqn_on"][fmt], evals["aqn_off"][fmt]
        ratio = on["kl"] / off["kl"] if off["kl"] > 0 else None
        out[fmt] = {
            "reward_drop_on_minus_off": on["reward_drop"] - off["reward_drop"],
            "kl_on_over_off": None if ratio is None or math.isnan(ratio) else ratio,
        }
    return out
