import pytest
import torch

from mindspeed_rl_r3.aqn.quantize import (
    FP4_E2M1_GRID,
    fake_quant_int4,
    fake_quant_nvfp4,
    fake_quantize_state,
    round_to_fp4,
)


def test_fp4_rounding_hits_the_e2m1_grid():
    x = torch.tensor([0.24, 0.26, 0.74, 0.76, 1.3, 2.6, 3.4, 5.1, 7.0, -2.4, 0.0])
    assert round_to_fp4(x).tolist() == [0.0, 0.5, 0.5, 1.0, 1.5, 3.0, 3.0, 6.0, 6.0, -2.0, 0.0]


def test_nvfp4_blocks_are_scaled_grids_and_idempotent():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.02
    q = fake_quant_nvfp4(w)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.equal(fake_quant_nvfp4(q), q)
    block = q[0, :16]
    scale = block.abs().max() / 6.0
    grid = torch.tensor(FP4_E2M1_GRID)
    assert torch.isclose((block.abs() / scale).unsqueeze(-1), grid, atol=1e-5).any(-1).all()
    assert 0.02 < float((q - w).norm() / w.norm()) < 0.2
    assert torch.equal(fake_quant_nvfp4(torch.zeros(2, 16)), torch.zeros(2, 16))


def test_int4_groups_use_sixteen_levels():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    q = fake_quant_int4(w)
    for g in range(2):
        group = q[0, g * 32 : (g + 1) * 32]
        levels = group / (w[0, g * 32 : (g + 1) * 32].abs().max() / 7)
        assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() >= -8 and levels.max() <= 7
    assert torch.equal(fake_quant_int4(q), q)


def test_state_quantization_selects_by_name_and_refuses_bad_shapes():
    state = {"a.q_proj.weight": torch.randn(4, 32), "norm.weight": torch.ones(32)}
    out, stats = fake_quantize_state(state, "int4", lambda n: n.endswith("proj.weight"))
    assert out["norm.weight"] is state["norm.weight"] and stats["quantized_tensors"] == 1
    assert 0 < stats["relative_error"] < 0.3
    with pytest.raises(ValueError, match="multiple of 16"):
        fake_quant_nvfp4(torch.randn(4, 20))
    with pytest.raises(ValueError, match="no tensor selected"):
        fake_quantize_state(state, "nvfp4", lambda n: False)
