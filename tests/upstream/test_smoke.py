import sys


def test_real_modules_and_standins(upstream_sources):
    import mindspeed_rl
    import torch_npu

    from mindspeed_rl_r3.patches import cpu_backend

    assert str(upstream_sources) in mindspeed_rl.__file__
    assert cpu_backend.is_standin(torch_npu)
    assert not any(cpu_backend.is_standin(m) for n, m in sys.modules.items() if n.startswith("torch_npu.npu_"))
