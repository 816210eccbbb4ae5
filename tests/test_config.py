import pytest

from mindspeed_rl_r3.config import ConfigError, load_sections, split_config
from mindspeed_rl_r3.replay.state import ReplayMode


def test_sections_are_split_off_and_validated():
    config = {
        "megatron_training": {"stage": "ray_grpo"},
        "r3": {"mode": "R3", "alarm_min_rows": 32, "vllm_ascend": "0.9.1", "group_dedupe": False},
        "aqn": {"enabled": True, "num_stages": 5, "precision": "fp32"},
        "lora_extras": {"lora_router_trainable": True},
    }
    rest, ours = split_config(config)
    assert rest == {"megatron_training": {"stage": "ray_grpo"}}
    assert ours.r3.replay.mode is ReplayMode.R3 and ours.r3.replay.alarm_min_rows == 32 and ours.r3.capture
    assert ours.r3.vllm_ascend == "0.9.1" and ours.r3.group_dedupe is False
    assert ours.aqn.enabled and ours.aqn.num_stages == 5
    assert ours.lora_extras.lora_router_trainable


def test_absent_sections_mean_plain_mindspeed_rl():
    ours = load_sections({"rl_config": {}})
    assert not ours.r3.enabled and not ours.r3.capture and not ours.aqn.enabled
    assert not ours.lora_extras.lora_router_trainable


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r3": {"mode": "R4"}}, r"r3\.mode .*R4"),
        ({"r3": {"replay": True}}, r"r3: unknown keys \['replay'\]"),
        ({"r3": {"vllm_ascend": "0.8"}}, "r3.vllm_ascend must be one of"),
        ({"r3": {"group_dedupe": "yes"}}, "r3.group_dedupe must be true or false"),
        ({"aqn": {"sigma_start": -1}}, "aqn.sigma_start must be a positive"),
        ({"aqn": {"sigma": 0.1}}, r"unknown aqn keys \['sigma'\]"),
        ({"lora_extras": {"router": True}}, "lora_extras: unknown keys"),
        ({"lora_extras": {"lora_router_trainable": 1}}, "must be true or false"),
        ({"r3": ["R3"]}, "r3: expected a mapping"),
        ({"r3": {"replay_reference": "yes"}}, "r3.replay_reference must be true or false"),
        ({"r3": {"alarm_overlap": 1.5}}, r"r3\.alarm_overlap must be null or a number in \[0, 1\]"),
        ({"aqn": {"num_stages": 0}}, "aqn.num_stages must be an integer >= 1"),
    ],
)
def test_bad_values_name_section_and_key(config, message):
    with pytest.raises(ConfigError, match=message):
        load_sections(config)


def test_omegaconf_sections_become_plain_values():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"r3": {"mode": "R3"}, "aqn": {"enabled": True, "targets": ["pre_mlp_layernorm"]}})
    ours = load_sections(cfg)
    assert ours.r3.replay.mode is ReplayMode.R3 and ours.aqn.targets == ("pre_mlp_layernorm",)
    rest, _ = split_config(omegaconf.OmegaConf.create({"rl_config": {"n": 1}, "r3": {"mode": "R3"}}))
    assert rest == {"rl_config": {"n": 1}} and type(rest["rl_config"]) is dict
