import json

from mindspeed_rl_r3.cli.main import main


def test_bench_routing_json(capsys):
    assert main(["bench", "routing", "--json", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    # Sizes are exact functions of the format, so they are asserted; timings are only reported.
    assert result["bytes_per_token"] <= 384
    assert result["bytes_per_token_dedupe"] <= 0.85 * 384
    assert result["int32_bytes_per_token"] > 4 * result["bytes_per_token"] - 1
    assert result["layout_gb_per_s"] > 0 and result["layout_speedup_vs_naive"] > 0
    assert set(result["targets"]) == {
        "bytes_per_token",
        "bytes_per_token_dedupe",
        "layout_speedup_vs_naive",
        "layout_gb_per_s",
    }


def test_bench_routing_table(capsys):
    assert main(["bench", "routing", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "bytes_per_token" in out and "layout_speedup_vs_naive" in out
