"""Adapters to upstream frameworks. The only package that imports vllm, vllm_ascend, torch_npu, mindspeed,
mindspeed_llm or mindspeed_rl; each module declares its ``TARGETS`` and a ``check()`` that ``doctor`` runs."""

# Patch modules and what they attach to, for ``doctor``: module name -> short description.
PATCH_MODULES = {
    "megatron_router": "routing replay in megatron-core TopKRouter (core 0.12.x wrappers, core 0.16+ hook)",
    "mindspeed_llm_router": "routing replay registered through MindSpeed's patch manager over MindSpeed-LLM",
    "vllm_ascend_capture": "rollout routing capture in vllm-ascend (MoE layer before prepare, model runner steps)",
    "hf_qwen3_moe": "rollout routing capture in transformers Qwen3-MoE (CPU pipeline)",
    "mindspeed_rl_lora": "LoRA weight sync for Qwen3-MoE in MindSpeed-RL: .base_layer names, expert merge, reference",
    "peft_megatron": "peft LoraParallelLinear repairs for megatron-core layers (CPU pipeline and tests)",
    "mindspeed_rl_trainer": "TransferDock columns (routed_experts, rollout_log_probs) and metric reduction in "
    "MindSpeed-RL's GRPO trainer",
    "mindspeed_rl_worker": "per-stage dispatch columns, rollout put, actor-worker lifecycle (refusals, AQN attach, "
    "metrics) in MindSpeed-RL",
    "mindspeed_rl_rollout": "token-id prompts, routing capture and rollout log-probs in MindSpeed-RL's vLLM engine",
    "mindspeed_rl_aqn": "AQN noise right after each weight sync in MindSpeed-RL's sharding manager",
    "mindspeed_rl_replay": "per-micro-batch replay feed, replay passes, log-prob mismatch and router registration in "
    "MindSpeed-RL's training engine",
}
