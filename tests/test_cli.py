import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_rl_r3.cli.main import TARGETS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# What --help must not load: torch/numpy take seconds to import, the upstream frameworks may not be installed at all.
HEAVY = ("torch", "numpy", "mindspeed", "mindspeed_llm", "mindspeed_rl", "megatron", "vllm", "vllm_ascend", "ray",
         "transformers", "hydra", "omegaconf")  # fmt: skip


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(command path, parser)`` for the parser and every subcommand below it, e.g. ``(("bench", "routing"), ...)``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_bench_routing_json(capsys):
    assert main(["bench", "routing", "--json", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    # Sizes are exact functions of the format, so they are asserted; timings are only reported.
    assert result["bytes_per_token"] <= 384
    assert result["bytes_per_token_dedupe"] <= 0.85 * 384
    assert result["int32_bytes_per_token"] > 4 * result["bytes_per_token"] - 1
    assert result["layout_gb_per_s"] > 0 and result["layout_speedup_vs_naive"] > 0
    assert set(result["targets"]) == {name for name, _, _ in TARGETS["routing"]}


def test_bench_replay_json(capsys):
    assert main(["bench", "replay", "--json", "--repeats", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["replay_over_native_time"] > 0
    # The alignment check is deterministic: aligned ids agree almost always, shuffled ones at chance.
    assert result["agreement_aligned"] > 0.95
    assert result["agreement_misaligned"] == pytest.approx(result["chance_overlap"], abs=0.02)
    assert set(result["targets"]) == {"replay_over_native_time"}


def test_bench_table(capsys):
    assert main(["bench", "routing", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "bytes_per_token" in out and "layout_speedup_vs_naive" in out and "target" in out


def test_bench_capture_json(capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "capture", "--json", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["host_syncs_per_step"] == 0 and result["host_sync_ops"] == {}
    assert result["tokens_per_s_plain"] > 0 and result["tokens_per_s_capture"] > 0
    assert result["targets"]["host_syncs_per_step"]["met"]


def test_plan_cli_accepts_the_shipped_config_and_rejects_tp3(capsys):
    pytest.importorskip("hydra")
    assert main(["plan", "grpo_qwen3_30b_a3b_lora_r3_aqn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    bad = ["plan", "grpo_qwen3_30b_a3b_lora_r3_aqn_12npu", "actor_config.tensor_model_parallel_size=3", "--json"]
    assert main(bad) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert any("tensor_model_parallel_size=3" in e for e in errors)
    assert main(["plan", "no_such_config"]) == 2


def test_doctor_cli_json(capsys):
    code = main(["doctor", "--json", "--profile", "cpu", "--verbose"])  # every target, not only the problems
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 1)
    assert {"name", "found", "compatible"} <= set(report["targets"][0])
    assert "torch" in report["versions"]


def test_gsm8k_synth_then_convert(tmp_path, capsys):
    raw, converted = tmp_path / "synth.jsonl", tmp_path / "train.jsonl"
    assert main(["gsm8k", "synth", str(raw), "--n", "5"]) == 0
    assert main(["gsm8k", "convert", str(raw), str(converted)]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["written"] == 5
    assert main(["gsm8k", "convert", str(tmp_path / "missing.jsonl"), str(converted)]) == 2


def test_apply_and_undo_cli_on_a_temporary_site_dir(tmp_path, capsys):
    assert main(["apply", "--site-dir", str(tmp_path), "--json"]) == 0
    assert list(tmp_path.glob("*.pth")), "apply wrote no .pth hook"
    capsys.readouterr()
    assert main(["apply", "--site-dir", str(tmp_path), "--json"]) == 0  # idempotent
    assert main(["apply", "--undo", "--site-dir", str(tmp_path), "--json"]) == 0
    assert not list(tmp_path.glob("*.pth"))


def test_train_cli_rejects_an_unknown_config_before_starting_anything(capsys):
    pytest.importorskip("hydra")
    assert main(["train", "--config-name", "no_such_config"]) == 2
    assert "no_such_config" in capsys.readouterr().err


def test_help_of_every_command_imports_no_heavy_module():
    script = f"""
import contextlib, io, json, sys
from tests.test_cli import _commands
from mindspeed_rl_r3.cli.main import build_parser
shown = 0
for path, _ in list(_commands(build_parser())):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        build_parser().parse_args([*path, "--help"])
    shown += out.getvalue().startswith("usage: mindspeed-rl-r3")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps({{"shown": shown, "heavy": heavy}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["shown"] == len(list(_commands(build_parser())))
    assert result["heavy"] == []


def test_every_command_and_option_has_help():
    missing = []
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not (c.help or "").strip()]
            elif not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_help_shows_defaults_but_not_empty_ones(capsys):
    texts = {}
    for path, _ in _commands(build_parser()):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*path, "--help"])
        texts[path] = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "timed repetitions (best is reported) (default: 5)" in texts[("bench", "routing")]
    assert "(default: 1000)" in texts[("gsm8k", "synth")]
    assert "(default: auto)" in texts[("doctor",)]
    assert not [path for path, text in texts.items() if "default: None" in text or "default: False" in text]


def test_plan_help_names_the_shipped_configs(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "grpo_qwen3_30b_a3b_lora_r3_aqn_12npu" in " ".join(capsys.readouterr().out.split())
