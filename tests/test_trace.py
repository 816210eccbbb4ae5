import numpy as np
import pytest
import torch

from mindspeed_rl_r3.routing import MoEModelSpec, RoutingError, RoutingTrace, validate_batch, validate_trace
from tests.routing_data import random_trace

SPEC = MoEModelSpec(num_layers=4, topk=3, num_experts=16)


def test_negative_ids_become_the_missing_marker_not_expert_zero():
    ids = torch.tensor([[[1, 2, 3]], [[-1, -1, -1]]])
    trace = RoutingTrace.from_ids(ids, 16)
    assert trace.ids.dtype == torch.uint8
    assert trace.missing().tolist() == [[False], [True]]
    assert trace.to_int64()[1].tolist() == [[-1, -1, -1]]
    wide = RoutingTrace.from_ids(ids, 300)
    assert wide.ids.dtype == torch.int16 and wide.missing().tolist() == [[False], [True]]


def test_from_ids_rejects_out_of_range_and_floats():
    with pytest.raises(RoutingError, match=r"\[0, 16\)"):
        RoutingTrace.from_ids(torch.tensor([[[1, 2, 16]]]), 16)
    with pytest.raises(RoutingError, match="integers"):
        RoutingTrace.from_ids(torch.zeros(1, 1, 3), 16)
    with pytest.raises(RoutingError, match=r"must be torch\.uint8, got torch\.int64"):
        RoutingTrace(torch.zeros(1, 1, 3, dtype=torch.int64), 16)
    with pytest.raises(RoutingError, match=r"\[rows, layers, topk\]"):
        RoutingTrace(torch.zeros(1, 3, dtype=torch.uint8), 16)
    with pytest.raises(RoutingError, match="int16 trace limit"):
        RoutingTrace.from_ids(np.zeros((1, 1, 1), dtype=np.int64), 40000)


def test_validate_accepts_good_traces():
    trace = random_trace(29, 4, 3, 16, missing=0.2, prompt_len=10)
    validate_trace(trace, SPEC, sample_index=0, prompt_len=10, response_len=20)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda ids: ids.__setitem__((4, 2), torch.tensor([7, 7, 1], dtype=torch.uint8)),
            "layer 2 row 4 has duplicate",
        ),
        (lambda ids: ids.__setitem__((6, 1, 0), 200), r"layer 1 row 6 has ids \[200"),
        (lambda ids: ids.__setitem__((9, 3, 1), 255), "layer 3 row 9 mixes missing"),
    ],
)
def test_validate_names_sample_layer_and_row(edit, message):
    trace = random_trace(12, 4, 3, 16)
    ids = trace.ids.clone()
    edit(ids)
    with pytest.raises(RoutingError, match=f"sample 5: {message}"):
        validate_trace(RoutingTrace(ids, 16), SPEC, sample_index=5)


def test_validate_checks_model_and_lengths():
    trace = random_trace(12, 4, 3, 16, prompt_len=5)
    with pytest.raises(RoutingError, match=r"sample 1: trace has .* = \(4, 3, 16\), the model expects \(48, 8, 128\)"):
        validate_trace(trace, MoEModelSpec.qwen3_30b_a3b(), sample_index=1)
    with pytest.raises(RoutingError, match=r"expected 13 routing rows .* found 12"):
        validate_trace(trace, SPEC, prompt_len=5, response_len=9)
    with pytest.raises(RoutingError, match="prompt length 6 expected"):
        validate_trace(trace, SPEC, prompt_len=6, response_len=7)
    with pytest.raises(RoutingError, match="sample 1: expected 13"):
        validate_batch([trace, trace], SPEC, prompt_lens=[5, 5], response_lens=[8, 9])
    with pytest.raises(RoutingError, match="2 traces for 1 prompt"):
        validate_batch([trace, trace], SPEC, prompt_lens=[5], response_lens=[8, 9])


def test_token_fingerprint_detects_retokenized_prompts():
    tokens = torch.tensor([151644, 872, 198, 3838, 374, 220, 17])
    trace = RoutingTrace.from_ids(random_trace(6, 4, 3, 16).ids, 16, prompt_len=4, token_ids=tokens)
    validate_trace(trace, SPEC, token_ids=tokens.tolist())
    with pytest.raises(RoutingError, match="different tokens"):
        validate_trace(trace, SPEC, sample_index=3, token_ids=torch.tensor([872, 198, 3838, 374, 220, 17, 0]))


def test_spec_from_hf_config_skips_dense_layers():
    spec = MoEModelSpec.from_hf_config(
        {"num_hidden_layers": 6, "num_experts": 64, "num_experts_per_tok": 8, "mlp_only_layers": [0, 3]}
    )
    assert spec.moe_layers == (1, 2, 4, 5) and spec.num_moe_layers == 4
    assert MoEModelSpec.qwen3_30b_a3b().num_moe_layers == 48
    with pytest.raises(RoutingError, match="topk"):
        MoEModelSpec(num_layers=2, topk=9, num_experts=8)
