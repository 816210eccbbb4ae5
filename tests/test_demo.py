"""The CPU reference pipeline end to end, shortened: Ray actors, capture -> wire -> layout -> replay, AQN, LoRA."""

import json

import pytest

pytest.importorskip("ray")
pytest.importorskip("transformers")
pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron


def _not_json(name: str) -> None:
    raise ValueError(f"demo.json holds {name}, which is not JSON")


def test_demo_compare_short(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster the demo must not try to join
    from mindspeed_rl_r3.demo.pipeline import run_demo
    from mindspeed_rl_r3.demo.workers import DemoSettings

    # transformers' generate (--rollout hf, the fallback); tests/vllm027/test_demo_vllm.py runs the vLLM default
    settings = DemoSettings(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=24, rollout="hf")
    result = run_demo(settings, compare=True, out_dir=tmp_path)
    off, on = result["r3_off"], result["r3_on"]
    assert result["rollout_engine"].startswith("transformers ") and "generate (bfloat16)" in result["rollout_engine"]
    # With replay the training routers route exactly as the rollout did on every recorded (token, layer) row.
    assert on["routing_mismatch"] == 0.0 and on["replay_agreement"] == 1.0
    assert off["routing_mismatch"] > 0.005  # bf16 rollout vs fp32 training flips some routing decisions
    assert on["k3_kl"] < 0.5 * off["k3_kl"]
    for run in (off, on):
        assert len(run["steps"]) == 2 and set(run["layer_agreement"]) == {"1", "2", "3", "4"}
        assert all(0.0 <= s["reward"] <= 1.0 and s["response_tokens"] > 0 for s in run["steps"])
        assert run["steps"][1]["aqn/stage"] >= run["steps"][0]["aqn/stage"]
    saved = json.loads((tmp_path / "demo.json").read_text(), parse_constant=_not_json)  # strict: no NaN / Infinity
    assert saved["r3_on"]["routing_mismatch"] == 0.0
    assert (tmp_path / "mismatch_curves.png").stat().st_size > 0 and (tmp_path / "layer_agreement.png").exists()
