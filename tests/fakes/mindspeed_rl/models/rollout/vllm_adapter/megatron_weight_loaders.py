"""Fake of ``mindspeed_rl/models/rollout/vllm_adapter/megatron_weight_loaders.py`` at 05a90d77 (rewritten).

``qwen_megatron_weight_loader`` takes the container's buffers (vLLM names, Megatron memory layouts) and rebinds each
vLLM parameter to them: ``qkv_proj`` is regrouped from Megatron's per-query-group q/k/v rows into q, k, v blocks;
``w13_weight`` / ``w2_weight`` are reinterpreted as ``[E_local, H, -1]`` / ``[E_local, -1, H]``, which is
vllm-ascend's layout after ``process_weights_after_loading`` transposed them.
"""

import torch


class InferParallelConfig:
    def __init__(
        self,
        infer_tensor_parallel_size,
        infer_pipeline_parallel_size,
        infer_expert_parallel_size,
        infer_local_num_experts=-1,
    ):
        self.infer_tensor_parallel_size = infer_tensor_parallel_size
        self.infer_pipeline_parallel_size = infer_pipeline_parallel_size
        self.infer_expert_parallel_size = infer_expert_parallel_size
        self.infer_local_num_experts = infer_local_num_experts


def qkv_split_weight(query_key_value, infer_paralle_config, hf_config):
    tp = infer_paralle_config.infer_tensor_parallel_size
    heads = hf_config.num_attention_heads // tp
    groups = hf_config.num_key_value_heads // tp
    repeats = heads // groups
    qkv = query_key_value.reshape(groups, repeats + 2, query_key_value.shape[0] // groups // (repeats + 2), -1)
    hidden = qkv.shape[-1]
    q = qkv[:, :repeats].reshape(-1, hidden)
    k = qkv[:, repeats : repeats + 1].reshape(-1, hidden)
    v = qkv[:, repeats + 1 :].reshape(-1, hidden)
    return q, k, v


def default_weight_loader(param, loaded_weight):
    if param.size() != loaded_weight.size():
        raise ValueError("The parameter size does not match the loaded weight size.")
    if param.data.dtype != loaded_weight.data.dtype:
        raise ValueError("if we want to shared weights, the data type should also be the same")
    param.data = loaded_weight.data


def load_single_weight(params_dict, name, loaded_weight):
    param = params_dict[name]
    getattr(param, "weight_loader", default_weight_loader)(param, loaded_weight)


def qwen_megatron_weight_loader(actor_weights, vllm_model, infer_paralle_config, hf_config):
    params_dict = dict(vllm_model.named_parameters())
    experts = hf_config.num_experts // infer_paralle_config.infer_expert_parallel_size
    for name, loaded_weight in actor_weights.items():
        if name not in params_dict:
            continue
        if "qkv" in name:
            q, k, v = qkv_split_weight(loaded_weight, infer_paralle_config, hf_config)
            loaded_weight.copy_(torch.cat([q, k, v], dim=0))
        if "mlp.experts.w13_weight" in name:
            loaded_weight.copy_(loaded_weight.view(experts, hf_config.hidden_size, -1).contiguous())
        if "mlp.experts.w2_weight" in name:
            loaded_weight.copy_(loaded_weight.view(experts, -1, hf_config.hidden_size).contiguous())
        load_single_weight(params_dict, name, loaded_weight)
    return vllm_model
