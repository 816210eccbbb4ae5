"""The GSM8K reward on hostile outputs: never raises, stays linear, never credits a wrong answer.

math-verify is the reference for equivalence: wherever ours credits an answer, math-verify (MindSpeed-RL's
rule-reward semantics) credits it too, except for the documented percent convention. No test asserts a time: the
worst case is a benchmark figure (``mindspeed-rl-r3 bench reward``); here a counter of characters the reward reads
per output bounds the work instead.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindspeed_rl_r3.bench.reward import adversarial_outputs, realistic_outputs
from mindspeed_rl_r3.data import GSM8KFormatError, extract_final_number, gsm8k_reward, parse_number
from mindspeed_rl_r3.data.gsm8k import canonical_number

HOSTILE_ALPHABET = st.sampled_from([*"0123456789{}\\/^_<>$#.,-+= %\n\t", "\\frac{", "\\boxed{", "####", "<<"])


def _math_verify(output: str, label: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = parse("\\boxed{" + label + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    pred = parse(output, extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()], parsing_timeout=None)
    return bool(verify(gold, pred, timeout_seconds=None))


@pytest.mark.parametrize("name", sorted(adversarial_outputs()))
def test_one_megabyte_degenerate_outputs_score_without_raising(name):
    text = adversarial_outputs()[name]
    expected = 1.0 if name in ("spaces_then_answer", "wide_chars") else 0.0
    assert gsm8k_reward(text, "72") == expected
    assert extract_final_number(text) in (None, "72", "1", "2")


@pytest.mark.parametrize("bad", [None, 12, 3.5, b"72", ["72"], object()])
def test_non_string_outputs_score_zero(bad):
    assert gsm8k_reward(bad, "72") == 0.0
    assert extract_final_number(bad) is None and parse_number(bad) is None


def test_digit_runs_past_the_int_conversion_limit():
    for text in ("9" * 5000, "#### " + "9" * 5000, "\\boxed{" + "9" * 5000 + "}", "1/" + "3" * 5000, "0." + "3" * 9000):
        assert gsm8k_reward(text, "9") == 0.0
    assert gsm8k_reward("#### " + "9" * 200, "9" * 200) == 1.0  # long but not degenerate: exact
    with pytest.raises(GSM8KFormatError):
        gsm8k_reward("72", float("nan"))
    assert gsm8k_reward("#### " + "1" + "0" * 5000, 10**5000) == 0.0  # a label beyond the number limit never matches


@pytest.mark.parametrize(
    ("text", "label", "reward"),
    [
        ("The answer is 3/4", "4", 0.0),  # a fraction is not its denominator
        ("The answer is 3/4", "0.75", 1.0),
        ("The answer is 3/4.", "3", 0.0),
        (r"the answer is \frac{3}{4}", "4", 0.0),
        (r"the answer is \frac{3}{4}", "0.75", 1.0),
        (r"\boxed{\frac{3}{4}}", "3/4", 1.0),
        (r"\boxed{\dfrac{6}{8}}", "0.75", 1.0),
        (r"\boxed{0.75}", "3/4", 1.0),
        ("#### 3/4", "0.75", 1.0),
        ("so it is 0.75", "3/4", 1.0),
        (r"\boxed{0.333333}", "1/3", 0.0),  # never rounded: math-verify would credit this
        (r"\boxed{12 \times 3}", "36", 1.0),  # expressions: math-verify reads them, the value is exact
        (r"\boxed{2^{10}}", "1024", 1.0),
        (r"\boxed{2^{10}}", "10", 0.0),
        ("2^10", "10", 0.0),  # an exponent is not a quantity
        (r"\boxed{3\frac{1}{2}}", "3.5", 1.0),
        (r"\boxed{\sqrt{2}}", "1.414214", 0.0),
        (r"\boxed{10^{10^{10}}}", "1", 0.0),  # refused before sympy sees it
        ("on 1/2/2024", "2024", 0.0),
        ("1e5", "5", 0.0),
        ("Qwen3", "3", 0.0),
        ("version 1.2.3", "3", 0.0),
        ("it is -5", "-5", 1.0),
        ("5-3", "-3", 0.0),
        (r"\boxed{18\%}", "18", 1.0),  # GSM8K labels percentages with the bare number
        (r"\boxed{x}", "1", 0.0),
        (r"\boxed{1/0}", "0", 0.0),
        ("<<2*3=6>>", "6", 0.0),
        (r"\boxed{5} \boxed{", "5", 1.0),  # a truncated last box falls back to the last number
    ],
)
def test_numeric_equivalence_and_never_crediting_a_wrong_answer(text, label, reward):
    assert gsm8k_reward(text, label) == reward


def test_agrees_with_math_verify_on_realistic_outputs():
    outputs = realistic_outputs(60, seed=3)
    for output, label, right in outputs:
        ours = gsm8k_reward(output, label)
        assert ours == float(right), output
        assert ours == float(_math_verify(output, label)), output


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(HOSTILE_ALPHABET, max_size=300).map("".join), st.integers(-50, 50))
def test_any_string_scores_without_raising_and_credits_only_the_label_value(text, label):
    reward = gsm8k_reward(text, str(label))
    assert reward in (0.0, 1.0)
    got = extract_final_number(text)
    assert got is None or Fraction(got) == Fraction(got)  # canonical and readable back
    if reward and "%" not in text:
        # a credit means the extracted final answer is exactly the label
        assert got is not None and Fraction(got) == label


@settings(max_examples=80, deadline=None)
@given(
    st.fractions(min_value=-(10**6), max_value=10**6, max_denominator=64),
    st.sampled_from(["\\boxed{{{}}}", "#### {}", "The answer is {}.", "so ${}$ total"]),
)
def test_every_form_of_a_value_scores_against_every_other(value, template):
    forms = [canonical_number(value), f"{value.numerator}/{value.denominator}"]
    if value.denominator != 1:
        forms.append(f"\\frac{{{value.numerator}}}{{{value.denominator}}}")
    for form in forms:
        text = template.format(form)
        if "\\frac" in form and value < 0 and "boxed" not in template:
            continue  # a bare negative \frac outside a box is not a plain number
        assert gsm8k_reward(text, canonical_number(value)) == 1.0, text
        assert gsm8k_reward(text, canonical_number(value + 1)) == 0.0, text


def test_reads_a_bounded_window_of_huge_outputs(monkeypatch):
    """Work per output is bounded: the number scanner visits at most a few hundred characters of a 1 MB digit run."""
    import mindspeed_rl_r3.data.gsm8k as gsm8k

    visited = []
    original = gsm8k._number_at

    def counting(text, last):
        result = original(text, last)
        visited.append(last - (result[0] if result else last - gsm8k._NUMBER_CHARS))
        return result

    monkeypatch.setattr(gsm8k, "_number_at", counting)
    assert gsm8k_reward("7" * 1_000_000, "7") == 0.0
    assert max(visited) <= gsm8k._NUMBER_CHARS + 1
