"""GSM8K: reading, conversion to MindSpeed-RL's preprocess input, final-answer extraction, reward, synthetic data.

MindSpeed-RL's ``cli/preprocess_data.py`` with ``R1AlpacaStyleInstructionHandler`` reads a jsonl whose columns are
named by the dataset yaml's ``map_keys`` (``configs/datasets/gsm8k_qwen3.yaml``: ``prompt <- problem``,
``response <- answer``). The prompt becomes the tokenized chat prompt; with ``dataset_additional_keys: [labels]``
the handler tokenizes the *response* text as ``labels``, which the rule verifier decodes and compares with the
model's answer. So the converted ``answer`` is the bare final number (``"72"``), not GSM8K's worked solution, and it
must be a string (the handler drops non-string responses).

Final-number conventions (GSM8K): the reference solution ends with ``#### 72``; numbers may carry thousands commas
(``1,000``), a sign (``-12``), decimals (``0.5``), a leading ``$`` and a sentence-ending period. Model outputs
without ``####`` are read from the last ``\\boxed{...}``, else the last number in the text. Numbers compare exactly
(as fractions), so ``72``, ``72.0`` and ``$72.00`` are the same answer.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

# Columns of the converted jsonl; configs/datasets/gsm8k_qwen3.yaml maps them with map_keys.
PROBLEM_KEY = "problem"
ANSWER_KEY = "answer"

# Every scan below is linear and bounded: the answer is found with C-speed rfind/find, and regexes only ever run on
# a bounded window (an answer span of at most _SPAN_CHARS, a number of at most _NUMBER_CHARS), with no nested
# quantifiers over one character class. A number longer than _NUMBER_CHARS is degenerate output: no answer.
_SPAN_CHARS = 512
_NUMBER_CHARS = 256
_MAX_SKIPPED_ANNOTATIONS = 4
_DIGITS = "0123456789"
_NUMBER_CHARS_SET = frozenset(_DIGITS + ",.")
_SIGNS = {"-": -1, "\u2212": -1, "+": 1}
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+")
_FIRST_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+\u2212])? ?\$? ?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
# A whole answer span that is one number: optional sign and $, the number, an optional /q, then % or unit words.
_PLAIN = re.compile(
    r" ?(?P<sign>[-+\u2212])? ?\$? ?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)"
    r"(?: ?/ ?(?P<den>\d+))? ?%?(?: [A-Za-z][A-Za-z ]*)?\.?"
)
_LATEX_FRAC = re.compile(r"\\[dt]?frac ?\{ ?(-?[\d.,]+) ?\} ?\{ ?([\d.,]+) ?\}|\\[dt]?frac(\d)(\d)")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s?\{([^{}]*)\}")
_FRAC_BEFORE = re.compile(r"\\[dt]?frac ?\{ ?(-?\d+) ?\} ?\{ ?$")  # run on at most 64 characters
_BRACES = re.compile(r"[{}]")
_WHITESPACE = re.compile(r"\s+")


class GSM8KFormatError(ValueError):
    """A GSM8K file or record that cannot be read or converted; the message names the file, line and field."""


def _fraction(num: str, sign: str | None = None, den: str | None = None) -> Fraction | None:
    """Exact value of a bounded number string (``1,000``, ``0.5``, ``72.``), or None (e.g. a zero denominator)."""
    value = Fraction(num.replace(",", "").rstrip(".") or "0")
    if den is not None:
        if int(den) == 0:
            return None
        value /= int(den)
    return -value if sign in ("-", "\u2212") else value


def parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact fraction, or None; never raises, reads at most 512 characters.

    Accepts ``1,000``, ``-12``, ``+3``, ``0.5``, ``.5``, ``$18``, ``-$5``, ``72.`` and a simple fraction ``3/4``
    standing alone (LaTeX ``\\frac{3}{4}`` too).
    """
    if not isinstance(text, str):
        return None
    span = _clean_latex(text[:_SPAN_CHARS])
    if _PLAIN.fullmatch(_WHITESPACE.sub(" ", span).strip()):
        return _plain_value(span)  # None for 1/0
    match = _FIRST_NUMBER.search(span)
    if match is None or len(match["num"]) > _NUMBER_CHARS:
        return None
    return _fraction(match["num"], match["sign"])


