"""GSM8K conversion, final-number extraction, reward, and the synthetic generator."""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import re
import sys
import types
from fractions import Fraction
from pathlib import Path

import pytest

from mindspeed_rl_r3.data import (
    GSM8KFormatError,
    convert_gsm8k,
    extract_final_number,
    gsm8k_reward,
    parse_number,
    read_gsm8k,
    synthetic_gsm8k,
    to_mindspeed_rl_record,
    write_synthetic_gsm8k,
)
from mindspeed_rl_r3.data.gsm8k import canonical_number

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def _real(split: str) -> Path:
    path = REAL / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"real GSM8K not present at {REAL}")
    return path


@pytest.mark.shared_data
@pytest.mark.parametrize(("split", "rows"), [("test", 1319), ("train", 7473)])
def test_convert_real_gsm8k(tmp_path, split, rows):
    src = _real(split)
    stats = convert_gsm8k(src, tmp_path / "out" / f"{split}.jsonl")
    assert stats["read"] == stats["written"] == rows and stats["skipped"] == 0
    assert stats["columns"] == ["problem", "answer"]
    originals = read_gsm8k(src)
    converted = [json.loads(line) for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
    assert len(converted) == len(originals) == rows
    for original, record in zip(originals, converted, strict=True):
        assert set(record) == {"problem", "answer"} and isinstance(record["answer"], str)
        assert record["problem"] == original["question"].strip()
        # the label is the bare number after ####, commas removed
        assert NUMBER.match(record["answer"]), record["answer"]
        assert record["answer"] == original["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        # the reference solution earns full reward against its own label; a wrong number earns none
        assert gsm8k_reward(original["answer"], record["answer"]) == 1.0
        assert gsm8k_reward(f"The answer is {Fraction(record['answer']) + 1}.", record["answer"]) == 0.0


@pytest.mark.shared_data
def test_real_gsm8k_has_thousands_commas():
    answers = [row["answer"].rsplit("####", 1)[1].strip() for row in read_gsm8k(_real("train"))]
    with_commas = [a for a in answers if "," in a]
    assert with_commas, "expected some GSM8K answers like 1,000"
    assert all(extract_final_number(f"#### {a}") == a.replace(",", "") for a in with_commas)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### 1,575,000", "1575000"),
        ("#### -12", "-12"),
        ("#### 0.5", "0.5"),
        ("#### $18.", "18"),
        ("#### $1,000.00", "1000"),
        ("She makes $18 every day.", "18"),
        ("The answer is 72.", "72"),
        ("It costs $0.50.", "0.5"),
        ("The temperature fell to -12 degrees", "-12"),
        ("pages 10-12", "12"),  # a hyphen after a digit is a range, not a sign
        ("5-3=2", "2"),
        ("x = -5", "-5"),
        ("-.5", "-0.5"),
        ("so 3, 4 and 5", "5"),
        ("Qwen3 has no answer", None),
        ("no number at all", None),
        ("", None),
        (r"So the total is \boxed{72}", "72"),
        (r"\boxed{\$1{,}000}", "1000"),
        (r"\boxed{18 \text{ dollars}}.", "18"),
        (r"\boxed{\frac{3}{4}}", "0.75"),
        (r"\boxed{\dfrac{1}{3}}", "1/3"),
        (r"\boxed{x = -7}", "-7"),
        (r"first \boxed{3}, then corrected: \boxed{4}", "4"),  # the last box wins
        (r"I think 5. \boxed{6} 7", "6"),  # a box beats a later stray number
        ("12 apples #### 7\nextra 9", "7"),  # #### beats everything
        ("<<48/2=24>>", None),  # calculator annotations are not answers
        (r"\boxed{unbalanced 5", "5"),  # truncated box: fall back to the last number
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_parse_and_canonical_numbers():
    assert parse_number("1,000") == 1000 and parse_number("-$5") == -5 and parse_number("3/4") == Fraction(3, 4)
    assert parse_number("1/0") is None and parse_number("abc") is None
    assert canonical_number(Fraction(-1, 2)) == "-0.5" and canonical_number(Fraction(1, 8)) == "0.125"
    assert canonical_number(Fraction(2, 3)) == "2/3" and canonical_number(Fraction(-40)) == "-40"


def test_gsm8k_reward():
    assert gsm8k_reward(r"... so \boxed{72}", "72") == 1.0
    assert gsm8k_reward("The answer is 72.0", "72") == 1.0
    assert gsm8k_reward("#### $1,000", "1000") == 1.0
    assert gsm8k_reward("#### 1000", "#### 1,000") == 1.0  # a GSM8K solution as label
    assert gsm8k_reward("it is 0.5", 0.5) == 1.0 and gsm8k_reward("it is 3", 3) == 1.0
    assert gsm8k_reward("-12", "12") == 0.0
    assert gsm8k_reward("71", "72") == 0.0
    assert gsm8k_reward("I do not know", "72") == 0.0
    assert gsm8k_reward("", "72") == 0.0
    for bad in ("no number", True, None):
        with pytest.raises(GSM8KFormatError, match="label"):
            gsm8k_reward("72", bad)


def test_to_mindspeed_rl_record():
    record = to_mindspeed_rl_record("  How many?  ", "work\n#### 1,234", instruction="Put the answer in \\boxed{}.")
    assert record == {"problem": "How many?\nPut the answer in \\boxed{}.", "answer": "1234"}
    with pytest.raises(GSM8KFormatError, match="no final number"):
        to_mindspeed_rl_record("q", "no answer here")


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_convert_errors_name_file_and_line(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"question": "q1", "answer": "#### 1"}, "{not json", ""])
    dst = tmp_path / "out.jsonl"
    with pytest.raises(GSM8KFormatError, match=r"in\.jsonl:2: invalid JSON"):
        convert_gsm8k(src, dst)
    assert not dst.exists() and not list(tmp_path.glob(".out.jsonl.tmp*"))  # nothing partial is left behind

    src = _write_jsonl(tmp_path / "keys.jsonl", [{"question": "q1", "answer": "#### 1"}, {"prompt_text": "x"}])
    with pytest.raises(GSM8KFormatError, match=r"keys\.jsonl:2: no question/answer fields.*prompt_text"):
        convert_gsm8k(src, dst)

    src = _write_jsonl(
        tmp_path / "nonum.jsonl", [{"question": "q1", "answer": "#### 1"}, {"question": "q", "answer": "?"}]
    )
    with pytest.raises(GSM8KFormatError, match=r"nonum\.jsonl:2: answer has no final number"):
        convert_gsm8k(src, dst)
    stats = convert_gsm8k(src, dst, on_error="skip")
    assert (stats["read"], stats["written"], stats["skipped"]) == (2, 1, 1)
    assert "nonum.jsonl:2" in stats["errors"][0]

    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        convert_gsm8k(tmp_path / "missing.jsonl", dst)
    with pytest.raises(GSM8KFormatError, match="is a directory"):
        convert_gsm8k(tmp_path, dst)
    with pytest.raises(GSM8KFormatError, match="is the source file"):
        convert_gsm8k(src, src)
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(GSM8KFormatError, match=r"unsupported file type '\.csv'"):
        convert_gsm8k(tmp_path / "data.csv", dst)
    with pytest.raises(ValueError, match="on_error"):
        convert_gsm8k(src, dst, on_error="ignore")


