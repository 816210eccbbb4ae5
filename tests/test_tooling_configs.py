"""Shipped hydra configs compose, and `plan` accepts their layouts and rejects broken ones with the reason."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mindspeed_rl_r3.data.gsm8k import ANSWER_KEY, PROBLEM_KEY
from mindspeed_rl_r3.plan import PlanError, activation_bytes_per_token, format_plan, load_config, plan_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TOP_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("grpo_*.yaml"))  # cpu_tiny_grpo: tests/upstream
MAIN = "grpo_qwen3_30b_a3b_lora_r3_aqn"
# (config, NPUs, nodes) the shipped configs are written for
SHIPPED = [
    (MAIN, 16, 1),
    (f"{MAIN}_A2_2x8", 16, 2),
    (f"{MAIN}_12npu", 12, 1),
]
R3 = {
    "mode": "R3",
    "replay_reference": True,
    "aux_loss_routing": "native",
    "on_misaligned": "raise",
    "alarm_overlap": None,
    "alarm_min_rows": 64,
    "vllm_ascend": "0.11.0",
    "group_dedupe": True,
}
AQN = {
    "enabled": True,
    "sigma_start": 0.01,
    "sigma_end": 0.001,
    "num_stages": 10,
    "targets": ["post_attention_layernorm", "pre_mlp_layernorm"],
    "apply_to": "rollout",
    "router": "perturbed",
    "seed": 1234,
}


def _compose(name: str, config_dir: Path = CONFIG_DIR, overrides: tuple[str, ...] = ()) -> dict:
    with initialize_config_dir(version_base=None, config_dir=str(config_dir)):
        return OmegaConf.to_container(compose(config_name=name, overrides=list(overrides)), resolve=True)


@pytest.fixture(scope="module")
def main_cfg() -> dict:
    return _compose(MAIN)


def test_every_shipped_config_is_listed():
    assert {name for name, _, _ in SHIPPED} == set(TOP_CONFIGS)


@pytest.mark.parametrize("name", TOP_CONFIGS)
def test_top_level_config_composes(name):
    cfg = _compose(name)
    assert {"model", "megatron_training", "actor_config", "rl_config", "generate_config"} <= set(cfg)
    assert cfg["r3"] == R3 and cfg["aqn"] == AQN and cfg["lora_extras"] == {"lora_router_trainable": False}
    meg, actor, rl, gen = cfg["megatron_training"], cfg["actor_config"], cfg["rl_config"], cfg["generate_config"]
    assert meg["stage"] == "ray_grpo" and meg["bf16"] is True and gen["dtype"] == "bfloat16"
    assert meg["model"] == actor["model"] == "qwen3_30b_a3b" and "qwen3_30b_a3b" in cfg["model"]
    assert meg["lora_target_modules"] and meg["lora_r"] > 0 and meg["lora_alpha"] > 0
    assert cfg["model"]["qwen3_30b_a3b"]["moe_token_dispatcher_type"] == "alltoall_seq"
    # MindSpeed-RL 05a90d77 needs moe_tp_extend_ep for training EP and to sync experts to an EP rollout.
    assert meg["moe_token_dispatcher_type"] == "alltoall_seq" and actor["moe_tp_extend_ep"] is True
    assert rl["use_integrated_worker"] is True and rl["verifier_function"] == ["math_17k_acc"]
    assert meg["dataset_additional_keys"] == ["labels"]
    assert gen["enable_expert_parallel"] is True and gen["infer_expert_parallel_size"] > 1


def test_variants_inherit_the_main_config(main_cfg):
    for name, npus, _ in SHIPPED[1:]:
        cfg = _compose(name)
        assert cfg["rl_config"]["actor_resource"]["num_npus"] == npus
        # everything outside the layout is the main config's
        assert cfg["rl_config"]["verifier_function"] == main_cfg["rl_config"]["verifier_function"]
        assert cfg["megatron_training"]["lora_r"] == main_cfg["megatron_training"]["lora_r"]
        assert cfg["model"] == main_cfg["model"]


def test_hydra_overrides_reach_the_variants():
    cfg = _compose(f"{MAIN}_12npu", overrides=("actor_config.tensor_model_parallel_size=2",))
    assert cfg["actor_config"]["tensor_model_parallel_size"] == 2


def test_model_yaml_is_qwen3_30b_a3b(main_cfg):
    model = main_cfg["model"]["qwen3_30b_a3b"]
    assert (model["num_layers"], model["hidden_size"], model["num_attention_heads"]) == (48, 2048, 32)
    assert (model["num_query_groups"], model["kv_channels"], model["padded_vocab_size"]) == (4, 128, 151936)
    assert (model["num_experts"], model["moe_router_topk"], model["moe_ffn_hidden_size"]) == (128, 8, 768)
    assert model["norm_topk_prob"] is True and model["moe_grouped_gemm"] is True


def test_dataset_yaml_matches_the_converter():
    # MindSpeed-RL's preprocess_data.py composes it as the primary config of configs/datasets
    cfg = _compose("gsm8k_qwen3", CONFIG_DIR / "datasets")
    assert cfg["handler_name"] == "R1AlpacaStyleInstructionHandler"
    assert cfg["map_keys"]["prompt"] == PROBLEM_KEY and cfg["map_keys"]["response"] == ANSWER_KEY
    assert cfg["dataset_additional_keys"] == ["labels"]


def test_runtime_env_agrees_with_the_main_config(main_cfg):
    env = _compose("runtime_env", CONFIG_DIR / "envs")
    assert env["env_vars"]["VLLM_DP_SIZE"] == str(main_cfg["generate_config"]["infer_expert_parallel_size"])
    assert env["env_vars"]["VLLM_USE_V1"] == "1" and env["env_vars"]["VLLM_VERSION"] == "0.11.0"
    assert plan_config(main_cfg, runtime_env=env)["ok"]


# ------------------------------------------------------------------------------------------------------------ plan


@pytest.mark.parametrize(("name", "npus", "nodes"), SHIPPED)
def test_plan_accepts_the_shipped_layouts(name, npus, nodes):
    result = plan_config(load_config(name), num_npus=npus, nnodes=nodes)
    assert result["ok"], result["errors"]
    assert result["errors"] == [] and result["layout"]["world"] == npus
    lay = result["layout"]
    assert lay["tp"] * lay["pp"] * lay["cp"] * lay["dp"] == npus
    mem = result["memory_gib_per_npu"]
    assert mem["active"] == "with_lora"
    lora, full = mem["with_lora"], mem["without_lora"]
    assert lora["params"] == full["params"] > 0  # LoRA freezes weights but keeps them all
    assert lora["trainable_params_b"] < full["trainable_params_b"]
    assert lora["grads"] < full["grads"] and lora["optimizer"] < full["optimizer"]
    assert full["grads"] == pytest.approx(2 * full["params"], rel=1e-3)  # fp32 grads for every bf16 weight
    assert 0 < lora["peak"] <= mem["hbm"] and lora["kv_cache"] > 0
    assert mem["kv_cache_tokens"] >= 3072 and json.dumps(result)
    assert "plan ok" in format_plan(result)


def test_plan_model_size_is_qwen3_30b_a3b(main_cfg):
    result = plan_config(main_cfg)
    assert result["model"]["total_params_b"] == pytest.approx(30.5, abs=0.1)
    # vLLM at TP 1 x EP 8: 16 experts per NPU, about 5.2B bf16 parameters
    assert result["layout"]["experts_per_npu_infer"] == 16
    assert result["memory_gib_per_npu"]["with_lora"]["vllm_weights"] == pytest.approx(5.16e9 * 2 / 2**30, rel=0.03)
    assert result["memory_gib_per_npu"]["kv_bytes_per_token"] == 2 * 48 * 4 * 128 * 2


def _plan(*overrides: str, name: str = MAIN, **kwargs) -> dict:
    return plan_config(load_config(name, overrides), **kwargs)


def _assert_rejected(result: dict, *fragments: str) -> None:
    assert not result["ok"]
    text = "\n".join(result["errors"])
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in errors:\n{text}"


def test_plan_rejects_tp3_for_four_kv_heads():
    result = _plan(
        "actor_config.tensor_model_parallel_size=3", "megatron_training.global_batch_size=48", name=f"{MAIN}_12npu"
    )
    _assert_rejected(result, "tensor_model_parallel_size=3", "num_query_groups (KV heads) 4", "valid TP: [1, 2, 4]")
    assert any("hidden_size 2048" in e for e in result["errors"])


def test_plan_accepts_tp2_on_12_npus():
    result = _plan(
        "actor_config.tensor_model_parallel_size=2", name=f"{MAIN}_12npu", num_npus=12
    )  # DP 6 divides the 48 prompts
    assert result["ok"], result["errors"]
    assert result["layout"]["dp"] == 6


def test_plan_rejects_ep_not_dividing_experts():
    result = _plan("actor_config.expert_model_parallel_size=3", "rl_config.actor_resource.num_npus=12")
    _assert_rejected(result, "num_experts 128 is not divisible by EP")


def test_plan_rejects_lora_without_alltoall_seq():
    result = _plan("megatron_training.moe_token_dispatcher_type=alltoall")
    _assert_rejected(result, "LoRA on an MoE model requires moe_token_dispatcher_type: alltoall_seq")


def test_plan_warns_that_lora_with_tp_extend_ep_needs_the_pinned_mindspeed_llm():
    result = _plan()
    assert result["ok"], result["errors"]
    assert any("moe_tp_extend_ep=true with LoRA" in w and "c77308a" in w for w in result["warnings"])


def test_plan_rejects_training_ep_without_tp_extend_ep():
    result = _plan("actor_config.moe_tp_extend_ep=false")
    _assert_rejected(result, "MindSpeed-RL's weight resharding", "set moe_tp_extend_ep: true or EP 1")


def test_plan_rejects_an_ep_rollout_without_tp_extend_ep():
    result = _plan("actor_config.moe_tp_extend_ep=false", "actor_config.expert_model_parallel_size=1")
    _assert_rejected(result, "would keep dummy experts")


def test_plan_accepts_tp_extend_ep_without_lora():
    result = _plan(
        "megatron_training.lora_target_modules=null",
        "rl_config.share_backbone=false",
        "actor_config.moe_tp_extend_ep=true",
        "actor_config.expert_model_parallel_size=2",
        "megatron_training.moe_alltoall_overlap_comm=true",
    )
    # MindSpeed-RL's own DAPO layout for this model (full fine-tuning, TP 4, EP 2 with moe_tp_extend_ep)
    assert result["ok"], result["errors"]
    assert result["memory_gib_per_npu"]["active"] == "without_lora"
    assert result["layout"]["experts_per_npu_train"] == 16 and result["layout"]["expert_dp"] == 2
    # ... and with experts only over TP (EP 1), full fine-tuning's expert Adam state no longer fits 64 GiB
    ep1 = _plan(
        "megatron_training.lora_target_modules=null",
        "rl_config.share_backbone=false",
        "actor_config.expert_model_parallel_size=1",
        "actor_config.moe_tp_extend_ep=false",
        "generate_config.infer_expert_parallel_size=1",
        "generate_config.infer_tensor_parallel_size=4",
    )
    _assert_rejected(ep1, "estimated training peak")


def test_plan_rejects_world_size_mismatch():
    _assert_rejected(_plan(num_npus=8), "world-size mismatch", "num_npus = 16", "8 NPUs")
    _assert_rejected(
        _plan("actor_config.pipeline_model_parallel_size=2", "rl_config.actor_resource.num_npus=12"),
        "world size 12",
        "not divisible by TP * PP * CP",
    )


def test_plan_rejects_layers_not_divisible_by_pp():
    _assert_rejected(
        _plan("actor_config.pipeline_model_parallel_size=5", "rl_config.actor_resource.num_npus=20"),
        "num_layers 48 is not divisible by PP",
    )
    uneven = _plan(
        "actor_config.pipeline_model_parallel_size=4",
        "+actor_config.num_layer_list='10,14,14,10'",
        "megatron_training.global_batch_size=32",
        "rl_config.actor_resource.num_npus=16",
    )
    assert not any("num_layer" in e for e in uneven["errors"]), uneven["errors"]


def test_plan_rejects_bad_batches():
    _assert_rejected(
        _plan("megatron_training.global_batch_size=30"), "global_batch_size=30 is not divisible by training DP 4"
    )
    _assert_rejected(_plan("megatron_training.global_batch_size=33", nnodes=2, num_npus=16), "divisible by the 2 nodes")


def test_plan_rejects_bad_inference_layouts():
    _assert_rejected(_plan("generate_config.infer_expert_parallel_size=3"), "do not tile the 16 NPUs")
    _assert_rejected(
        _plan(
            "generate_config.infer_expert_parallel_size=12",
            "rl_config.actor_resource.num_npus=12",
            name=f"{MAIN}_12npu",
        ),
        "num_experts 128 is not divisible by infer TP * infer EP = 12",
    )
    _assert_rejected(_plan("generate_config.infer_pipeline_parallel_size=2"), "supports only 1")
    _assert_rejected(_plan("generate_config.enable_expert_parallel=false"), "needs enable_expert_parallel: true")


def test_plan_checks_vllm_dp_size_against_infer_ep(main_cfg):
    env = {"env_vars": {"VLLM_DP_SIZE": "4"}}
    assert any("VLLM_DP_SIZE=4" in w for w in plan_config(main_cfg, runtime_env=env)["warnings"])
    without_ep = _plan(
        "generate_config.enable_expert_parallel=false",
        "generate_config.infer_expert_parallel_size=1",
        "generate_config.infer_tensor_parallel_size=4",  # TP 1 without EP would hold all 57 GiB of weights
        "actor_config.expert_model_parallel_size=1",  # training expert group TP x EP = 4 divides infer TP 4
    )
    assert without_ep["ok"], without_ep["errors"]
    no_ep_tp1 = _plan("generate_config.enable_expert_parallel=false", "generate_config.infer_expert_parallel_size=1")
    _assert_rejected(no_ep_tp1, "leaves no KV cache")
    mismatch = plan_config(load_config(MAIN, ["generate_config.enable_expert_parallel=false"]), runtime_env=env)
    _assert_rejected(mismatch, "VLLM_DP_SIZE=4", "must be equal")


def test_plan_rejects_r3_with_torchair_and_a_too_small_kv_cache():
    _assert_rejected(_plan("generate_config.torchair_graph=true"), "torchair")
    _assert_rejected(_plan("generate_config.gpu_memory_utilization=0.15"), "leaves no KV cache")


def test_plan_on_plain_dicts_and_missing_sections(main_cfg):
    assert plan_config(dict(main_cfg))["ok"]
    broken = {k: v for k, v in main_cfg.items() if k != "model"}
    with pytest.raises(PlanError, match=r"model section 'model\.qwen3_30b_a3b' not found"):
        plan_config(broken)
    with pytest.raises(FileNotFoundError, match="config not found"):
        load_config("no_such_config")


def test_activation_formula_is_documented():
    doc = activation_bytes_per_token.__doc__ or ""
    assert "MoE MLP" in doc and "Attention" in doc and "divides the sum by TP" in doc


# ------------------------------------------------------------------------ against a real MindSpeed-RL checkout


def _config_class_keys(path: Path, cls: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for inner in ast.walk(node):
                targets = inner.targets if isinstance(inner, ast.Assign) else []
                for target in targets:
                    is_self = isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    if is_self and target.value.id == "self":
                        keys.add(target.attr)
    return keys


@pytest.mark.upstream
def test_config_keys_are_known_to_mindspeed_rl():
    """MindSpeed-RL's BaseConfig.update raises on unknown keys: every key must be a config-class attribute (the
    dataset config too, which tests/upstream does not build)."""
    from mindspeed_rl_r3.patches import cpu_backend

    root = cpu_backend.upstream_root()
    if root is None:
        pytest.skip("../shared/upstream (the pinned upstream sources) is absent")
    config_cls = root / "MindSpeed-RL" / "mindspeed_rl" / "config_cls"
    megatron = _config_class_keys(config_cls / "megatron_config.py", "MegatronConfig")
    known = {
        "megatron_training": megatron,
        "actor_config": megatron,
        "rl_config": _config_class_keys(config_cls / "rl_config.py", "RLConfig"),
        "generate_config": _config_class_keys(config_cls / "generate_config.py", "GenerateConfig"),
    }
    for name in TOP_CONFIGS:
        cfg = _compose(name)
        for section, keys in known.items():
            assert set(cfg[section]) - keys - {"model"} == set(), (name, section)
        assert set(cfg["model"]["qwen3_30b_a3b"]) - megatron == set(), name
    data = _compose("gsm8k_qwen3", CONFIG_DIR / "datasets")
    handler_keys = _config_class_keys(config_cls / "data_handler_config.py", "DataHandlerConfig")
    assert set(data) - handler_keys == set()
