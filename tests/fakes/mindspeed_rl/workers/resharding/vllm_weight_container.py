"""Fake of ``mindspeed_rl/workers/resharding/vllm_weight_container.py::MegatronStyleVllmWeightContainer`` at
05a90d77, for one process (TP = PP = 1, no resharding collectives), keeping the behaviour the LoRA sync relies on:

- weight buffers are built from the vLLM model's parameter names and shapes; Megatron tensors are copied in as raw
  memory (``buffer.view(param.shape).copy_(param)``), so vLLM's own loader later reinterprets the layout;
- ``_unwrap_megatron_model`` strips ``module.`` prefixes and, with ``lora_target_modules``, ``base_model.model``;
- both update paths build ``{megatron name: tensor}`` from ``named_buffers`` + ``named_parameters`` and pass it
  through ``weight_adaptor.adjust_megatron_param_dict``; names come from ``weight_adaptor.replace_name_i2t``;
- ``_update_weight_buffers_intra_pp`` skips ``mlp.experts`` names when train EP or infer EP x TP > 1, looks every
  other name up (``KeyError`` if the adaptor produced a name the model lacks) and, for ``.base_layer.weight`` names,
  adds ``(lora_alpha / lora_r) * lora_B @ lora_A`` (no other LoRA handling);
- ``_update_weight_buffers_ep`` runs only with ``moe_tp_extend_ep`` and copies the experts' tensors unmerged.
"""

import torch


class MegatronStyleVllmWeightContainer:
    def __init__(
        self,
        megatron_model,
        vllm_model,
        model_config,
        infer_tensor_parallel_size,
        infer_pipeline_parallel_size,
        infer_expert_parallel_size,
        num_layer_list,
        moe_tp_extend_ep=False,
        parallel_state=None,
        weight_adaptor=None,
        noop_layers=None,
        eplb_map=None,
        global_redundant_expert_num=0,
        infer_local_num_experts=-1,
    ):
        self.vllm_model = vllm_model
        self.model_config = model_config
        self.megatron_model = megatron_model
        self.weight_adaptor = weight_adaptor
        self.moe_tp_extend_ep = moe_tp_extend_ep
        self._tp_size = parallel_state.get_tensor_model_parallel_world_size() if parallel_state else 1
        self._ep_size = parallel_state.get_expert_model_parallel_world_size() if parallel_state else 1
        if moe_tp_extend_ep:
            self._ep_size *= self._tp_size
        self._infer_tp_size = infer_tensor_parallel_size
        self._infer_ep_size = infer_expert_parallel_size * infer_tensor_parallel_size
        self._vpp_size = 1
        if self._ep_size > 1 and not moe_tp_extend_ep:
            raise ValueError("To enable training EP, you need to enable moe_tp_extend_ep and use GroupedMLP.")
        vllm_names = [n for n, _ in self.vllm_model.named_parameters()]
        self.weight_names_per_pp = self.weight_adaptor.get_weight_names_per_pp([0], vllm_names)
        meta = self.weight_adaptor.get_weight_buffer_meta(self.vllm_model)
        self.weight_buffers = [{name: torch.zeros(m["shape"], dtype=m["dtype"]) for name, m in meta.items()}]

    def get_infer_params(self):
        self._update_weight_buffers_intra_pp()
        if self.moe_tp_extend_ep and self._infer_ep_size >= self._ep_size:
            self._update_weight_buffers_ep()
        return dict(self.weight_buffers[0])

    def _unwrap_megatron_model(self, model):
        unwrapped = []
        for chunk in model:
            first_key = next(iter(dict(chunk.named_parameters())))
            while first_key.startswith("module."):
                chunk = chunk.module
                first_key = first_key[len("module.") :]
            targets = self.model_config.lora_target_modules
            if isinstance(targets, list) and len(targets) > 0:
                chunk = chunk.base_model.model
            unwrapped.append(chunk)
        return unwrapped

    def _name_pairs(self):
        names = self.weight_adaptor.convert_weight_name_meta(self.weight_names_per_pp[0])
        return sorted(
            {
                (name, vpp, self.weight_adaptor.replace_name_i2t(self.weight_adaptor.global2local_layer(name, [0])))
                for vpp, per_vpp in enumerate(names)
                for name in per_vpp
            }
        )

    def _megatron_params(self):
        model = self._unwrap_megatron_model(self.megatron_model)
        params = []
        for vpp in range(self._vpp_size):
            named = dict(model[vpp].named_buffers())
            named.update(model[vpp].named_parameters())
            params.append(self.weight_adaptor.adjust_megatron_param_dict(named, self._tp_size))
        return params

    @staticmethod
    def _copy_raw(buffer, param):
        buffer.view(param.shape).copy_(param)

    def _update_weight_buffers_intra_pp(self):
        buffers = self.weight_buffers[0]
        params = self._megatron_params()
        for hf_name, vpp, megatron_name in self._name_pairs():
            if (self._infer_ep_size > 1 or self._ep_size > 1) and "mlp.experts" in megatron_name:
                continue
            param = params[vpp][megatron_name]
            self._copy_raw(buffers[hf_name], param)
            if self.model_config.lora_target_modules and ".base_layer.weight" in megatron_name:
                lora_a = params[vpp][megatron_name.replace(".base_layer", ".lora_A.default")]
                lora_b = params[vpp][megatron_name.replace(".base_layer", ".lora_B.default")]
                with torch.no_grad():
                    delta = (self.model_config.lora_alpha / self.model_config.lora_r) * torch.matmul(lora_b, lora_a)
                    merged = buffers[hf_name].view(param.shape) + delta
                    self._copy_raw(buffers[hf_name], merged)

    def _update_weight_buffers_ep(self):
        buffers = self.weight_buffers[0]
        params = self._megatron_params()
        for hf_name, vpp, megatron_name in self._name_pairs():
            if (self._infer_ep_size > 1 or self._ep_size > 1) and "mlp.experts" in megatron_name:
                self._copy_raw(buffers[hf_name], params[vpp][megatron_name])
