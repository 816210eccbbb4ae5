"""Native ``routed_experts`` (vLLM / vllm-ascend >= 0.15) to traces. The capture adapter runs against the real
vllm-ascend in tests/upstream/test_vllm_ascend_capture.py."""

import pytest

from mindspeed_rl_r3.routing import MoEModelSpec, RoutingError


def test_native_routed_experts_convert_to_traces():
    import numpy as np

    from mindspeed_rl_r3.patches.vllm_ascend_capture import trace_from_native

    spec = MoEModelSpec(num_layers=4, topk=2, num_experts=8, moe_layers=(1, 2, 3))  # layer 0 dense
    native = np.zeros((5, 4, 2), dtype=np.int32)
    native[:, 1:] = [[1, 4], [0, 3], [2, 7]]
    native[3, 2] = 0  # an unrecorded row
    trace = trace_from_native(native, spec, prompt_len=3)
    assert trace.num_layers == 3 and trace.rows == 5 and trace.prompt_len == 3
    assert trace.missing()[3].tolist() == [False, True, False]
    assert trace.ids[0].tolist() == [[1, 4], [0, 3], [2, 7]]
    with pytest.raises(RoutingError, match="expected \\[rows, 4 layers, 2\\]"):
        trace_from_native(native[:, :3], spec)