def test_convert_other_shapes_and_options(tmp_path):
    rows = [
        {"question": "gsm8k row", "answer": "x\n#### 5"},
        {"problem": "converted row", "answer": "6"},
        {"prompt": [{"role": "user", "content": "verl row"}], "reward_model": {"ground_truth": "7"}},
        {"prompt": [{"role": "user", "content": "p"}], "extra_info": {"question": "extra row", "answer": "#### 8"}},
    ]
    src = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    stats = convert_gsm8k(src, tmp_path / "deep" / "out.jsonl", instruction="Answer with a number.")
    out = [json.loads(line) for line in (tmp_path / "deep" / "out.jsonl").read_text().splitlines()]
    assert stats["written"] == 4
    assert [r["answer"] for r in out] == ["5", "6", "7", "8"]
    assert [r["problem"].split("\n")[0] for r in out] == ["gsm8k row", "converted row", "verl row", "extra row"]
    assert all(r["problem"].endswith("Answer with a number.") for r in out)
    assert convert_gsm8k(src, tmp_path / "two.jsonl", limit=2)["written"] == 2
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows[:2]))
    assert convert_gsm8k(array, tmp_path / "from_array.jsonl")["written"] == 2


def test_parquet(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    if importlib.util.find_spec("pyarrow") is None and importlib.util.find_spec("pandas") is None:
        path.write_bytes(b"PAR1")
        with pytest.raises(GSM8KFormatError, match="needs pyarrow or pandas"):
            convert_gsm8k(path, tmp_path / "out.jsonl")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(synthetic_gsm8k(5, seed=3)), path)
    stats = convert_gsm8k(path, tmp_path / "out.jsonl")
    assert stats["written"] == 5 and stats["format"] == "parquet"


