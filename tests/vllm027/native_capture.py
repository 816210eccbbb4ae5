"""Feeds vLLM 0.27's own routed-experts capturer on the CPU (test-side only, never in the package).

``GPUModelRunner._bind_routed_experts_capturer`` refuses CPU's monolithic MoE kernel (``CPUFusedMOE`` routes inside
one call and exposes no capture hook), and the router's own ``select_experts`` cannot run on the CPU either (it calls
``_moe_C.topk_softmax``, absent from the CPU build). The smallest feed keeps everything else vLLM's: each
``MoERunner``'s router gets vLLM's capture callback (``BaseRouter.set_capture_fn``, the hook modular kernels use),
and on the monolithic path that callback receives the softmax top-k of the layer's router logits (Qwen3-MoE's rule,
written here with plain torch, not through the selector the package's capture calls). vLLM's capturer, its
slot-indexed buffer, prefix-cache handling and per-request gathering into ``CompletionOutput.routed_experts`` are
untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


@contextlib.contextmanager
def native_capture_on_cpu() -> Iterator[None]:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def bind(self, capturer) -> None:
        for module in self.model.modules():
            if isinstance(module, MoERunner):
                module.router.set_capture_fn(lambda ids, _layer=module.layer_id: capturer.capture(_layer, ids))

    apply_quant_method = MoERunner._apply_quant_method

    def apply_with_router_capture(self, hidden_states, router_logits, shared_experts_input, input_ids=None):
        if self.routed_experts.quant_method.is_monolithic and self.router.capture_fn is not None:
            top_k = self.routed_experts.top_k
            self.router.capture_fn(router_logits.float().softmax(-1).topk(top_k, dim=-1).indices.to(torch.int32))
        return apply_quant_method(self, hidden_states, router_logits, shared_experts_input, input_ids)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GPUModelRunner, "_bind_routed_experts_capturer", bind)
        mp.setattr(MoERunner, "_apply_quant_method", apply_with_router_capture)
        yield