def _clean_latex(span: str) -> str:
    """Bounded LaTeX clean-up of an answer span: text macros unwrapped, fractions as ``p/q``, spacing dropped."""
    for old, new in (
        ("{,}", ","),
        ("\\!", ""),
        ("\\$", "$"),
        ("\\%", "%"),
        ("\\,", ""),
        ("\\;", " "),
        ("\\ ", " "),
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
    ):
        span = span.replace(old, new)
    span = _WHITESPACE.sub(" ", span)
    span = _LATEX_TEXT.sub(r" \1 ", span)
    return _LATEX_FRAC.sub(lambda m: f" {m[1] or m[3]}/{m[2] or m[4]} ", span)


def _plain_value(span: str) -> Fraction | None:
    """The value of a span that is exactly one number (``$1,000``, ``-3/4``, ``18%``, ``72 apples``), else None."""
    span = _WHITESPACE.sub(" ", span).strip()
    match = _PLAIN.fullmatch(span)
    if match is None or len(match["num"]) > _NUMBER_CHARS or len(match["den"] or "") > _NUMBER_CHARS:
        return None
    return _fraction(match["num"], match["sign"], match["den"])


def _math_verify_value(span: str) -> Fraction | None:
    """An answer span that is an expression (``12 \\times 3``, ``2^{10}``, ``3\\frac{1}{2}``), read by math-verify.

    math-verify parses the LaTeX; the value counts only when it is an exact rational (GSM8K answers are), so its
    float rounding never credits an approximate answer. Spans that could make sympy explode (long, power towers,
    factorials, big exponents) are refused up front, which bounds the time without math-verify's signal-based timeout
    (that only works in a process's main thread).
    """
    if len(span) > 128 or span.count("^") > 1 or "!" in span or "\\infty" in span:
        return None
    caret = span.find("^")
    if caret >= 0 and sum(c.isdigit() for c in span[caret : caret + 8]) > 3:
        return None
    if any(len(run) > 40 for run in re.split(r"\D", span)):
        return None
    try:
        import sympy
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

        parsed = parse(
            "\\boxed{" + span + "}",
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=None,
        )
        value = next((v for v in parsed if isinstance(v, sympy.Basic)), None)
        if value is not None and not value.is_Rational:
            value = value.doit()  # math-verify keeps 12*3 unevaluated; the guards above bound this evaluation
        if value is None or not value.is_Rational:
            return None
        return Fraction(int(value.p), int(value.q))
    except Exception:  # a third-party parser on hostile text: whatever it raises, the span has no value
        return None


def _span_value(span: str) -> Fraction | None:
    """The value of an answer span (a box's content or the line after ``####``), bounded to 512 characters."""
    span = span[:_SPAN_CHARS]
    cleaned = _clean_latex(span)
    value = _plain_value(cleaned.rsplit("=", 1)[-1])
    if value is not None or not any(c.isdigit() for c in cleaned):
        return value
    return _math_verify_value(span.rsplit("=", 1)[-1].strip().rstrip("."))


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``); None if there is none, or it is unbalanced or
    longer than 512 characters (a truncated or degenerate response)."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start, start + 12)
    if brace < 0:
        return None
    depth = 0
    for match in _BRACES.finditer(text, brace, brace + _SPAN_CHARS + 2):
        depth += 1 if match[0] == "{" else -1
        if depth == 0:
            return text[brace + 1 : match.start()]
    return None


def _last_digit(text: str, end: int) -> int:
    return max(text.rfind(d, 0, end) for d in _DIGITS)


