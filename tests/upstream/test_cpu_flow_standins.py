"""The CPU backend's answers to MindSpeed-RL's GRPO flow (``configs/cpu_tiny_grpo.yaml``), each against the real
upstream module it fixes up: they behave like the device where the flow depends on it."""

from __future__ import annotations

import importlib

import pytest
import torch

from mindspeed_rl_r3.patches import cpu_backend


def test_after_import_fixups_are_on_the_real_modules():
    for name in cpu_backend.AFTER_IMPORT:
        module = importlib.import_module(name)
        assert module.__spec__ is not None and not cpu_backend.is_standin(module), name
    from mindspeed.op_builder import AlgorithmOpBuilder

    assert callable(AlgorithmOpBuilder().load().reuse_data_ptr)


def test_mindspeed_gmm_is_a_grouped_matmul_with_gradients():
    from mindspeed.core.fusions.grouped_matmul import Ops

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=g, requires_grad=True)
    b = torch.randn(3, 4, 6, generator=g)
    counts = torch.tensor([2, 0, 3])
    out = Ops.gmm(a, b, counts, trans_b=False)
    expected = torch.cat([a[:2] @ b[0], a[2:] @ b[2]])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert a.grad is not None and a.grad.shape == a.shape


def test_reuse_data_ptr_aliases_the_buffer():
    from mindspeed.op_builder import AlgorithmOpBuilder

    reuse = AlgorithmOpBuilder().load().reuse_data_ptr
    buffer = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(2, 2)
    reuse(dst, buffer, 3)
    assert dst.tolist() == [[3.0, 4.0], [5.0, 6.0]]
    buffer[3] = -1.0  # one memory: the parameter follows the buffer, as the offloader needs
    assert dst[0, 0] == -1.0


def test_hccl_groups_are_gloo():
    created = {}
    real = lambda *a, **k: created.update(k)  # noqa: E731
    cpu_backend._gloo_for_hccl(real)([0], backend="hccl", pg_options=object())
    assert created == {"backend": "gloo"}
    cpu_backend._gloo_for_hccl(real)([0], backend="gloo")
    assert created == {"backend": "gloo"}


def test_vllm_cpu_layers_read_the_live_weights():
    """After MindSpeed-RL's sync re-points a parameter, vLLM's CPU linear and fused MoE compute with the new one."""
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.fused_moe import cpu_fused_moe

    layer = torch.nn.Linear(4, 3, bias=False)
    utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.numel() == 12  # kept: the sync writes into it
    layer.weight.data = torch.ones(3, 4)
    x = torch.ones(1, 4)
    torch.testing.assert_close(utils.cpu_unquantized_gemm(layer, x, layer.weight), torch.full((1, 3), 4.0))
    assert cpu_fused_moe.IPEXFusedMOE is cpu_fused_moe.CPUFusedMOE is cpu_fused_moe.SGLFusedMOE


def test_weight_load_self_copy_is_a_no_op_only_inside_the_load():
    from types import SimpleNamespace

    w = torch.arange(12.0).view(2, 3, 2)
    seen = {}

    def loader(weights):
        x = weights["w"]
        x.copy_(x.view(2, 2, 3).contiguous())  # qwen_megatron_weight_loader's re-layout of expert weights
        seen["w"] = x.clone()

    module = SimpleNamespace(load_megatron_weights=loader, update_megatron_weight_loader=lambda: None)
    cpu_backend._fix_megatron_weight_loaders(module)
    module.load_megatron_weights({"w": w})
    torch.testing.assert_close(seen["w"], torch.arange(12.0).view(2, 3, 2))  # the same bytes, as on the device
    with pytest.raises(RuntimeError, match="single memory location"):  # outside the load, torch's own rule
        w.copy_(w.view(2, 2, 3).contiguous())


def test_ray_local_cluster_declares_the_npus_the_workers_request():
    kwargs = cpu_backend.ray_local_cluster({"rl_config": {"actor_resource": {"num_npus": 2}}})
    assert kwargs["address"] == "local" and kwargs["resources"] == {"NPU": 2}
    assert kwargs["num_cpus"] >= 10  # MindSpeed-RL's TransferDock asks num_cpus=10


def test_bf16_optimizer_accepts_cpu_parameters():
    """megatron's Float16OptimizerWithFloat16Params takes only ``torch.cuda.*`` type names; Tensor.type is untouched
    outside its constructor."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(Exception) as info:  # gets past the type check, then needs a config
        Float16OptimizerWithFloat16Params(torch.optim.SGD([param], lr=0.1), None, None, None)
    assert "Wrapped parameters must be one of" not in str(info.value)
    assert param.type() == "torch.BFloat16Tensor"
