"""Generated arithmetic problems in the GSM8K answer format, small enough for the demo's tiny model to learn.

``synthetic_gsm8k`` (``data/gsm8k.py``) writes multi-step word problems with three- and four-digit numbers: a
2-million-parameter byte-level model does not learn them in minutes on a CPU, so its reward would stay 0 and GRPO
would have nothing to amplify. These are one-step sums and differences of small numbers, written the way GSM8K writes
solutions (a calculator annotation ``<<a+b=c>>`` and a final ``#### c``), so the same reward (``gsm8k_reward``)
scores them and the real GSM8K file still plugs in with ``--data``.
"""

from __future__ import annotations

import random


def arithmetic_gsm8k(n: int, seed: int = 0, max_operand: int = 9) -> list[dict[str, str]]:
    """``n`` problems ``{"question", "answer"}``: ``a + b`` or ``a - b`` (never negative), operands in
    ``0..max_operand``, deterministic in ``seed``; the answer is ``"a + b = <<a+b=c>>c\\n#### c"``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if rng.random() < 0.5:
            op, value = "+", a + b
        else:
            a, b = max(a, b), min(a, b)
            op, value = "-", a - b
        answer = f"{a} {op} {b} = <<{a}{op}{b}={value}>>{value}\n#### {value}"
        rows.append({"question": f"What is {a} {op} {b}?", "answer": answer})
    return rows
