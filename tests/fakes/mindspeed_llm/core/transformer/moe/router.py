"""Fake of ``mindspeed_llm/core/transformer/moe/router.py::topk_router_routing`` at a2c0733 (replaces
``TopKRouter.routing``): flatten to ``[-1, E]``, z-loss, SP-gather over TP with ``alltoall_seq``, the ``aux_loss``
type through Megatron's ``aux_loss_load_balancing`` with renormalisation under ``norm_topk_prob``, then the
``moe_tp_extend_ep`` split back to this TP rank. TP is 1 on CPU, so gather and split are identities here; the call
count lets tests see that this replacement, not Megatron's own routing, ran under the replay wrapper.
"""

import torch

calls = 0


def topk_router_routing(self, logits):
    global calls
    calls += 1
    logits = logits.view(-1, self.config.num_moe_experts)
    logits = self.apply_z_loss(logits)
    if self.routing_type != "aux_loss":
        raise NotImplementedError(f"fake supports aux_loss routing only, got {self.routing_type}")
    scores, routing_map = self.aux_loss_load_balancing(logits)
    if getattr(self.config, "norm_topk_prob", False):
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    if self.enable_expert_bias and torch.is_grad_enabled():
        with torch.no_grad():
            self.local_tokens_per_expert += routing_map.sum(dim=0)
    return scores, routing_map
