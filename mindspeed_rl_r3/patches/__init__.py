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
}
