"""Fake of ``mindspeed_llm/tasks/posttrain/lora/moe/experts.py::LoraParallelGroupedMLP`` at a2c0733, for CPU.

Same constructor ``(num_local_experts, config, lora_config)``, parameters, shapes, initialisation and forward
signature ``(permuted_local_hidden_states, tokens_per_expert, permuted_probs, ctx=None)`` as the real class; the
real one subclasses megatron's ``GroupedMLP`` and runs ``gg.ops.gmm`` (NPU grouped GEMM), here a loop over the
local experts computes the same "origin gemm" path (expert tensor parallel size 1, swiglu, no bias)::

    fc1 = x @ W1[e] + (x @ A1[e]) @ B1[e] * scaling
    h   = act(fc1) * probs
    out = h @ W2[e] + (h @ A2[e]) @ B2[e] * scaling

with ``W1 = weight1.view(E, H, -1)``, ``A1 = weight1_lora_a.view(E, -1, r)``, ``B1 = weight1_lora_b.view(E, r, -1)``,
``W2 = weight2.view(E, -1, H)``, ``A2 = weight2_lora_a.view(E, -1, r)``, ``B2 = weight2_lora_b.view(E, r, -1)``.
``weight1`` / ``weight2`` are frozen; ``scaling = lora_alpha / r``.
"""

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.nn.parameter import Parameter


class LoraParallelGroupedMLP(MegatronModule):
    def __init__(self, num_local_experts, config, lora_config):
        super().__init__(config=config)
        self.config = config
        self.num_local_experts = num_local_experts
        self.lora_r = lora_config.r
        self.scaling = lora_config.lora_alpha / self.lora_r
        if config.add_bias_linear:
            raise ValueError("bias not supported in Grouped GEMM yet, please set '--disable-bias-linear' instead.")
        self.expert_parallel = config.expert_model_parallel_size > 1
        if config.gated_linear_unit:
            if config.activation_func not in (F.silu, F.gelu):
                raise ValueError("Activation function must be silu or gelu when using GroupedMLP.")

            def glu(x):
                x = torch.chunk(x, 2, dim=-1)
                return config.activation_func(x[0]) * x[1]

            self.activation_func = glu
        else:
            self.activation_func = config.activation_func

        hidden, ffn, experts, r = config.hidden_size, config.moe_ffn_hidden_size, num_local_experts, self.lora_r
        fc1_out = ffn * experts * (2 if config.gated_linear_unit else 1)
        fc2_in = ffn * experts
        dtype = config.params_dtype
        self.weight1 = Parameter(torch.empty(hidden, fc1_out, dtype=dtype))
        self.weight2 = Parameter(torch.empty(fc2_in, hidden, dtype=dtype))
        config.init_method(self.weight1)
        config.output_layer_init_method(self.weight2)
        for w in (self.weight1, self.weight2):
            w.allreduce = not self.expert_parallel
        self.weight1_lora_a = Parameter(torch.empty(hidden, r * experts, dtype=dtype))
        self.weight1_lora_b = Parameter(torch.empty(r, fc1_out, dtype=dtype))
        self.weight2_lora_a = Parameter(torch.empty(fc2_in, r, dtype=dtype))
        self.weight2_lora_b = Parameter(torch.empty(r * experts, hidden, dtype=dtype))
        self.weight1.requires_grad = False
        self.weight2.requires_grad = False

        # A is kaiming-uniform per expert in its (E, in, r) layout, B is zero: the adapter starts as a no-op.
        weight1_a = torch.zeros(experts, hidden, r, dtype=dtype)
        weight2_a = torch.zeros(experts, fc2_in // experts, r, dtype=dtype)
        for i in range(experts):
            torch.nn.init.kaiming_uniform_(weight1_a[i].t(), a=math.sqrt(5))
            torch.nn.init.kaiming_uniform_(weight2_a[i].t(), a=math.sqrt(5))
        self.weight1_lora_a.data = weight1_a.view(self.weight1_lora_a.shape)
        self.weight2_lora_a.data = weight2_a.view(self.weight2_lora_a.shape)
        torch.nn.init.zeros_(self.weight1_lora_b)
        torch.nn.init.zeros_(self.weight2_lora_b)
        self.weight1_lora_b.allreduce = not self.expert_parallel
        self.weight2_lora_a.allreduce = not self.expert_parallel

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, ctx=None):
        experts, hidden, r = self.num_local_experts, self.config.hidden_size, self.lora_r
        w1 = self.weight1.view(experts, hidden, -1)
        w2 = self.weight2.view(experts, -1, hidden)
        w1_a = self.weight1_lora_a.view(experts, -1, r)
        w1_b = self.weight1_lora_b.view(experts, r, -1)
        w2_a = self.weight2_lora_a.view(experts, -1, r)
        w2_b = self.weight2_lora_b.view(experts, r, -1)
        counts = [int(c) for c in tokens_per_expert.tolist()]
        rows = torch.split(permuted_local_hidden_states, counts)
        probs = torch.split(permuted_probs.unsqueeze(-1), counts)
        outputs = []
        for e, (x, p) in enumerate(zip(rows, probs, strict=True)):
            fc1 = x @ w1[e]
            mm1_b = ((x @ w1_a[e]) @ w1_b[e]) * self.scaling
            h = (self.activation_func(fc1 + mm1_b) * p).to(x.dtype)
            mm2_b = ((h @ w2_a[e]) @ w2_b[e]) * self.scaling
            outputs.append(h @ w2[e] + mm2_b)
        return torch.cat(outputs), None
