"""A short supervised warm start so the demo's tiny Qwen3-MoE can earn reward, cached after the first run.

From the calibrated random init (``initial_hf_state``), a few hundred AdamW steps of teacher-forced cross-entropy on
the answers of generated problems (``demo.problems.arithmetic_gsm8k``), in fp32 through transformers. It stops while
the model is still unsure (a sampled answer is right roughly a third of the time), which is where GRPO has something
to amplify: groups with both right and wrong answers. The router and the norm feeding it (``frozen``) keep their
random values, so the routing R3 replays is the calibrated one; the experts train, so the model relies on them and a
routing flip changes its output (with frozen experts it learned to drown them out, and R3 stopped mattering).

The weights are written once per settings to ``<cache>/warm_start-<hash>.pt`` (``$MINDSPEED_RL_R3_CACHE/demo``, else
``$XDG_CACHE_HOME/mindspeed_rl_r3/demo``, else ``~/.cache/mindspeed_rl_r3/demo``) and loaded from there afterwards.
Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mindspeed_rl_r3.demo.model import DemoModelSettings, hf_model, initial_hf_state
from mindspeed_rl_r3.demo.problems import arithmetic_gsm8k
from mindspeed_rl_r3.demo.tokenizer import ByteTokenizer

# Bump when the procedure changes, so old cache files are not reused for a different recipe.
_RECIPE_VERSION = 1


@dataclass(frozen=True)
class WarmStartSettings:
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    max_operand: int = 9
    threads: int = 2
    frozen: tuple[str, ...] = ("mlp.gate.", "post_attention_layernorm.")
    final_answer_noise: float = 0.5


def default_cache_dir() -> Path:
    root = os.environ.get("MINDSPEED_RL_R3_CACHE")
    if root:
        return Path(root) / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "mindspeed_rl_r3" / "demo"


def cache_path(model: DemoModelSettings, warm: WarmStartSettings, seed: int, cache_dir: str | os.PathLike) -> Path:
    """Where the warm-started weights for these settings live; the name hashes everything that changes them."""
    key = {"model": asdict(model), "warm": {k: v for k, v in asdict(warm).items() if k != "threads"}, "seed": seed}
    key["recipe"] = _RECIPE_VERSION
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"warm_start-{digest}.pt"


def _noisy_final_answers(rows: list[dict[str, str]], fraction: float, rng: random.Random) -> list[dict[str, str]]:
    """A ``fraction`` of the rows get a wrong ``#### N`` (off by 1..3) after a correct worked line: the model learns
    the arithmetic but copies its result into the final answer only sometimes, a defect GRPO can fix in a few steps."""
    out = []
    for row in rows:
        if rng.random() < fraction:
            work, final = row["answer"].rsplit("#### ", 1)
            shift = rng.choice((1, 2, 3))
            wrong = int(final) - shift if int(final) >= shift and rng.random() < 0.5 else int(final) + shift
            row = {"question": row["question"], "answer": f"{work}#### {wrong}"}
        out.append(row)
    return out


def _sft_batch(rows: list[dict[str, str]], tok: ByteTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, S]`` ids of prompt + answer + end marker, and a mask of the answer positions."""
    seqs, starts = [], []
    for row in rows:
        prompt = tok.chat_prompt(row["question"])
        seqs.append(prompt + tok.encode(row["answer"]) + [tok.eos_id])
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
    target = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        target[i, start : len(seq)] = True
    return ids, target


def train_warm_start(
    model: DemoModelSettings,
    warm: WarmStartSettings,
    seed: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Supervised warm start from ``initial_hf_state(model, seed)``; returns fp32 weights in transformers naming."""
    threads = torch.get_num_threads()
    torch.set_num_threads(warm.threads)
    try:
        net = hf_model(model)
        net.load_state_dict(initial_hf_state(model, seed))
        net.train()
        tok = ByteTokenizer(model.vocab)
        for name, param in net.named_parameters():
            param.requires_grad_(not any(part in name for part in warm.frozen))
        trainable = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=warm.lr, weight_decay=0.0)
        rng_seed = seed * 7919 + 17  # a data stream of its own, apart from the RL prompts
        rows = arithmetic_gsm8k(warm.steps * warm.batch, seed=rng_seed, max_operand=warm.max_operand)
        rows = _noisy_final_answers(rows, warm.final_answer_noise, random.Random(rng_seed))
        started = time.perf_counter()
        for step in range(warm.steps):
            ids, target = _sft_batch(rows[step * warm.batch : (step + 1) * warm.batch], tok)
            logits = net(input_ids=ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            mask = target[:, 1:]
            loss = -(logp * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            if progress is not None and (step + 1) % 25 == 0:
                elapsed = time.perf_counter() - started
                progress(f"warm start {step + 1}/{warm.steps}: loss {float(loss.detach()):.3f} ({elapsed:.0f} s)")
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def warm_start_state(
    model: DemoModelSettings,
    warm: WarmStartSettings | None,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The demo's initial weights and where they came from: the calibrated random init when ``warm`` is None,
    else the warm start, loaded from the cache or trained and cached."""
    if warm is None:
        return initial_hf_state(model, seed), {"source": "random init"}
    path = cache_path(model, warm, seed, cache_dir or default_cache_dir())
    if path.is_file():
        return torch.load(path, weights_only=True), {"source": "cache", "path": str(path)}
    started = time.perf_counter()
    state = train_warm_start(model, warm, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a concurrent run sees either nothing or the whole file
    return state, {"source": "trained", "path": str(path), "seconds": round(time.perf_counter() - started, 1)}
