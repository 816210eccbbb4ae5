"""Fake of ``mindspeed_rl/workers/resharding/weight_adaptor.py`` at 05a90d77 (rewritten, same behaviour).

``MegatronVLLMWeightAdaptor.replace_name_i2t`` maps a vLLM name to the Megatron name through ``params_mapping``
(decoder names keep ``decoder.layers.<i>.`` and the trailing ``weight``/``bias``) and then inserts ``.base_layer``
after every ``model_config.lora_target_modules`` entry found in the name. ``Qwen3MoeMVWeightAdaptor`` (and
``Qwen3MvWeightAdaptor``) override it with the same mapping logic but without the ``.base_layer`` step.
``adjust_megatron_param_dict`` returns the dict unchanged for these models (its MLA split does not apply);
``get_weight_names_per_pp`` / ``global2local_layer`` are given for PP 1 without noop layers.
"""


class BaseWeightAdaptor:
    def __init__(self, model_config):
        self.model_config = model_config


def _map_decoder_name(inference_name, m_name):
    parts = inference_name.replace("model", "decoder").split(".")
    param_name = [*parts[:3], m_name]
    if parts[-1] in ("weight", "bias"):
        param_name.append(parts[-1])
    return ".".join(param_name)


class MegatronVLLMWeightAdaptor(BaseWeightAdaptor):
    def __init__(self, model_config):
        super().__init__(model_config)
        self.meta_info = None
        self.params_mapping = [
            ("embedding.word_embeddings", "model.embed_tokens"),
            ("self_attention.linear_qkv", "self_attn.qkv_proj"),
            ("self_attention.linear_proj", "self_attn.o_proj"),
            ("input_layernorm", "input_layernorm"),
            ("pre_mlp_layernorm", "post_attention_layernorm"),
            ("mlp.linear_fc1", "mlp.gate_up_proj"),
            ("mlp.linear_fc2", "mlp.down_proj"),
            ("decoder.final_layernorm", "model.norm"),
            ("output_layer", "lm_head"),
        ]

    def replace_name_i2t(self, inference_name):
        for m_name, v_name in self.params_mapping:
            if v_name not in inference_name:
                continue
            if "layers" not in inference_name:
                return inference_name.replace(v_name, m_name)
            param_name = _map_decoder_name(inference_name, m_name)
            targets = self.model_config.lora_target_modules
            for target in targets if isinstance(targets, list) else []:
                if target in param_name:
                    param_name = param_name.replace(target, target + ".base_layer")
            return param_name
        return None

    def adjust_megatron_param_dict(self, param_dict, train_tp_size):
        return param_dict

    def convert_weight_name_meta(self, weight_names):
        return weight_names

    def get_weight_buffer_meta(self, model, valid_names=None):
        meta = {}
        for name, param in sorted(model.named_parameters()):
            if valid_names and name not in valid_names:
                continue
            meta[name] = {"shape": param.shape, "dtype": param.dtype}
        return meta

    @staticmethod
    def global2local_layer(name, num_layer_list, vpp_rank=0, global2local_map=None):
        return name

    @staticmethod
    def get_weight_names_per_pp(layer_list, vllm_names, layers_num=None, vpp_size=0, noop_layers=None):
        return [[list(vllm_names)]]


class Qwen3MvWeightAdaptor(MegatronVLLMWeightAdaptor):
    def __init__(self, model_config):
        super().__init__(model_config)
        self.params_mapping = [
            ("embedding.word_embeddings", "model.embed_tokens"),
            ("self_attention.linear_qkv", "self_attn.qkv_proj"),
            ("self_attention.linear_proj", "self_attn.o_proj"),
            ("input_layernorm", "input_layernorm"),
            ("pre_mlp_layernorm", "post_attention_layernorm"),
            ("mlp.linear_fc1", "mlp.gate_up_proj"),
            ("mlp.linear_fc2", "mlp.down_proj"),
            ("decoder.final_layernorm", "model.norm"),
            ("output_layer", "lm_head"),
            ("self_attention.q_layernorm", "self_attn.q_norm"),
            ("self_attention.k_layernorm", "self_attn.k_norm"),
        ]

    def replace_name_i2t(self, inference_name):
        for m_name, v_name in self.params_mapping:
            if v_name not in inference_name:
                continue
            if "layers" in inference_name:
                return _map_decoder_name(inference_name, m_name)
            return inference_name.replace(v_name, m_name)
        return None


class Qwen3MoeMVWeightAdaptor(MegatronVLLMWeightAdaptor):
    def __init__(self, model_config):
        super().__init__(model_config)
        self.params_mapping = [
            ("embedding.word_embeddings", "model.embed_tokens"),
            ("self_attention.linear_qkv", "self_attn.qkv_proj"),
            ("self_attention.linear_proj", "self_attn.o_proj"),
            ("input_layernorm", "input_layernorm"),
            ("pre_mlp_layernorm", "post_attention_layernorm"),
            ("decoder.final_layernorm", "model.norm"),
            ("output_layer", "lm_head"),
            ("mlp.experts.weight1", "mlp.experts.w13_weight"),
            ("mlp.experts.weight2", "mlp.experts.w2_weight"),
            ("mlp.router", "mlp.gate"),
            ("self_attention.q_layernorm", "self_attn.q_norm"),
            ("self_attention.k_layernorm", "self_attn.k_norm"),
        ]

    def replace_name_i2t(self, inference_name):
        for m_name, v_name in self.params_mapping:
            if v_name not in inference_name:
                continue
            if "layers" in inference_name:
                return _map_decoder_name(inference_name, m_name)
            return inference_name.replace(v_name, m_name)
        return None


WEIGHT_ADAPTOR_REGISTRY = {
    "Qwen3ForCausalLM": Qwen3MvWeightAdaptor,
    "CustomQwen3ForCausalLM": Qwen3MvWeightAdaptor,
    "CustomQwen3MoeForCausalLM": Qwen3MoeMVWeightAdaptor,
    "Qwen3MoeForCausalLM": Qwen3MoeMVWeightAdaptor,
}


def get_weight_adaptor(arch):
    if arch in WEIGHT_ADAPTOR_REGISTRY:
        return WEIGHT_ADAPTOR_REGISTRY[arch]
    raise ValueError(f"Model architectures {arch} are not supported for now.")
