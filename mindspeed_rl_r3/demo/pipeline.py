"""``mindspeed-rl-r3 demo``: GRPO steps with a rollout actor and a trainer actor on a local Ray cluster.

Each step: the trainer's merged weights go to the rollout (the real vLLM engine, or transformers' ``generate`` with
``rollout="hf"``; AQN added there), the rollout samples ``group_size`` answers per prompt with routing capture and
returns payloads in the TransferDock wire format, the driver scores them with the GSM8K reward, and the trainer
computes old log-probs (replaying the rollout routing with R3, observing it without), the train/rollout mismatch, and
one GRPO update. ``compare`` runs R3 off and on from the same seed and weights.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mindspeed_rl_r3.data.gsm8k import extract_final_number, gsm8k_reward, read_gsm8k, synthetic_gsm8k
from mindspeed_rl_r3.demo.model import initial_hf_state
from mindspeed_rl_r3.demo.tokenizer import ByteTokenizer
from mindspeed_rl_r3.demo.workers import DemoSettings, TrainerWorker, rollout_worker_class

SUMMARY_KEYS = ("k3_kl", "extreme_frac", "mean_abs", "max_abs", "routing_mismatch", "replay_agreement", "reward")


def load_problems(data: str | None, count: int, seed: int) -> tuple[list[dict[str, str]], str]:
    """GSM8K rows from ``data`` (jsonl / parquet), or the built-in generator of GSM8K-format problems."""
    if data:
        rows = read_gsm8k(data)
        random.Random(seed).shuffle(rows)
        return rows[:count], str(data)
    return synthetic_gsm8k(count, seed=seed), "built-in synthetic GSM8K-format problems"


def _label(answer: str) -> str:
    return extract_final_number(answer.rsplit("####", 1)[-1]) or ""


def _start_ray(num_cpus: int) -> Any:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        # Always a fresh local instance: never a cluster already running on the machine or named by RAY_ADDRESS.
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    return ray


def run_once(
    settings: DemoSettings,
    r3: bool,
    problems: list[dict[str, str]],
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One training run; returns per-step metrics and their means."""
    ray = _start_ray(num_cpus=2)
    tok = ByteTokenizer(settings.model.vocab)
    init = initial_hf_state(settings.model, settings.seed)
    rollout = ray.remote(num_cpus=1)(rollout_worker_class(settings)).remote(settings)
    trainer = ray.remote(num_cpus=1)(TrainerWorker).remote(settings, r3, init)
    rng = random.Random(settings.seed)
    steps = []
    try:
        engine = ray.get(rollout.engine.remote())
        for step in range(settings.steps):
            started = time.perf_counter()
            batch = rng.sample(problems, settings.prompts_per_step)
            aqn = ray.get(rollout.sync.remote(trainer.rollout_weights.remote(), step))
            prompts = [tok.chat_prompt(p["question"]) for p in batch]
            out = ray.get(rollout.generate.remote(prompts, settings.seed * 1000 + step))
            labels = [_label(p["answer"]) for p in batch for _ in range(settings.group_size)]
            rewards = [gsm8k_reward(tok.decode(r), y) for r, y in zip(out["responses"], labels, strict=True)]
            metrics = ray.get(trainer.step.remote(out, rewards, step))
            metrics.update(reward=sum(rewards) / len(rewards), seconds=round(time.perf_counter() - started, 2))
            metrics.update({k: v for k, v in aqn.items()})
            steps.append(metrics)
            if progress is not None:
                progress(
                    f"{'R3 on ' if r3 else 'R3 off'} step {step + 1}/{settings.steps}: k3 {metrics['k3_kl']:.2e}, "
                    f"routing mismatch {metrics['routing_mismatch']:.3f}, reward {metrics['reward']:.2f}"
                )
    finally:
        ray.kill(rollout)
        ray.kill(trainer)
    summary: dict[str, Any] = {"rollout_engine": engine}
    summary.update({k: sum(s[k] for s in steps) / len(steps) for k in SUMMARY_KEYS})
    layers = steps[0]["layer_agreement"].keys()
    summary["layer_agreement"] = {n: sum(s["layer_agreement"][n] for s in steps) / len(steps) for n in layers}
    summary["steps"] = steps
    return summary


def run_demo(
    settings: DemoSettings,
    *,
    compare: bool = True,
    data: str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """R3 on (and, with ``compare``, R3 off first) from the same seed and weights; JSON and plots in ``out_dir``."""
    problems, source = load_problems(data, max(256, settings.prompts_per_step * settings.steps), settings.seed)
    runs = {}
    if compare:
        runs["r3_off"] = run_once(settings, False, problems, progress)
    runs["r3_on"] = run_once(settings, True, problems, progress)
    engine = runs["r3_on"]["rollout_engine"]
    result: dict[str, Any] = {"rollout_engine": engine, "data": source, "settings": _jsonable(asdict(settings)), **runs}
    if compare:
        off, on = runs["r3_off"], runs["r3_on"]
        result["k3_ratio_on_over_off"] = on["k3_kl"] / off["k3_kl"] if off["k3_kl"] else float("nan")
    if out_dir is not None:
        from mindspeed_rl_r3.demo.report import save_json, save_plots

        out = Path(out_dir)
        result["files"] = [str(save_json(result, out))]
        result["files"] += [str(p) for p in save_plots(runs, out)]
    import ray

    ray.shutdown()
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)
