"""The CPU reference pipeline end to end, shortened: Ray actors, capture -> wire -> layout -> replay, AQN, LoRA, the
warm start (cached after the first run) and the quantization evaluation."""

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

    # transformers' generate (--rollout hf, the fallback); tests/vllm027/test_demo_vllm.py runs the vLLM default and
    # checks that the reward rises. The warm start is the default one (cached where the demo caches it).
    settings = DemoSettings(
        steps=2, prompts_per_step=4, train_prompts=4, group_size=4, max_new_tokens=32, eval_prompts=8, rollout="hf"
    )
    result = run_demo(settings, compare=True, out_dir=tmp_path)
    off, on, no_aqn = result["r3_off"], result["r3_on"], result["r3_on_no_aqn"]
    assert result["rollout_engine"].startswith("transformers ") and "generate (bfloat16)" in result["rollout_engine"]
    assert result["warm_start"]["source"] in ("cache", "trained")
    # With replay the training routers route exactly as the rollout did on every recorded (token, layer) row.
    assert on["routing_mismatch"] == 0.0 and on["replay_agreement"] == 1.0
    assert off["routing_mismatch"] > 0.005  # bf16 rollout vs fp32 training flips some routing decisions
    # The arms differ only by replay (and AQN in the third): same weights, prompts and seeds, and step 0 has no AQN
    # noise, so the first rollout is the same in all three.
    first = [run["steps"][0] for run in (off, on, no_aqn)]
    assert len({(s["reward"], s["response_tokens"]) for s in first}) == 1
    assert on["steps"][0]["kl_ref_replayed"] == 0.0 < on["steps"][0]["kl_ref_native"]  # before any update
    assert on["steps"][0]["kl_ref"] == 0.0 and off["steps"][0]["kl_ref"] == 0.0
    for run in (off, on, no_aqn):
        assert len(run["steps"]) == 2 and set(run["layer_agreement"]) == {"1", "2", "3", "4"}
        assert all(0.0 <= s["reward"] <= 1.0 and s["response_tokens"] > 0 for s in run["steps"])
        assert run["reward_first"] == run["steps"][0]["reward"] and run["reward_last"] == run["steps"][1]["reward"]
        assert run["greedy_held_out_before"] == off["greedy_held_out_before"]
    assert on["aqn"] and not no_aqn["aqn"] and on["steps"][1]["aqn/sigma"] > 0 == no_aqn["steps"][1].get("aqn/sigma", 0)
    quant = result["aqn_quant_eval"]
    assert quant["policies"] == {"aqn_on": "r3_on", "aqn_off": "r3_on_no_aqn"} and quant["prompts"] == 8
    for policy in ("aqn_on", "aqn_off"):
        assert quant[policy]["unquantized"]["reward"] == result[quant["policies"][policy]]["greedy_held_out_after"]
        for fmt in ("nvfp4", "int4"):
            assert quant[policy][fmt]["kl"] > 0 and quant[policy][fmt]["quantized_tensors"] == 4 * 6
    saved = json.loads((tmp_path / "demo.json").read_text(), parse_constant=_not_json)  # strict: no NaN / Infinity
    assert saved["r3_on"]["routing_mismatch"] == 0.0 and saved["r3_off"]["kl_ref_replayed"] is None
    for name in ("mismatch_curves.png", "layer_agreement.png", "quant_eval.png"):
        assert (tmp_path / name).stat().st_size > 0
