"""GSM8K reward benchmark: throughput on realistic outputs and worst-case time on 1 MB adversarial outputs.

Ours is :func:`mindspeed_rl_r3.data.gsm8k.gsm8k_reward`. The baseline, in the same run on the same outputs, is
math-verify alone with MindSpeed-RL's rule-reward semantics (``models/math_verify.py``: the label wrapped in
``\\boxed{}``, the output parsed with expression + LaTeX extraction, ``verify``), under its own signal timeouts.

Realistic outputs are GSM8K-style chains of thought (the question restated, then the worked steps) ending in
``\\boxed{}``, ``####``, a plain sentence, a fraction or an expression, half right and half wrong by construction; the
run fails its self-check if ours credits a wrong one. Adversarial outputs are 1 MB each: digit runs past Python's
int-conversion limit, unclosed braces and ``\\frac{``, repeated boxes, annotations, slashes, dots, spaces.
Times are best of N per output.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction

from mindspeed_rl_r3.data.gsm8k import canonical_number, gsm8k_reward, synthetic_gsm8k

MB = 1_000_000


@dataclass(frozen=True)
class RewardBenchConfig:
    outputs: int = 400  # realistic outputs
    repeats: int = 3
    baseline_adversarial: int = 6  # adversarial outputs also run through math-verify (each may take its timeout)
    baseline_timeout_s: int = 2
    seed: int = 0


def adversarial_outputs() -> dict[str, str]:
    """1 MB degenerate outputs, by name."""
    return {
        "digit_run": "1" * MB,
        "digit_run_commas": "1,234" * (MB // 5),
        "unclosed_boxed_braces": "\\boxed{" + "{" * MB,
        "closing_braces": "}" * MB,
        "unclosed_frac_spaces": "\\frac{" + " " * MB,
        "repeated_frac": "\\frac{1}{" * (MB // 9),
        "repeated_text": "\\text{" * (MB // 6),
        "repeated_boxed": "\\boxed{1" * (MB // 8),
        "annotations": "<<1>>" * (MB // 5),
        "unclosed_annotations": "<<" * (MB // 2),
        "slashes": "1/" * (MB // 2),
        "dots": "1." * (MB // 2),
        "hashes_digits": "#### " + "9" * MB,
        "spaces_then_answer": " " * MB + "72",
        "signs": "-" * MB,
        "carets": "2^" * (MB // 2),
        "wide_chars": "\U0001f600" * (MB // 4) + " 72",
    }


def realistic_outputs(n: int, seed: int) -> list[tuple[str, str, bool]]:
    """(output, label, is right) for n GSM8K-style responses in the endings models actually produce."""
    rng = random.Random(seed)
    rows = synthetic_gsm8k(n, seed)
    out = []
    for i, row in enumerate(rows):
        steps, label = row["answer"].rsplit("\n#### ", 1)
        right = i % 2 == 0
        value = Fraction(label) if right else Fraction(label) + rng.choice((1, -1, 10))
        reasoning = f"{row['question']}\nLet me think step by step.\n{steps}\n"
        kind = i % 6
        if kind == 0:
            text = f"{reasoning}So the answer is \\boxed{{{canonical_number(value)}}}."
        elif kind == 1:
            text = f"{reasoning}#### {value.numerator:,}" if value.denominator == 1 else f"{reasoning}#### {value}"
        elif kind == 2:
            text = f"{reasoning}The answer is {canonical_number(value)}."
        elif kind == 3:
            text = f"{reasoning}The answer is \\boxed{{\\frac{{{2 * value.numerator}}}{{{2 * value.denominator}}}}}"
        elif kind == 4:
            text = f"{reasoning}That is \\boxed{{{value - 4} + 4}} in total."
        else:
            text = f"{reasoning}In total: ${value.numerator * 4}/4$ = {value}"
        out.append((text, label, right))
    return out


def _math_verify_reward(timeout_s: int) -> Callable[[str, str], float]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    def reward(output: str, label: str) -> float:
        try:
            gold = parse(
                "\\boxed{" + label + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout_s
            )
            pred = parse(
                output,
                extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()],
                parsing_timeout=timeout_s,
            )
            return float(verify(gold, pred, timeout_seconds=timeout_s))
        except Exception:  # what MindSpeed-RL's compute_math_score does with any error: no reward
            return 0.0

    return reward


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_reward_bench(cfg: RewardBenchConfig | None = None, progress: Callable[[str], None] | None = None) -> dict:
    cfg = cfg or RewardBenchConfig()
    say = progress or (lambda _msg: None)
    baseline = _math_verify_reward(cfg.baseline_timeout_s)

    say("realistic outputs")
    outputs = realistic_outputs(cfg.outputs, cfg.seed)
    ours_s, ours = _timed(lambda: [gsm8k_reward(o, label) for o, label, _ in outputs], cfg.repeats)
    wrong_credited = sum(1 for got, (_, _, right) in zip(ours, outputs, strict=True) if got and not right)
    right_missed = sum(1 for got, (_, _, right) in zip(ours, outputs, strict=True) if not got and right)
    if wrong_credited:
        raise RuntimeError(f"benchmark self-check failed: {wrong_credited} wrong outputs were credited")
    base_s, base = _timed(lambda: [baseline(o, label) for o, label, _ in outputs], 1)
    agree = sum(a == b for a, b in zip(ours, base, strict=True)) / len(outputs)
    base_wrong = sum(1 for got, (_, _, right) in zip(base, outputs, strict=True) if got and not right)

    say("adversarial 1 MB outputs")
    adversarial = adversarial_outputs()
    per_case = {}
    for name, text in adversarial.items():
        seconds, reward = _timed(lambda text=text: gsm8k_reward(text, "72"), cfg.repeats)
        per_case[name] = round(seconds * 1e3, 3)
        if reward != (1.0 if name in ("spaces_then_answer", "wide_chars") else 0.0):
            raise RuntimeError(f"benchmark self-check failed: adversarial {name!r} scored {reward}")
    worst = max(per_case, key=per_case.get)
    base_cases = {}
    for name in list(adversarial)[: cfg.baseline_adversarial]:
        seconds, _ = _timed(lambda name=name: baseline(adversarial[name], "72"), 1)
        base_cases[name] = round(seconds * 1e3, 1)
    base_worst = max(base_cases.values()) if base_cases else float("nan")
    ours_on_base_cases = max(per_case[name] for name in base_cases) if base_cases else float("nan")
    return {
        "config": asdict(cfg),
        "realistic_outputs": len(outputs),
        "realistic_mean_chars": round(sum(len(o) for o, _, _ in outputs) / len(outputs)),
        "ours_us_per_output": round(ours_s / len(outputs) * 1e6, 1),
        "math_verify_us_per_output": round(base_s / len(outputs) * 1e6, 1),
        "realistic_speedup_vs_math_verify": round(base_s / ours_s, 1),
        "ours_outputs_per_s": round(len(outputs) / ours_s),
        "agreement_with_math_verify": round(agree, 4),
        "ours_wrong_credited": wrong_credited,
        "ours_right_missed": right_missed,
        "math_verify_wrong_credited": base_wrong,
        "worst_case_ms_1mb": per_case[worst],
        "worst_case_output": worst,
        "adversarial_ms": per_case,
        "math_verify_worst_ms_1mb": base_worst,
        "ours_worst_ms_on_those": ours_on_base_cases,
    }
