"""Every user mistake ends in one line on stderr and exit status 2, with nothing half-written (issue 15)."""

import json

import pytest

from mindspeed_rl_r3.aqn.config import AQNConfig, AQNError
from mindspeed_rl_r3.cli.main import main
from mindspeed_rl_r3.config import ConfigError, load_sections
from mindspeed_rl_r3.data.gsm8k import GSM8KFormatError, convert_gsm8k, read_gsm8k
from mindspeed_rl_r3.train import compose_config

CONFIG = "grpo_qwen3_30b_a3b_lora_r3_aqn"
GOOD_ROW = json.dumps({"question": "Two plus one?", "answer": "2 + 1 = 3\n#### 3"})


def one_line_error(capsys, argv, *fragments):
    """Run the CLI; it must exit 2 with exactly one line on stderr holding every fragment, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def files(folder):
    return sorted(p.name for p in folder.iterdir())


# -- plan / train: composing the config ----------------------------------------------------------------------------


def test_plan_malformed_yaml_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl_config:\n  n: [1,\n")
    line = one_line_error(capsys, ["plan", str(bad)], "plan: invalid YAML in", str(bad), "line 3")
    assert line.startswith("plan: ")


def test_plan_bad_override_syntax_names_the_override(capsys):
    one_line_error(capsys, ["plan", CONFIG, "rl_config.seed=1", "foo=["], "override 'foo=['", "hydra syntax")


def test_plan_override_of_missing_key_names_it(capsys):
    one_line_error(capsys, ["plan", CONFIG, "nonexist.x=5"], "plan: ", "nonexist.x", "+nonexist.x=5")


def test_plan_unresolved_interpolation(capsys):
    one_line_error(capsys, ["plan", CONFIG, "+foo=${nope}"], "plan: ", "nope")


def test_plan_non_mapping_r3_section(capsys):
    one_line_error(capsys, ["plan", CONFIG, "r3=5"], "plan: r3: expected a mapping, got int")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["foo=["], "override 'foo=['"),
        (["r3=5"], "r3: expected a mapping"),
        (["nonexist.x=5"], "nonexist.x"),
    ],
)
def test_train_compose_config_turns_hydra_errors_into_config_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")) as info:
        compose_config(CONFIG, overrides=overrides)
    assert "\n" not in str(info.value)


def test_train_malformed_yaml_is_one_line(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("a: {b: 1\n")
    one_line_error(
        capsys,
        ["train", "--config-name", "bad", "--config-path", str(tmp_path)],
        "mindspeed_rl_r3.train: invalid YAML in",
        "bad.yaml",
    )


def test_train_validation_gap_is_one_line(capsys):
    one_line_error(
        capsys, ["train", "--config-name", CONFIG, "r3.alarm_min_rows=-1"], "r3.alarm_min_rows must be an integer >= 0"
    )


# -- validation gaps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"aqn": {"targets": ["q_proj"]}}, "aqn.targets entry 'q_proj' names no norm"),
        ({"aqn": {"targets": ["*.weight"]}}, "names no norm"),
        ({"aqn": {"sigma_start": 1e-3, "sigma_end": 1e-2}}, r"aqn.sigma_start \(0.001\) must be >= aqn.sigma_end"),
        ({"r3": {"mode": "R3", "alarm_min_rows": -1}}, r"^r3\.alarm_min_rows must be an integer >= 0, got -1"),
        ({"r3": {"mode": "R3", "alarm_min_rows": 1.5}}, "r3.alarm_min_rows must be an integer"),
        ({"r3": 5}, "r3: expected a mapping"),
    ],
)
def test_validation_gaps(section, message):
    with pytest.raises(ConfigError, match=message):
        load_sections(section)


def test_still_accepted():
    assert AQNConfig(sigma_start=1e-3, sigma_end=1e-3).sigma_start == 1e-3  # a constant schedule is fine
    assert AQNConfig(targets=["*.layers.1.*layernorm.weight", "layer_norm_weight"]).targets
    assert load_sections({"r3": {"mode": "R3", "alarm_min_rows": 0}}).r3.replay.alarm_min_rows == 0
    with pytest.raises(AQNError, match="names no norm"):
        AQNConfig(targets="mlp.gate")


# -- gsm8k ---------------------------------------------------------------------------------------------------------


def test_gsm8k_non_utf8_input(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xff\xfe{"question": "q"}\n')
    one_line_error(capsys, ["gsm8k", "convert", str(src), str(tmp_path / "out.jsonl")], "in.jsonl:1: not UTF-8")
    assert files(tmp_path) == ["in.jsonl"]
    with pytest.raises(GSM8KFormatError, match="not UTF-8"):
        read_gsm8k(src)


def test_gsm8k_utf16_file_with_skip_invalid_converts_nothing_and_writes_nothing(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes((GOOD_ROW + "\n").encode("utf-16"))
    one_line_error(capsys, ["gsm8k", "convert", str(src), str(tmp_path / "out.jsonl"), "--skip-invalid"], "none of its")
    assert files(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_gsm8k_empty_input(capsys, tmp_path, content):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    one_line_error(capsys, ["gsm8k", "convert", str(src), str(tmp_path / "out.jsonl")], "in.jsonl")
    assert files(tmp_path) == ["in.jsonl"]
    with pytest.raises(GSM8KFormatError, match=r"empty|no rows"):
        read_gsm8k(src)


@pytest.mark.parametrize("action", ["convert", "synth"])
def test_gsm8k_destination_is_a_directory(capsys, tmp_path, action):
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD_ROW + "\n")
    (tmp_path / "out").mkdir()
    argv = ["gsm8k", "convert", str(src), str(tmp_path / "out")] if action == "convert" else ["gsm8k", "synth"]
    if action == "synth":
        argv.append(str(tmp_path / "out"))
    one_line_error(capsys, argv, f"gsm8k {action}: destination", "is a directory")
    assert files(tmp_path / "out") == []


def test_gsm8k_destination_under_a_file(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD_ROW + "\n")
    one_line_error(capsys, ["gsm8k", "convert", str(src), str(src / "out.jsonl")], "is a file, not a directory")


def test_gsm8k_skip_invalid_skips_invalid_json_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [GOOD_ROW.encode(), b"{bad", b'{"question": "x\tq"', b"\xff", GOOD_ROW.encode()]
    src.write_bytes(b"\n".join(lines))
    stats = convert_gsm8k(src, tmp_path / "out.jsonl", on_error="skip")
    assert (stats["read"], stats["written"], stats["skipped"]) == (5, 2, 3)
    assert stats["errors"][0].endswith(
        ":2: invalid JSON: Expecting property name enclosed in double quotes at column 2"
    )
    assert ":3: invalid JSON" in stats["errors"][1]
    assert ":4: not UTF-8" in stats["errors"][2]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_gsm8k_json_error_message_has_no_doubled_at(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(f'{GOOD_ROW}\n{{"question": "x')
    line = one_line_error(capsys, ["gsm8k", "convert", str(src), str(tmp_path / "out.jsonl")], "in.jsonl:2")
    assert "at at" not in line and "Unterminated string starting at column 14" in line
    assert files(tmp_path) == ["in.jsonl"]


# -- demo and bench: arguments checked before any work -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--prompts", "0"], "--prompts must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--group-size", "1"], "--group-size must be >= 2, got 1"),
    ],
)
def test_demo_bad_counts(capsys, tmp_path, args, fragment):
    one_line_error(capsys, ["demo", "--out", str(tmp_path / "out"), *args], f"demo: {fragment}")
    assert files(tmp_path) == []


def test_demo_existing_file_as_out_is_refused_before_the_run(capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("keep me")
    one_line_error(capsys, ["demo", "--out", str(out)], "demo: --out", "existing file")
    assert out.read_text() == "keep me"
    one_line_error(capsys, ["demo", "--out", str(out / "sub")], "is a file, not a folder")


def test_demo_data_with_fewer_rows_than_prompts(capsys, tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text(f"{GOOD_ROW}\n{GOOD_ROW}\n")
    one_line_error(
        capsys,
        ["demo", "--data", str(data), "--prompts", "3", "--out", str(tmp_path / "out")],
        "has 2 rows, fewer than --prompts 3",
    )
    one_line_error(capsys, ["demo", "--data", str(tmp_path / "missing.jsonl")], "demo: --data", "not found")
    assert files(tmp_path) == ["few.jsonl"]


@pytest.mark.parametrize("suite", ["routing", "aqn"])
def test_bench_repeats_zero(capsys, suite):
    one_line_error(capsys, ["bench", suite, "--repeats", "0"], f"bench {suite}: --repeats must be >= 1, got 0")
