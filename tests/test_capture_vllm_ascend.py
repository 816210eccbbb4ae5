"""Capture adapter against fakes of vllm-ascend v0.11.0-dev (MoE layer with DP all-gather prepare, model runner)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.routing import MoEModelSpec, RoutingError

FAKES = str(Path(__file__).parent / "fakes")
SPEC = MoEModelSpec(num_layers=3, topk=2, num_experts=8)
BLOCK = 4
HIDDEN = 16


@pytest.fixture
def vllm_ascend(monkeypatch):
    monkeypatch.syspath_prepend(FAKES)
    for name in [m for m in sys.modules if m.split(".")[0] == "vllm_ascend"]:
        sys.modules.pop(name)
    from mindspeed_rl_r3.patches import vllm_ascend_capture

    yield vllm_ascend_capture
    vllm_ascend_capture.undo()
    vllm_ascend_capture.CaptureSession.stop()
    for name in [m for m in sys.modules if m.split(".")[0] == "vllm_ascend"]:
        sys.modules.pop(name)


class TinyMoEModel(torch.nn.Module):
    """Embedding, then per layer: router logits and a residual AscendFusedMoE."""

    def __init__(self):
        super().__init__()
        from vllm_ascend.ops.common_fused_moe import AscendFusedMoE

        g = torch.Generator().manual_seed(0)
        self.embed = torch.randn(64, HIDDEN, generator=g)
        self.gates = [torch.randn(HIDDEN, SPEC.num_experts, generator=g) for _ in range(SPEC.num_layers)]
        self.experts = torch.nn.ModuleList(
            AscendFusedMoE(
                num_experts=SPEC.num_experts,
                top_k=SPEC.topk,
                hidden_size=HIDDEN,
                intermediate_size=HIDDEN,
                renormalize=True,
                prefix=f"model.layers.{i}.mlp.experts",
            )
            for i in range(SPEC.num_layers)
        )

    def forward(self, ids, record=None):
        h = self.embed[ids]
        for i, layer in enumerate(self.experts):
            logits = h @ self.gates[i]
            if record is not None:
                record.append(logits.softmax(-1).topk(SPEC.topk, dim=-1).indices)
            h = h + layer(h, logits)
        return h


class Scheduler:
    """Chunked prefill then decode for a few requests; finished blocks are handed to the next request."""

    def __init__(self, runner, prompts: dict[str, list[int]], new_tokens: int):
        self.runner, self.prompts, self.new = runner, prompts, new_tokens
        self.free = list(range(32))
        self.state = {}  # req_id -> [tokens, blocks, computed]
        self.done: dict[str, list[int]] = {}

    def run(self, chunk=5, max_running=2):
        waiting = list(self.prompts)
        finished: set[str] = set()
        while waiting or self.state:
            new_reqs, sched = [], {}
            while waiting and len(self.state) < max_running:
                rid = waiting.pop(0)
                blocks = [self.free.pop(0) for _ in range(4)]
                self.state[rid] = [list(self.prompts[rid]), blocks, 0]
                new_reqs.append(
                    SimpleNamespace(
                        req_id=rid, prompt_token_ids=self.prompts[rid], block_ids=blocks, num_computed_tokens=0
                    )
                )
            cached = {}
            for rid, (tokens, blocks, computed) in self.state.items():
                sched[rid] = min(chunk, len(tokens) - computed)
                if rid not in [r.req_id for r in new_reqs]:
                    cached[rid] = (tokens[len(self.prompts[rid]) :], blocks, computed)
            out = SimpleNamespace(
                total_num_scheduled_tokens=sum(sched.values()),
                num_scheduled_tokens=sched,
                finished_req_ids=finished,
                scheduled_new_reqs=new_reqs,
                scheduled_cached_reqs=cached,
            )
            self.runner.execute_model(out)
            finished = set()
            for rid in list(self.state):
                tokens, blocks, computed = self.state[rid]
                computed += sched[rid]
                self.state[rid][2] = computed
                if computed == len(tokens):
                    if len(tokens) - len(self.prompts[rid]) == self.new:
                        self.done[rid] = tokens
                        finished.add(rid)
                        self.free = blocks + self.free  # reused first by the next request
                        del self.state[rid]
                    else:
                        tokens.append((sum(tokens) * 7 + computed) % 64)
        return finished


def test_traces_match_the_routing_of_the_forward(vllm_ascend):
    from vllm_ascend.worker.model_runner_v1 import NPUModelRunner

    model = TinyMoEModel()
    runner = NPUModelRunner(model, BLOCK)
    assert vllm_ascend.apply() == [
        "vllm_ascend.ops.common_fused_moe.AscendFusedMoE.forward_impl",
        "vllm_ascend.worker.model_runner_v1.NPUModelRunner.execute_model",
    ]
    assert vllm_ascend.apply() == []  # idempotent
    vllm_ascend.CaptureSession.start(SPEC, max_tokens=64, num_slots=32 * BLOCK, block_size=BLOCK, device="cpu")
    vllm_ascend.CaptureSession.enabled = True
    prompts = {"0_7": [3, 9, 27, 14, 5, 6, 1], "1_7": [3, 9, 27, 14, 5, 6, 1], "8": [11, 12, 13], "9": [40, 41, 42, 43]}
    scheduler = Scheduler(runner, prompts, new_tokens=4)
    last_finished = scheduler.run()
    recorder = vllm_ascend.CaptureSession.recorder
    recorder.begin_step(last_finished)
    for rid, tokens in scheduler.done.items():
        trace = recorder.pop_trace(rid, num_tokens=len(tokens), prompt_len=len(prompts[rid]))
        record: list[torch.Tensor] = []
        model(torch.tensor(tokens[:-1]), record=record)
        for layer in range(SPEC.num_layers):
            assert torch.equal(trace.ids[:, layer].long().sort(-1).values, record[layer].sort(-1).values), (rid, layer)
    assert vllm_ascend.request_sample_index("1_7", first_request=7) == (0, 1)
    assert vllm_ascend.request_sample_index("8", first_request=7) == (1, 0)


def test_outputs_are_bit_identical_with_capture(vllm_ascend):
    model = TinyMoEModel()
    ids = torch.tensor([1, 5, 9, 33, 2])
    before = model(ids)
    vllm_ascend.apply()
    vllm_ascend.CaptureSession.start(SPEC, max_tokens=16, num_slots=64, block_size=BLOCK, device="cpu")
    assert torch.equal(model(ids), before)
    # The capture wraps the module-level binding the layer uses: rebinding it later is still seen.
    from vllm_ascend.ops import common_fused_moe

    calls = []
    original = common_fused_moe.select_experts
    common_fused_moe.select_experts = lambda **kw: calls.append(1) or original(**kw)
    model(ids)
    assert len(calls) == 2 * SPEC.num_layers  # the layer's own selection and the capture's
    common_fused_moe.select_experts = original


def test_missing_targets_and_torchair_are_refused(vllm_ascend, monkeypatch):
    from vllm_ascend import ascend_config
    from vllm_ascend.ops import common_fused_moe

    monkeypatch.setattr(ascend_config._config.torchair_graph_config, "enabled", True)
    with pytest.raises(RoutingError, match="torchair graph mode"):
        vllm_ascend.apply()
    monkeypatch.setattr(ascend_config._config.torchair_graph_config, "enabled", False)
    monkeypatch.delattr(common_fused_moe.AscendFusedMoE, "forward_impl")
    report = {r["name"]: r for r in vllm_ascend.check()}
    assert report["vllm_ascend.ops.common_fused_moe.AscendFusedMoE.forward_impl"]["found"] is False
    assert report["vllm_ascend.ops.common_fused_moe.select_experts"]["compatible"] is True
    with pytest.raises(RoutingError, match=r"targets not found.*AscendFusedMoE\.forward_impl"):
        vllm_ascend.apply()


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


def test_v091_layout_captures_through_mindspeed_rl_binding(vllm_ascend, monkeypatch):
    import mindspeed_rl.models.rollout.vllm_adapter.fused_moe as msrl_fused_moe
    from vllm_ascend.ops.fused_moe import AscendFusedMoE

    layer = AscendFusedMoE(
        num_experts=8, top_k=2, hidden_size=HIDDEN, intermediate_size=HIDDEN, prefix="model.layers.0.mlp.experts"
    )
    x = torch.randn(5, HIDDEN)
    logits = torch.randn(5, 8)
    before = layer(x, logits, True)
    assert vllm_ascend.apply("0.9.1") == [
        "vllm_ascend.ops.fused_moe.AscendFusedMoE.forward",
        "vllm_ascend.worker.model_runner_v1.NPUModelRunner.execute_model",
    ]
    calls = []
    original = msrl_fused_moe.select_experts
    monkeypatch.setattr(msrl_fused_moe, "select_experts", lambda **kw: calls.append(1) or original(**kw))
    spec = MoEModelSpec(num_layers=1, topk=2, num_experts=8)
    vllm_ascend.CaptureSession.start(spec, max_tokens=8, num_slots=8, block_size=BLOCK, device="cpu")
    assert torch.equal(layer(x, logits, True), before)
    assert calls == [1]  # the capture used MindSpeed-RL's binding
    recorder = vllm_ascend.CaptureSession.recorder
    assert torch.equal(
        recorder.buffer[0, :5].long().sort(-1).values, logits.softmax(-1).topk(2).indices.sort(-1).values
    )
    with pytest.raises(RoutingError, match=r"no capture layout for vllm-ascend '0\.8'"):
        vllm_ascend.apply("0.8")
