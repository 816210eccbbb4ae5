"""Config variants that ``plan`` and the run must judge alike: the shipped configs, the cases ``plan`` used to get
wrong, and one or more variants per rule of :mod:`mindspeed_rl_r3.config_rules`.

Each entry is ``(config name, hydra overrides, runs)``: ``runs`` is the verdict both must reach. The main tests check
``plan``'s verdict; tests/upstream/test_config_parity.py checks that the run's check (the ``train`` driver's, on
MindSpeed-RL's real config classes) and worker initialisation reach the same one.
"""

from __future__ import annotations

MAIN = "grpo_qwen3_30b_a3b_lora_r3_aqn"
NO_SECTIONS = ("~r3", "~aqn", "~lora_extras")

CORPUS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    # the shipped configs
    "shipped": (MAIN, (), True),
    "shipped_12npu": (f"{MAIN}_12npu", (), True),
    "shipped_A2_2x8": (f"{MAIN}_A2_2x8", (), True),
    "no_sections": (MAIN, NO_SECTIONS, True),
    # what plan used to get wrong
    "torchair_with_r3_disabled": (MAIN, ("r3.mode=disabled", "generate_config.torchair_graph=true"), True),
    "r2_through_mindspeed_rl": (MAIN, ("r3.mode=R2",), False),
    "bogus_mode": (MAIN, ("r3.mode=bogus",), False),
    "negative_sigma": (MAIN, ("aqn.sigma_start=-0.5",), False),
    "zero_stages": (MAIN, ("aqn.num_stages=0",), False),
    "unknown_aqn_key": (MAIN, ("+aqn.sigma=0.1",), False),
    "unknown_r3_key": (MAIN, ("+r3.replay=true",), False),
    "unknown_lora_extras_key": (MAIN, ("+lora_extras.router=true",), False),
    "router_trainable_maybe": (MAIN, ("lora_extras.lora_router_trainable=maybe",), False),
    "topk_above_experts": (MAIN, ("model.qwen3_30b_a3b.moe_router_topk=200",), False),
    # one variant (or more) per rule
    "lora_moe_dispatcher": (MAIN, ("megatron_training.moe_token_dispatcher_type=alltoall",), False),
    "lora_moe_without_grouped_gemm_warns": (MAIN, ("model.qwen3_30b_a3b.moe_grouped_gemm=false",), True),
    "alltoall_overlap_ok": (MAIN, ("megatron_training.moe_alltoall_overlap_comm=true",), True),
    "alltoall_overlap_without_async_permutation": (
        MAIN,
        ("megatron_training.moe_alltoall_overlap_comm=true", "model.qwen3_30b_a3b.moe_permutation_async_comm=false"),
        False,
    ),
    "training_ep_without_tp_extend_ep": (MAIN, ("actor_config.moe_tp_extend_ep=false",), False),
    "infer_expert_group_not_a_multiple": (MAIN, ("generate_config.infer_expert_parallel_size=4",), False),
    "ep_rollout_without_tp_extend_ep": (
        MAIN,
        ("actor_config.moe_tp_extend_ep=false", "actor_config.expert_model_parallel_size=1"),
        False,
    ),
    "router_trainable_with_ckpt_filter": (MAIN, ("lora_extras.lora_router_trainable=true",), False),
    "router_trainable": (
        MAIN,
        ("lora_extras.lora_router_trainable=true", "megatron_training.lora_ckpt_filter=false"),
        True,
    ),
    "stage_not_grpo": (MAIN, ("megatron_training.stage=ray_ppo",), False),
    "multimodal": (MAIN, ("+rl_config.is_multimodal=true",), False),
    "async_engine": (MAIN, ("+rl_config.async_engine=true",), False),
    "async_engine_aqn_only": (MAIN, ("+rl_config.async_engine=true", "~r3"), False),
    "async_engine_without_sections": (MAIN, ("+rl_config.async_engine=true", *NO_SECTIONS), True),
    "multi_turn": (MAIN, ("+rl_config.multi_turn_enable=true",), False),
    "replay_on_a_dense_model": (MAIN, ("model.qwen3_30b_a3b.num_experts=null",), False),
    "torchair_with_capture": (MAIN, ("generate_config.torchair_graph=true",), False),
    # observe: R3's capture and telemetry with native routing (the R3-off arm), under the capture rules
    "observe": (MAIN, ("r3.mode=observe", "r3.replay_reference=false"), True),
    "observe_with_replay_reference": (MAIN, ("r3.mode=observe",), False),  # the shipped config replays the reference
    "torchair_with_observe": (
        MAIN,
        ("r3.mode=observe", "r3.replay_reference=false", "generate_config.torchair_graph=true"),
        False,
    ),
    # ACL graph mode with capture: proven under graph replay (tests/test_capture_graph.py), accepted either way
    "eager_with_capture": (MAIN, ("generate_config.enforce_eager=true",), True),
    "graph_mode_without_capture": (MAIN, ("generate_config.enforce_eager=false", "r3.mode=disabled"), True),
    "virtual_pipeline_with_capture": (MAIN, ("+actor_config.num_layers_per_virtual_pipeline_stage=12",), False),
    "group_dedupe_without_guarantee_order": (MAIN, ("rl_config.guarantee_order=false",), False),
    "no_group_dedupe_without_guarantee_order": (
        MAIN,
        ("rl_config.guarantee_order=false", "r3.group_dedupe=false"),
        True,
    ),
    "group_dedupe_split_dispatch": (MAIN, ("+rl_config.actor_update_dispatch_size=12",), False),
    "group_dedupe_whole_group_dispatch": (MAIN, ("+rl_config.actor_update_dispatch_size=16",), True),
}