def _number_at(text: str, last: int) -> tuple[int, Fraction | None] | None:
    """The number whose last digit is at ``last``: (start index, value or None when it is not a plain number).

    None when it is longer than 256 characters. Reads only a bounded window before ``last``.
    """
    start = last
    while start > 0 and text[start - 1] in _NUMBER_CHARS_SET:
        start -= 1
        if last - start > _NUMBER_CHARS:
            return None
    token = text[start : last + 1].lstrip(",")
    start = last + 1 - len(token)
    if token.count(".") > 1 or (token.startswith(".") and start > 0 and text[start - 1].isalnum()):
        return start, None  # a version, an IP address, a dotted word: not an answer
    if not _NUMBER.fullmatch(token):
        token = token.rsplit(",", 1)[-1]  # "3,4,5" is a list: its last number
        start = last + 1 - len(token)
    return start, _fraction(token)


def _last_number(text: str) -> Fraction | None:
    """The last number in ``text`` with its sign and ``$``, a trailing ``p/q`` or ``\\frac{p}{q}`` read as a fraction.

    Numbers inside GSM8K calculator annotations ``<<48/2=24>>`` are skipped; an exponent, a date-like ``1/2/3`` or a
    degenerate number gives None. Linear: a few C-speed reverse searches, then bounded windows.
    """
    end = len(text)
    for _ in range(_MAX_SKIPPED_ANNOTATIONS + 1):
        last = _last_digit(text, end)
        if last < 0:
            return None
        opened, closed = text.rfind("<<", 0, last), text.rfind(">>", 0, last)
        if opened > closed and text.find(">>", last, last + _SPAN_CHARS) > 0:
            end = opened  # inside an annotation: look before it
            continue
        break
    else:
        return None
    found = _number_at(text, last)
    if found is None or found[1] is None:
        return None
    start, value = found
    if start > 0 and (text[start - 1].isalpha() or text[start - 1] == "_"):
        return None  # glued to a word: "Qwen3", "x2"
    after = text[last + 1 : last + 3]
    before = text[max(0, start - 64) : start]
    if after.startswith("^") or before.endswith(("^", "^{", "_", "_{")):
        return None  # an exponent or an index, not a quantity
    frac = _FRAC_BEFORE.search(before)
    if frac is not None and after.lstrip(" ").startswith("}"):
        return None if value == 0 else Fraction(int(frac[1])) / value
    stripped = before.rstrip(" ")
    if stripped.endswith("/"):  # p/q: read the numerator
        slash = len(before) - len(stripped) + 1
        numerator_end = start - slash
        head = text[max(0, numerator_end - 2) : numerator_end].rstrip(" ")
        if not head or not head[-1].isdigit():
            return None
        inner = _number_at(text, max(0, numerator_end - 2) + len(head) - 1)
        if inner is None or inner[1] is None or value == 0:
            return None
        if text[max(0, inner[0] - 1) : inner[0]] == "/":
            return None  # 1/2/2024: a date
        start, value = inner[0], inner[1] / value
    prefix = text[max(0, start - 4) : start].rstrip(" ").rstrip("$").rstrip(" ")
    sign = prefix[-1:] if prefix[-1:] in _SIGNS else ""
    glued = prefix[-2:-1]
    if sign and glued and (glued.isalnum() or glued in ".)"):
        sign = ""  # 5-3 or x-3: a binary minus, not a sign
    return -value if _SIGNS.get(sign, 1) < 0 else value


