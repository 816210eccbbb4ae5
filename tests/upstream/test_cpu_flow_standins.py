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
    """After MindSpeed-RL's sync re-points a parameter, vLLM's CPU linear computes with the new one."""
    from vllm.model_executor.layers import utils

    layer = torch.nn.Linear(4, 3, bias=False)
    utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.numel() == 12  # kept: the sync writes into it
    layer.weight.data = torch.ones(3, 4)
    x = torch.ones(1, 4)
    torch.testing.assert_close(utils.cpu_unquantized_gemm(layer, x, layer.weight), torch.full((1, 3), 4.0))


def test_vllm_cpu_fused_moe_holds_experts_in_vllm_ascends_layout():
    """MindSpeed-RL's sync writes megatron's expert bytes into buffers shaped like the vLLM parameters, which are
    vllm-ascend's ``[E, hidden, 2 * ffn]`` / ``[E, ffn, hidden]``; the CPU kernel holds the same layout and computes
    what vLLM's own kernel computes on its ``[E, 2 * ffn, hidden]`` / ``[E, hidden, ffn]`` weights."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe import cpu_fused_moe

    experts, hidden, ffn = 4, 8, 6
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(experts, 2 * ffn, hidden, generator=g), torch.randn(experts, hidden, ffn, generator=g)
    x, logits = torch.randn(5, hidden, generator=g), torch.randn(5, experts, generator=g)
    call = dict(use_grouped_topk=False, top_k=2, router_logits=logits, renormalize=True, global_num_experts=experts)
    vllms_own = cpu_fused_moe.CPUFusedMOE.__mro__[1]
    expected = vllms_own(None)(SimpleNamespace(w13_weight=w13, w2_weight=w2), x, **call)

    layer = torch.nn.Module()
    layer.w13_weight, layer.w2_weight = torch.nn.Parameter(w13.clone()), torch.nn.Parameter(w2.clone())
    kernel = cpu_fused_moe.CPUFusedMOE(layer)  # built in process_weights_after_loading, before the sync's buffers
    assert layer.w13_weight.shape == (experts, hidden, 2 * ffn) and layer.w2_weight.shape == (experts, ffn, hidden)
    torch.testing.assert_close(kernel(layer, x, **call), expected)
    layer.w2_weight.data.zero_()  # a later sync writes in place: the kernel reads it
    torch.testing.assert_close(kernel(layer, x, **call), torch.zeros_like(expected))
    assert cpu_fused_moe.IPEXFusedMOE is cpu_fused_moe.CPUFusedMOE is cpu_fused_moe.SGLFusedMOE


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


def test_the_driver_gives_a_cpu_job_the_backends_workers_and_npus(monkeypatch):
    """``mindspeed-rl-r3 apply`` + MindSpeed-RL's script on the CPU backend: its plain ``ray.init(runtime_env=...)``
    starts a local cluster that declares the config's "NPU"s, and every worker gets the stand-ins first."""
    from mindspeed_rl_r3.integration.env import ENV_SECTIONS
    from mindspeed_rl_r3.patches import driver

    monkeypatch.setattr(cpu_backend, "_runs_jobs", True)  # what activate() sets; this session only imports upstream
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(ENV_SECTIONS, '{"r3": {"mode": "R3"}}')
    monkeypatch.setattr(driver, "_job_config", {"rl_config": {"actor_resource": {"num_npus": 2}}})
    seen = {}
    init = driver.ray_init_wrapper(lambda *args, **kwargs: seen.update(kwargs))
    init(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"}})
    env = seen["runtime_env"]
    assert env["worker_process_setup_hook"] == "mindspeed_rl_r3.patches.cpu_backend.ray_worker_setup"
    assert env["env_vars"][cpu_backend.ENV_UPSTREAM] == str(cpu_backend.upstream_root())
    assert env["env_vars"][ENV_SECTIONS] == '{"r3": {"mode": "R3"}}'
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"  # the config's own variables win
    assert seen["address"] == "local" and seen["resources"] == {"NPU": 2}
    seen.clear()
    init(address="ray://head:10001")  # joining a cluster: its resources are its own
    assert "resources" not in seen and seen["address"] == "ray://head:10001"


def test_the_entry_script_run_as_main_gets_the_cpu_initialize_megatron(tmp_path):
    import types

    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "cli" / "train_grpo.py")
    real = script.initialize_megatron = lambda **kwargs: kwargs
    cpu_backend.fix_entry_script(script)
    assert script.initialize_megatron.__wrapped__ is real
    assert script.initialize_megatron(config=1) == {"config": 1, "allow_no_cuda": True}
    cpu_backend.fix_entry_script(script)  # once only
    assert script.initialize_megatron.__wrapped__ is real
    other = types.ModuleType("__main__")
    other.__file__, other.initialize_megatron = str(tmp_path / "train.py"), real
    cpu_backend.fix_entry_script(other)
    assert other.initialize_megatron is real