def _parquet_bytes(tmp_path: Path) -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(synthetic_gsm8k(50, seed=1)), good)
    return good.read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda real: b"this is not parquet\x00\xff" * 40,
        lambda real: real[: len(real) // 2],  # a download cut short: no footer
        lambda real: real[:-12] + b"\x00" * 8 + real[-4:],  # footer length and contents zeroed
        lambda real: b"",
    ],
    ids=["garbage", "truncated", "bad-footer", "empty"],
)
def test_a_corrupt_parquet_file_is_one_error_naming_it(tmp_path, damage):
    path = tmp_path / "train.parquet"
    path.write_bytes(damage(_parquet_bytes(tmp_path)))
    for read in (read_gsm8k, lambda src: convert_gsm8k(src, tmp_path / "out.jsonl")):
        with pytest.raises(GSM8KFormatError) as err:
            read(path)
        message = str(err.value)
        assert str(path) in message and ("not a readable parquet file" in message or "is empty" in message)
        assert "\n" not in message
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture
def failing_parquet_reader(monkeypatch):
    """pyarrow stand-in whose reader fails the way a damaged file makes pyarrow fail, installed or not."""
    parquet = types.ModuleType("pyarrow.parquet")

    def read_table(path):
        raise OSError(
            "Couldn't deserialize thrift: TProtocolException: Invalid data\nDeserializing page header failed."
        )

    parquet.read_table = read_table
    package = types.ModuleType("pyarrow")
    package.parquet = parquet
    monkeypatch.setitem(sys.modules, "pyarrow", package)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)


def test_any_parquet_decoder_error_is_one_line_from_the_cli(tmp_path, capsys, failing_parquet_reader):
    from mindspeed_rl_r3.cli.main import main

    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 then nothing useful")
    for argv, command in (
        (["gsm8k", "convert", str(bad), str(tmp_path / "out.jsonl")], "gsm8k convert: "),
        (["demo", "--data", str(bad), "--out", str(tmp_path / "demo")], "demo: --data: "),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            f"{command}{bad} is not a readable parquet file (Couldn't deserialize thrift: TProtocolException: "
            "Invalid data)"
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.parquet"]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(expr: str) -> Fraction:
    """Evaluate + - * / over integers exactly (no eval)."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected expression {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def test_synthetic_answers_are_correct_by_construction():
    rows = synthetic_gsm8k(300, seed=7)
    assert len(rows) == 300 and len({r["question"] for r in rows}) > 250
    for row in rows:
        assert set(row) == {"question", "answer"}
        annotations = re.findall(r"<<([^=<>]+)=([^<>]+)>>", row["answer"])
        assert annotations, row["answer"]
        for expr, value in annotations:
            assert _arith(expr) == Fraction(value), (expr, value)
        final = row["answer"].rsplit("#### ", 1)[1]
        assert final == annotations[-1][1] and int(final) >= 0
        assert extract_final_number(row["answer"]) == final
        assert to_mindspeed_rl_record(row["question"], row["answer"])["answer"] == final
        assert gsm8k_reward(f"Thinking... \\boxed{{{final}}}", final) == 1.0


def test_synthetic_is_deterministic_and_round_trips(tmp_path):
    assert synthetic_gsm8k(20, seed=1) == synthetic_gsm8k(20, seed=1)
    assert synthetic_gsm8k(20, seed=1) != synthetic_gsm8k(20, seed=2)
    assert synthetic_gsm8k(0) == []
    with pytest.raises(ValueError, match="n must be"):
        synthetic_gsm8k(-1)
    stats = write_synthetic_gsm8k(tmp_path / "sub" / "synthetic.jsonl", 50, seed=4)
    src = Path(stats["dst"])
    assert stats["written"] == 50 and read_gsm8k(src) == synthetic_gsm8k(50, seed=4)
    assert convert_gsm8k(src, tmp_path / "converted.jsonl")["written"] == 50
