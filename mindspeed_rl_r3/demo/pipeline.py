"""``mindspeed-rl-r3 demo``: GRPO steps with a rollout actor and a trainer actor on a local Ray cluster.

Before the first step, the weights every arm starts from: a short supervised warm start on generated GSM8K-format
arithmetic (``demo.warm_start``, cached after the first run), so the model can earn reward. Each step: the trainer's
merged weights go to the rollout (the real vLLM engine, or transformers' ``generate`` with ``rollout="hf"``; AQN added
there), the rollout samples ``group_size`` answers per prompt with routing capture and returns payloads in the
TransferDock wire format, the driver scores them with the GSM8K reward, and the trainer computes old log-probs
(replaying the rollout routing with R3, observing it without), the train/rollout mismatch, and one GRPO update.

``compare`` runs R3 off and R3 on from the same weights, prompts (a fixed pool, cycled in the same order) and
sampling seeds, so they differ only by routing replay; then an R3-on arm with AQN toggled, and fake-quantizes every
trained policy to NVFP4 and INT4 (``demo.quant_eval``).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mindspeed_rl_r3 import strict_json
from mindspeed_rl_r3.data.gsm8k import extract_final_number, gsm8k_reward, read_gsm8k
from mindspeed_rl_r3.demo.problems import arithmetic_gsm8k
from mindspeed_rl_r3.demo.tokenizer import ByteTokenizer
from mindspeed_rl_r3.demo.warm_start import WarmStartSettings, warm_start_state
from mindspeed_rl_r3.demo.workers import DemoSettings, TrainerWorker, rollout_worker_class

SUMMARY_KEYS = (
    "k3_kl",
    "extreme_frac",
    "mean_abs",
    "max_abs",
    "routing_mismatch",
    "replay_agreement",
    "reward",
    "kl_ref",
    "kl_ref_native",
    "kl_ref_replayed",
)
# The extra arm of ``compare``, for the quantization evaluation: R3 on with AQN the other way round.
AQN_TOGGLED = {True: "r3_on_no_aqn", False: "r3_on_aqn"}


def load_problems(
    data: str | None, train: int, held_out: int, seed: int, warm: WarmStartSettings | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """A pool of ``train`` training problems and ``held_out`` others (no question in both): GSM8K rows from ``data``
    (jsonl / parquet, shuffled with ``seed``), or generated GSM8K-format arithmetic (the warm start's kind)."""
    if data:
        rows, source = read_gsm8k(data), str(data)
        random.Random(seed).shuffle(rows)
    else:
        max_operand = (warm or WarmStartSettings()).max_operand
        rows = arithmetic_gsm8k(20 * (train + held_out), seed=seed, max_operand=max_operand)
        source = "generated GSM8K-format arithmetic (demo.problems)"
    unique = list({row["question"]: row for row in rows}.values())
    if len(unique) < train + held_out:
        raise ValueError(f"{source} has {len(unique)} distinct questions; the demo needs {train} + {held_out}")
    return unique[:train], unique[train : train + held_out], source


def label(answer: str) -> str:
    """The reference final number of a GSM8K answer (``... #### 72`` -> ``"72"``)."""
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


def step_batch(pool: list[dict[str, str]], step: int, size: int) -> list[dict[str, str]]:
    """The problems of ``step``: the pool cycled in order, the same in every arm."""
    return [pool[(step * size + i) % len(pool)] for i in range(size)]


def run_once(
    settings: DemoSettings,
    r3: bool,
    pool: list[dict[str, str]],
    init: dict[str, Any],
    progress: Callable[[str], None] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """One training run from the weights ``init``; returns per-step metrics, their means, first- and last-step reward,
    and (under ``"final_weights"``, not JSON) the trained policy's merged weights."""
    ray = _start_ray(num_cpus=2)
    name = name or ("r3_on" if r3 else "r3_off")
    tok = ByteTokenizer(settings.model.vocab)
    started_run = time.perf_counter()
    rollout = ray.remote(num_cpus=1)(rollout_worker_class(settings)).remote(settings)
    trainer = ray.remote(num_cpus=1)(TrainerWorker).remote(settings, r3, init)
    steps = []
    try:
        engine = ray.get(rollout.engine.remote())
        for step in range(settings.steps):
            started = time.perf_counter()
            batch = step_batch(pool, step, settings.prompts_per_step)
            aqn = ray.get(rollout.sync.remote(trainer.rollout_weights.remote(), step))
            prompts = [tok.chat_prompt(p["question"]) for p in batch]
            out = ray.get(rollout.generate.remote(prompts, settings.seed * 1000 + step))
            labels = [label(p["answer"]) for p in batch for _ in range(settings.group_size)]
            rewards = [gsm8k_reward(tok.decode(r), y) for r, y in zip(out["responses"], labels, strict=True)]
            metrics = ray.get(trainer.step.remote(out, rewards, step))
            metrics.update(reward=sum(rewards) / len(rewards), seconds=round(time.perf_counter() - started, 2))
            metrics.update(aqn)
            steps.append(metrics)
            if progress is not None:
                progress(
                    f"{name} step {step + 1}/{settings.steps}: reward {metrics['reward']:.2f}, "
                    f"k3 {metrics['k3_kl']:.2e}, routing mismatch {metrics['routing_mismatch']:.3f}"
                )
        final = ray.get(trainer.rollout_weights.remote())
    finally:
        ray.kill(rollout)
        ray.kill(trainer)
    summary: dict[str, Any] = {"rollout_engine": engine, "r3": r3, "aqn": settings.aqn.enabled}
    summary.update({k: _mean([s.get(k, math.nan) for s in steps]) for k in SUMMARY_KEYS})
    summary["reward_first"], summary["reward_last"] = steps[0]["reward"], steps[-1]["reward"]
    layers = steps[0]["layer_agreement"].keys()
    summary["layer_agreement"] = {n: _mean([s["layer_agreement"][n] for s in steps]) for n in layers}
    summary["seconds"] = round(time.perf_counter() - started_run, 1)
    summary["steps"] = steps
    summary["final_weights"] = final
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _note(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)  # not ``progress``: that one counts steps


def run_demo(
    settings: DemoSettings,
    *,
    compare: bool = True,
    data: str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """R3 on (and, with ``compare``, R3 off first and an R3-on arm with AQN toggled) from the same weights, then the
    held-out and quantization evaluations; strict JSON and plots in ``out_dir``."""
    from mindspeed_rl_r3.demo.quant_eval import compare_aqn, evaluate_policy

    train = max(settings.train_prompts, settings.prompts_per_step)  # no problem twice in one step
    pool, held_out, source = load_problems(data, train, settings.eval_prompts, settings.seed, settings.warm_start)
    init, warm_info = warm_start_state(settings.model, settings.warm_start, settings.seed, settings.cache_dir, _note)
    runs: dict[str, dict[str, Any]] = {}
    if compare:
        runs["r3_off"] = run_once(settings, False, pool, init, progress)
    runs["r3_on"] = run_once(settings, True, pool, init, progress)
    if compare:
        toggled = replace(settings, aqn=replace(settings.aqn, enabled=not settings.aqn.enabled))
        extra = AQN_TOGGLED[settings.aqn.enabled]
        runs[extra] = run_once(toggled, True, pool, init, progress, name=extra)
    policies = {name: run.pop("final_weights") for name, run in runs.items()}

    result: dict[str, Any] = {
        "rollout_engine": runs["r3_on"]["rollout_engine"],
        "data": source,
        "settings": _jsonable(asdict(settings)),
        "warm_start": warm_info,
        **runs,
    }
    if compare:
        off, on = runs["r3_off"], runs["r3_on"]
        result["k3_ratio_on_over_off"] = on["k3_kl"] / off["k3_kl"] if off["k3_kl"] else None
    if held_out:
        started = time.perf_counter()
        labels = [label(p["answer"]) for p in held_out]
        kwargs = dict(max_new_tokens=settings.max_new_tokens, seed=settings.seed)
        evals = {n: evaluate_policy(state, settings.model, held_out, labels, **kwargs) for n, state in policies.items()}
        greedy = _greedy_evaluation(settings, init, policies, pool, held_out)
        for name, run in runs.items():
            run.update(greedy[name])
        by_aqn = {("aqn_on" if runs[n]["aqn"] else "aqn_off"): n for n in runs if runs[n]["r3"]}
        result["aqn_quant_eval"] = {
            "prompts": len(held_out),
            "policies": by_aqn,
            **{key: evals[name] for key, name in by_aqn.items()},
            "aqn_on_vs_off": compare_aqn({key: evals[name] for key, name in by_aqn.items()}),
            "all_arms": evals,
            "seconds": round(time.perf_counter() - started, 1),
        }
    result = strict_json.finite(result)
    if out_dir is not None:
        from mindspeed_rl_r3.demo.report import save_json, save_plots

        out = Path(out_dir)
        result["files"] = [str(save_json(result, out))]
        result["files"] += [str(p) for p in save_plots(result, out)]
    import ray

    ray.shutdown()
    return result


def _greedy_evaluation(
    settings: DemoSettings,
    init: dict[str, Any],
    policies: dict[str, dict[str, Any]],
    pool: list[dict[str, str]],
    held_out: list[dict[str, str]],
) -> dict[str, dict[str, float]]:
    """Per arm, the greedy (fp32, temperature 0) reward on the training pool and on the held-out problems, before the
    first step (the shared initial weights) and after the last: less noisy than a step's sampled reward."""
    from mindspeed_rl_r3.demo.quant_eval import greedy_reward

    def score(state: dict[str, Any], problems: list[dict[str, str]]) -> float:
        labels = [label(p["answer"]) for p in problems]
        return greedy_reward(state, settings.model, problems, labels, max_new_tokens=settings.max_new_tokens)

    before = {"train": score(init, pool), "held_out": score(init, held_out)}
    out = {}
    for name, state in policies.items():
        out[name] = {}
        for split, problems in (("train", pool), ("held_out", held_out)):
            out[name][f"greedy_{split}_before"] = before[split]
            out[name][f"greedy_{split}_after"] = score(state, problems)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)
