"""The one rules module: torch-free, every rule exercised by the shared corpus, and ``plan`` reaching the verdict the
run must reach (tests/upstream/test_config_parity.py holds the run to the same verdicts on MindSpeed-RL's classes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mindspeed_rl_r3 import config_rules
from mindspeed_rl_r3.config import IntegrationConfig, R3Config, load_sections
from mindspeed_rl_r3.config_rules import ConfigView, RunConfigs
from mindspeed_rl_r3.plan import load_config, plan_config
from mindspeed_rl_r3.planning.sections import PlanSections
from mindspeed_rl_r3.replay.modes import ReplayConfig
from tests.config_corpus import CORPUS

pytest.importorskip("hydra")  # load_config composes the corpus with hydra

MOE = {"stage": "ray_grpo", "num_experts": 8, "moe_router_topk": 2}
EAGER_ROLLOUT = {"infer_tensor_parallel_size": 1}  # one NPU per expert group: no resharding rule applies


def _rules_fired(rl: dict, megatron: dict, generate: dict, sections: dict | None) -> list[config_rules.Finding]:
    config = load_sections(sections) if sections is not None else None
    return config_rules.findings(ConfigView(rl), ConfigView(megatron), ConfigView(generate), config)


def test_the_rules_plan_and_sections_import_no_torch():
    code = (
        "import sys; import mindspeed_rl_r3.config_rules, mindspeed_rl_r3.plan, mindspeed_rl_r3.lora.plan; "
        "from mindspeed_rl_r3.replay.modes import ReplayConfig; "
        "print(sorted(m for m in ('torch', 'numpy', 'ray') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_replay_config_is_one_class_wherever_it_is_imported():
    from mindspeed_rl_r3.replay.state import ReplayConfig as FromState

    assert FromState is ReplayConfig
    with pytest.raises(ValueError, match=r"r3\.alarm_overlap must be null or a number in \[0, 1\], got 'high'"):
        ReplayConfig(alarm_overlap="high")


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_plan_verdict_on_the_corpus(case):
    name, overrides, runs = CORPUS[case]
    result = plan_config(load_config(name, overrides))
    assert result["ok"] is runs, result["errors"]
    assert all(f["key"] and f["message"] for f in result["findings"])


def _run_configs(name: str, overrides: tuple[str, ...]) -> RunConfigs:
    """The corpus entry as the rules see it: MindSpeed-RL's precedence (model, megatron_training, actor_config)."""
    s = PlanSections(load_config(name, overrides))
    config, _ = config_rules.section_findings(s.cfg)  # invalid sections: only the model rules
    return RunConfigs(ConfigView(s.rl), ConfigView(s.model, s.megatron, s.actor), ConfigView(s.gen), config)


def test_every_rule_fires_somewhere_in_the_corpus():
    fired: set[str] = set()
    for name, overrides, _ in CORPUS.values():
        configs = _run_configs(name, overrides)
        fired |= {rule.__name__ for rule in config_rules.RULES if rule(configs)}
    assert fired == {rule.__name__ for rule in config_rules.RULES}


def test_plan_reports_section_errors_with_their_key():
    result = plan_config(load_config(CORPUS["negative_sigma"][0], CORPUS["negative_sigma"][1]))
    (finding,) = [f for f in result["findings"] if f["severity"] == "error"]
    assert finding["key"] == "aqn.sigma_start" and "aqn.sigma_start must be a positive" in finding["message"]
    r2 = plan_config(load_config(*CORPUS["r2_through_mindspeed_rl"][:2]))
    assert r2["errors"] == [config_rules.R2_UNSUPPORTED]


def test_torchair_and_graph_mode_are_refused_only_with_capture():
    r3 = {"r3": {"mode": "R3", "group_dedupe": False}}
    torchair = _rules_fired({}, MOE, {**EAGER_ROLLOUT, "torchair_graph": True}, r3)
    assert [f.key for f in torchair] == ["generate_config.torchair_graph"] and "torchair" in torchair[0].message
    assert _rules_fired({}, MOE, {**EAGER_ROLLOUT, "enforce_eager": False}, r3) == []  # graph mode is proven
    for mode in ("disabled", "R2"):
        graph = {**EAGER_ROLLOUT, "torchair_graph": True, "enforce_eager": False}
        assert all(
            "torchair" not in f.message and "eager" not in f.message
            for f in _rules_fired({}, MOE, graph, {"r3": {"mode": mode}})
        )


def test_integration_rules_need_the_sections_and_model_rules_do_not():
    rl = {"async_engine": True, "multi_turn_enable": True, "is_multimodal": True}
    topk = {**MOE, "moe_router_topk": 9}
    assert [f.key for f in _rules_fired(rl, topk, EAGER_ROLLOUT, None)] == ["moe_router_topk"]
    keys = {f.key for f in _rules_fired(rl, topk, EAGER_ROLLOUT, {"aqn": {"enabled": True}})}
    assert keys == {
        "moe_router_topk",
        "rl_config.async_engine",
        "rl_config.multi_turn_enable",
        "rl_config.is_multimodal",
    }
    # a missing stage is MindSpeed-RL's default (None), which is not the GRPO trainer
    (stage,) = _rules_fired({}, {"num_experts": 8}, EAGER_ROLLOUT, {"aqn": {}})
    assert stage.message == "megatron_training.stage None (the integration extends the GRPO trainer)"


def test_replay_needs_moe_and_group_dedupe_needs_whole_groups():
    (dense,) = _rules_fired({"guarantee_order": True}, {"stage": "ray_grpo"}, {}, {"r3": {"mode": "R3"}})
    assert dense.message == "r3.mode='R3' on a dense model: routing replay needs MoE layers"
    rl = {"guarantee_order": True, "n_samples_per_prompt": 4, "ref_dispatch_size": 6}
    (split,) = _rules_fired(rl, MOE, EAGER_ROLLOUT, {"r3": {"mode": "R3"}})
    assert split.key == "rl_config.ref_dispatch_size" and "not a multiple of n_samples_per_prompt 4" in split.message
    assert _rules_fired({**rl, "ref_dispatch_size": 8}, MOE, EAGER_ROLLOUT, {"r3": {"mode": "R3"}}) == []


def test_refusals_take_validated_sections_and_check_takes_raw_ones():
    sections = IntegrationConfig(r3=R3Config(replay=ReplayConfig(mode="R2")))
    assert config_rules.refusals(ConfigView(), ConfigView(MOE), ConfigView(EAGER_ROLLOUT), sections) == [
        config_rules.R2_UNSUPPORTED
    ]
    (bad,) = config_rules.check(
        ConfigView(), ConfigView(MOE), ConfigView(), {"lora_extras": {"lora_router_trainable": "maybe"}}
    )
    assert bad.key == "lora_extras.lora_router_trainable" and bad.severity == "error"
    assert config_rules.check(ConfigView(), ConfigView(MOE), ConfigView(EAGER_ROLLOUT), {}) == []