def canonical_number(value: Fraction) -> str:
    """``72``, ``-12``, ``0.5``; a fraction without a finite decimal form stays ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    q, twos, fives = value.denominator, 0, 0
    while q % 2 == 0:
        q, twos = q // 2, twos + 1
    while q % 5 == 0:
        q, fives = q // 5, fives + 1
    if q != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = max(twos, fives)
    scaled = abs(value.numerator) * 10**digits // value.denominator
    sign = "-" if value < 0 else ""
    whole, frac = divmod(scaled, 10**digits)
    return f"{sign}{whole}.{str(frac).rjust(digits, '0').rstrip('0')}"


def _final_value(text: str) -> Fraction | None:
    """The final answer's exact value; None for no answer. Linear time on any input, never raises."""
    if not isinstance(text, str):
        return None
    try:
        hashes = text.rfind("####")
        if hashes >= 0:
            line = text[hashes + 4 : hashes + 4 + _SPAN_CHARS].split("\n", 1)[0].strip()
            if line:
                value = _span_value(line)
                if value is not None:
                    return value
        boxed = _last_boxed(text)
        if boxed is not None:
            return _span_value(boxed)
        return _last_number(text)
    except (ValueError, ArithmeticError, RecursionError):  # e.g. a pathological exponent: no answer, never a crash
        return None


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution or a model response, canonical (``"1000"``, ``"-0.5"``).

    Order: the number after the last ``####``; else the content of the last ``\\boxed{...}`` (one number, ``p/q``,
    ``\\frac{p}{q}``, or an expression math-verify reads as an exact rational); else the last number in the text
    (calculator annotations ``<<...>>`` ignored, a trailing ``3/4`` read as a fraction). None when the text holds no
    readable answer, including for non-strings. Linear time, never raises.
    """
    value = _final_value(text)
    return None if value is None else canonical_number(value)


def _label_value(label: Any) -> Fraction:
    if isinstance(label, bool):
        raise GSM8KFormatError(f"label {label!r} is not a number")
    if isinstance(label, int):
        return Fraction(label)
    if isinstance(label, float):
        if label != label or label in (float("inf"), float("-inf")):
            raise GSM8KFormatError(f"label {label!r} is not a finite number")
        return Fraction(str(label))
    if isinstance(label, str):
        value = _final_value(label)
        if value is not None:
            return value
    shown = repr(label) if not isinstance(label, str) or len(label) < 80 else repr(label[:80]) + "..."
    raise GSM8KFormatError(f"label {shown} holds no number (expected e.g. '72' or a GSM8K answer ending '#### 72')")


def gsm8k_reward(response_text: str | None, label: str | int | float) -> float:
    """1.0 when the response's final answer equals the label exactly (as rationals), else 0.0.

    Never raises on the response and runs in linear time on any string (a 1 MB degenerate output takes
    milliseconds): ``None``, non-strings, unbalanced LaTeX, digit runs past Python's int-conversion limit all score
    0.0. Equivalence: ``72``, ``72.0``, ``$72.00``, ``3/4``, ``0.75`` and ``\\frac{3}{4}`` compare as exact
    rationals (never rounded, so ``0.333333`` is not ``1/3``); expression answers are read with math-verify. ``18%``
    counts as ``18`` (GSM8K's percentage questions are labelled with the bare number).

    ``label`` is the converted answer (``"72"``), a GSM8K solution ending ``#### 72``, or a number; a label without
    a number raises :class:`GSM8KFormatError` (bad data, not a wrong answer).
    """
    expected = _label_value(label)
    got = _final_value(response_text)
    return 1.0 if got is not None and got == expected else 0.0


def to_mindspeed_rl_record(question: str, answer: str, *, instruction: str | None = None) -> dict[str, str]:
    """One row of MindSpeed-RL's preprocess input: ``{"problem": question, "answer": "<final number>"}``.

    ``instruction`` is appended to the question on its own line (the shipped dataset yaml instead uses the
    ``qwen_math_r1`` prompt template, whose system prompt asks for ``\\boxed{}``). Raises
    :class:`GSM8KFormatError` when the answer has no final number.
    """
    final = extract_final_number(answer)
    if final is None:
        raise GSM8KFormatError(f"answer has no final number: {answer[-80:]!r}")
    problem = question.strip()
    if instruction:
        problem = f"{problem}\n{instruction.strip()}"
    return {PROBLEM_KEY: problem, ANSWER_KEY: final}


def _record_fields(record: Any, where: str) -> tuple[str, str]:
    """(question, answer text) from a GSM8K row, an already converted row, or a verl-style parquet row."""
    if isinstance(record, GSM8KFormatError):  # a line that did not decode (see _raw_rows)
        raise record
    if not isinstance(record, dict):
        raise GSM8KFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    extra = record.get("extra_info") if isinstance(record.get("extra_info"), dict) else {}
    for q_key, a_key, source in (
        ("question", "answer", record),
        (PROBLEM_KEY, ANSWER_KEY, record),
        ("question", "answer", extra),
    ):
        question, answer = source.get(q_key), source.get(a_key)
        if isinstance(question, str) and isinstance(answer, str | int | float) and not isinstance(answer, bool):
            return question, str(answer)
    prompt, reward = record.get("prompt"), record.get("reward_model")
    if isinstance(prompt, list) and isinstance(reward, dict) and "ground_truth" in reward:
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1], str(reward["ground_truth"])
    raise GSM8KFormatError(
        f"{where}: no question/answer fields (expected 'question' and 'answer', 'problem' and 'answer', "
        f"or verl-style 'prompt' + 'reward_model.ground_truth'); keys: {sorted(record)}"
    )


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        import pandas as pd  # an ImportError here means neither reader is installed

        return pd.read_parquet(path).to_dict(orient="records")
    return pq.read_table(path).to_pylist()


def _parquet_rows(path: Path) -> list[dict]:
    """Every row of a parquet file; a file the reader cannot decode is one :class:`GSM8KFormatError` naming it."""
    try:
        return _read_parquet(path)
    except ImportError:
        raise GSM8KFormatError(
            f"{path}: reading parquet needs pyarrow or pandas and neither is importable; "
            "install one (pip install pyarrow) or pass the GSM8K jsonl instead"
        ) from None
    except PermissionError:
        raise
    except Exception as err:  # a decoder on damaged bytes raises its own types (ArrowInvalid, OSError, thrift, ...)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise GSM8KFormatError(f"{path} is not a readable parquet file ({reason})") from None


def _json_error(where: str, err: json.JSONDecodeError) -> GSM8KFormatError:
    # Some of json's messages end in "at" ("Unterminated string starting at"): do not say "at at".
    return GSM8KFormatError(f"{where}: invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}")


def _raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, decoded row) pairs; location is ``file:line`` for jsonl and ``file:row`` otherwise.

    A jsonl line that is not UTF-8 or not JSON comes as ``(location, GSM8KFormatError)`` rather than ending the
    iteration, so a caller can skip it (:func:`_record_fields` raises it).
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        for i, row in enumerate(_parquet_rows(path)):
            yield f"{path}:row {i}", row
        return
    if suffix not in (".jsonl", ".json"):
        raise GSM8KFormatError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)")
    with path.open("rb") as handle:
        first = handle.read(1)
        handle.seek(0)
        if suffix == ".json" and first == b"[":  # a JSON array rather than one object per line
            try:
                rows = json.loads(handle.read().decode("utf-8"))
            except UnicodeDecodeError as err:
                raise GSM8KFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
            except json.JSONDecodeError as err:
                raise _json_error(f"{path}:{err.lineno}", err) from None
            for i, row in enumerate(rows):
                yield f"{path}:item {i}", row
            return
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield where, GSM8KFormatError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, _json_error(where, err)
                continue
            yield where, row


def read_gsm8k(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows ``{"question", "answer"}`` (answer as in the file) from GSM8K jsonl / json / parquet.

    Raises :class:`GSM8KFormatError` naming ``file:line`` for malformed rows, FileNotFoundError when missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}")
    if path.stat().st_size == 0:
        raise GSM8KFormatError(f"{path} is empty; expected GSM8K rows")
    rows = []
    for where, row in _raw_rows(path):
        question, answer = _record_fields(row, where)
        rows.append({"question": question, "answer": answer})
    if not rows:
        raise GSM8KFormatError(f"{path} holds no rows; expected GSM8K rows")
    return rows


def _check_destination(dst: Path) -> None:
    """Refuse a destination that cannot become a file, before any work is done."""
    if dst.is_dir():
        raise GSM8KFormatError(f"destination {dst} is a directory; pass a file path, e.g. {dst / 'gsm8k.jsonl'}")
    for parent in dst.parents:
        if parent.exists():
            if not parent.is_dir():
                raise GSM8KFormatError(f"destination {dst}: {parent} is a file, not a directory")
            break


def convert_gsm8k(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    instruction: str | None = None,
    limit: int | None = None,
    on_error: str = "raise",
) -> dict[str, Any]:
    """Convert GSM8K (jsonl / json / parquet) to MindSpeed-RL's preprocess input jsonl at ``dst``.

    Each output line is ``{"problem": ..., "answer": "<final number>"}``. ``on_error="raise"`` (default) stops at
    the first bad row with its ``file:line``; ``"skip"`` drops it and reports it in the stats. The output is written
    to a temporary file and renamed, so a failed conversion leaves no partial file.

    Undecodable lines (not UTF-8, not JSON) are bad rows like any other. An input with no rows, or none that
    converts, is an error, as is a destination that is a directory: both are checked before anything is written.

    Returns ``{"src", "dst", "format", "read", "written", "skipped", "errors", "columns"}``; ``errors`` holds at
    most the first 10 skipped rows' reasons.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise GSM8KFormatError(f"limit must be an integer >= 1, got {limit!r}")
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        found = sorted(p.name for p in src.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".parquet"))
        raise GSM8KFormatError(f"{src} is a directory; pass one file, e.g. one of {found}")
    if not src.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {src}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise GSM8KFormatError(f"destination {dst} is the source file; choose another path")
    _check_destination(dst)
    if src.stat().st_size == 0:
        raise GSM8KFormatError(f"{src} is empty; expected GSM8K rows")
    stats: dict[str, Any] = {
        "src": str(src),
        "dst": str(dst),
        "format": src.suffix.lower().lstrip("."),
        "read": 0,
        "written": 0,
        "skipped": 0,
        "errors": [],
        "columns": [PROBLEM_KEY, ANSWER_KEY],
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for where, row in _raw_rows(src):
                if limit is not None and stats["written"] >= limit:
                    break
                stats["read"] += 1
                try:
                    question, answer = _record_fields(row, where)
                    record = to_mindspeed_rl_record(question, answer, instruction=instruction)
                except GSM8KFormatError as err:
                    message = str(err) if str(err).startswith(where) else f"{where}: {err}"
                    if on_error == "raise":
                        raise GSM8KFormatError(message) from None
                    stats["skipped"] += 1
                    if len(stats["errors"]) < 10:
                        stats["errors"].append(message)
                    continue
                # ASCII escapes: U+2028 and friends in GSM8K text would split lines for splitlines()-based readers
                out.write(json.dumps(record, ensure_ascii=True) + "\n")
                stats["written"] += 1
        if not stats["written"]:
            first = f"; first: {stats['errors'][0]}" if stats["errors"] else ""
            raise GSM8KFormatError(f"{src}: none of its {stats['read']} rows converted{first}")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Synthetic GSM8K-format problems: integer arithmetic, answers correct by construction, GSM8K's solution style
# (calculator annotations <<expr=value>> and a final "#### N"), so the CPU demo runs without the real files.

_NAMES = ("Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Randy", "Maya", "Omar")
_ITEMS = ("apples", "stickers", "marbles", "pencils", "cookies", "stamps", "seashells", "books")
_THINGS = (("notebook", "notebooks"), ("toy car", "toy cars"), ("ticket", "tickets"), ("plant", "plants"))


def _step(expr: str, value: int) -> str:
    return f"{expr} = <<{expr.replace(' ', '')}={value}>>{value}"


def _problem_packs(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    have, packs, per = rng.randint(2, 60), rng.randint(2, 9), rng.randint(3, 24)
    bought = packs * per
    total = have + bought
    question = (
        f"{name} has {have} {item}. {name} buys {packs} packs of {item} with {per} {item} in each pack. "
        f"How many {item} does {name} have now?"
    )
    steps = [
        f"{name} buys {_step(f'{packs} * {per}', bought)} {item}.",
        f"Now {name} has {_step(f'{have} + {bought}', total)} {item}.",
    ]
    return question, steps, total


def _problem_wage(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(_NAMES)
    rate, hours, days = rng.randint(8, 45), rng.randint(2, 10), rng.randint(2, 7)
    daily = rate * hours
    total = daily * days
    question = (
        f"{name} earns ${rate} an hour. {name} works {hours} hours a day for {days} days. "
        f"How much money does {name} earn in total?"
    )
    steps = [
        f"In one day {name} earns ${_step(f'{rate} * {hours}', daily)}.",
        f"In {days} days {name} earns ${_step(f'{daily} * {days}', total)}.",
    ]
    return question, steps, total


def _problem_change(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(_NAMES)
    single, plural = rng.choice(_THINGS)
    count, price, left_over = rng.randint(2, 12), rng.randint(2, 30), rng.randint(0, 80)
    cost = count * price
    money = cost + left_over
    question = (
        f"{name} has ${money}. {name} buys {count} {plural} that cost ${price} per {single}. "
        f"How many dollars does {name} have left?"
    )
    steps = [
        f"The {plural} cost ${_step(f'{count} * {price}', cost)}.",
        f"{name} has ${_step(f'{money} - {cost}', left_over)} left.",
    ]
    return question, steps, left_over


def _problem_share(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(4, 20)
    used = rng.randint(1, each - 1)
    total = friends * each
    left = each - used
    question = (
        f"{name} shares {total} {item} equally among {friends} friends. Each friend then gives away {used} of them. "
        f"How many {item} does each friend have left?"
    )
    steps = [
        f"Each friend gets {_step(f'{total} / {friends}', each)} {item}.",
        f"Each friend has {_step(f'{each} - {used}', left)} {item} left.",
    ]
    return question, steps, left


def _problem_trip(rng: random.Random) -> tuple[str, list[str], int]:
    v1, h1, v2, h2 = rng.randint(30, 90), rng.randint(1, 5), rng.randint(20, 80), rng.randint(1, 4)
    d1, d2 = v1 * h1, v2 * h2
    total = d1 + d2
    question = (
        f"A train travels at {v1} km per hour for {h1} hours and then at {v2} km per hour for {h2} hours. "
        "How many kilometers does it travel in total?"
    )
    steps = [
        f"First it travels {_step(f'{v1} * {h1}', d1)} km.",
        f"Then it travels {_step(f'{v2} * {h2}', d2)} km.",
        f"In total it travels {_step(f'{d1} + {d2}', total)} km.",
    ]
    return question, steps, total


def _problem_half(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    half, extra = rng.randint(3, 2000), rng.randint(1, 50)  # up to 4,000: exercises thousands commas
    have = 2 * half
    total = half + extra
    question = (
        f"{name} had {have:,} {item} and gave half of them to a friend. Later {name} found {extra} more. "
        f"How many {item} does {name} have now?"
    )
    steps = [
        f"{name} kept {_step(f'{have} / 2', half)} {item}.",
        f"Now {name} has {_step(f'{half} + {extra}', total)} {item}.",
    ]
    return question, steps, total


_GENERATORS = (_problem_packs, _problem_wage, _problem_change, _problem_share, _problem_trip, _problem_half)


def synthetic_gsm8k(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` GSM8K-format word problems ``{"question", "answer"}``, deterministic in ``seed``.

    Every answer is a worked solution with GSM8K calculator annotations (``<<6*4=24>>``) ending ``#### N``; all
    intermediate values are non-negative integers computed while generating, so the answers are correct by
    construction.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, steps, final = rng.choice(_GENERATORS)(rng)
        rows.append({"question": question, "answer": "\n".join([*steps, f"#### {final}"])})
    return rows


def write_synthetic_gsm8k(dst: str | os.PathLike, n: int, seed: int = 0) -> dict[str, Any]:
    """Write :func:`synthetic_gsm8k` rows to ``dst`` as GSM8K-format jsonl (``question``, ``answer``).

    The file reads back with :func:`read_gsm8k` and converts with :func:`convert_gsm8k` like the real GSM8K.
    Returns ``{"dst", "written", "seed"}``.
    """
    dst = Path(dst)
    _check_destination(dst)
    rows = synthetic_gsm8k(n, seed)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"dst": str(dst), "written": len(rows), "seed": seed}
