"""The routing-capture adapter against the real vllm-ascend v0.11.0-dev (1b16c01) classes: it installs on the real
``AscendFusedMoE.forward_impl`` / ``NPUModelRunner.execute_model`` and records, through the real ``select_experts``
(``ops/moe/experts_selector.py``), the ids the layer's own ``quant_method.apply`` selects.

A real ``AscendFusedMoE`` is built without ``FusedMoE.__init__`` (which needs a running vLLM engine: config, TP / DP /
EP groups), with the routing attributes that constructor sets. The device ops are the CPU backend's
``torch_npu.npu_moe_gating_top_k_softmax`` and :class:`OneRankMoEComm` below, which stands in for the forward
context's ``moe_comm_method`` (AllGather / MC2 token exchange plus the NPU grouped-matmul experts).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mindspeed_rl_r3.routing import MoEModelSpec, RoutingError

SPEC = MoEModelSpec(num_layers=2, topk=2, num_experts=8)
HIDDEN, FFN, PAD = 16, 8, 3
FORWARD_IMPL = "vllm_ascend.ops.common_fused_moe.AscendFusedMoE.forward_impl"
EXECUTE_MODEL = "vllm_ascend.worker.model_runner_v1.NPUModelRunner.execute_model"
CAPTURE_MODEL = "vllm_ascend.worker.model_runner_v1.NPUModelRunner.capture_model"


class OneRankMoEComm:
    """``moe_comm_method`` of one rank: ``prepare`` pads the rows as AllGather pads to ``max_tokens_across_dp``,
    ``fused_experts`` runs the swiglu experts on the CPU (``w13 [E, H, 2I]``, ``w2 [E, I, H]``), ``finalize`` drops
    the padding. The selected ids it receives are kept, so tests can compare them with what was captured."""

    def __init__(self) -> None:
        self.selected: list[torch.Tensor] = []

    def prepare(self, hidden_states, router_logits, **_: Any):
        return torch.nn.functional.pad(hidden_states, (0, 0, 0, PAD)), torch.nn.functional.pad(
            router_logits, (0, 0, 0, PAD)
        )

    def fused_experts(self, hidden_states, w1, w2, topk_weights, topk_ids, **_: Any):
        self.selected.append(topk_ids.clone())
        out = torch.zeros_like(hidden_states)
        for j in range(topk_ids.shape[1]):
            e = topk_ids[:, j].long()
            gate, up = torch.einsum("th,thf->tf", hidden_states, w1[e]).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
            out += topk_weights[:, j : j + 1] * torch.einsum("tf,tfh->th", h, w2[e])
        return out

    def finalize(self, hidden_states, reduce_results):
        return hidden_states[:-PAD]


@pytest.fixture
def capture(upstream_sources, monkeypatch):
    """The adapter with a real vllm-ascend config (no torchair) installed; everything undone afterwards."""
    from vllm.config import VllmConfig
    from vllm_ascend import ascend_config

    from mindspeed_rl_r3.patches import vllm_ascend_capture

    monkeypatch.setattr(ascend_config, "_ASCEND_CONFIG", ascend_config.AscendConfig(VllmConfig(additional_config={})))
    yield vllm_ascend_capture
    vllm_ascend_capture.undo()
    vllm_ascend_capture.CaptureSession.release()


@contextlib.contextmanager
def _forward_context(comm: OneRankMoEComm):
    from vllm.forward_context import override_forward_context

    context = SimpleNamespace(moe_comm_method=comm, weight_prefetch_method=None, in_profile_run=False, sp_enabled=False)
    with override_forward_context(context):
        yield


def _layer(index: int, seed: int):
    """A real ``AscendFusedMoE`` of decoder layer ``index`` with the unquantized method's routing settings."""
    from vllm_ascend.ops.common_fused_moe import AscendFusedMoE, AscendUnquantizedFusedMoEMethod

    g = torch.Generator().manual_seed(seed)
    layer = AscendFusedMoE.__new__(AscendFusedMoE)
    torch.nn.Module.__init__(layer)
    method = AscendUnquantizedFusedMoEMethod.__new__(AscendUnquantizedFusedMoEMethod)
    method.use_aclgraph = method.dynamic_eplb = False
    settings = dict(
        quant_method=method, top_k=SPEC.topk, renormalize=True, use_grouped_topk=False, topk_group=None,
        num_expert_group=None, custom_routing_function=None, scoring_func="softmax", e_score_correction_bias=None,
        global_num_experts=SPEC.num_experts, expert_map=None, log2phy=None, global_redundant_expert_num=0,
        activation="silu", apply_router_weight_on_input=False, dynamic_eplb=False, enable_shared_expert_dp=False,
        reduce_results=True, layer_name=f"model.layers.{index}.mlp.experts",
        w13_weight=torch.randn(SPEC.num_experts, HIDDEN, 2 * FFN, generator=g) / 4,
        w2_weight=torch.randn(SPEC.num_experts, FFN, HIDDEN, generator=g) / 4,
    )  # fmt: skip
    for name, value in settings.items():
        object.__setattr__(layer, name, value)
    return layer


def _run(layers, x, logits, comm):
    with _forward_context(comm), torch.no_grad():
        return [layer.forward_impl(x, logits[i]) for i, layer in enumerate(layers)]


def test_capture_installs_on_the_real_classes(capture):
    from vllm_ascend.ops.common_fused_moe import AscendFusedMoE
    from vllm_ascend.worker.model_runner_v1 import NPUModelRunner

    originals = AscendFusedMoE.forward_impl, NPUModelRunner.execute_model, NPUModelRunner.capture_model
    rows = capture.check()
    assert all(r["found"] and r["compatible"] for r in rows), rows
    assert capture.apply() == [FORWARD_IMPL, EXECUTE_MODEL, CAPTURE_MODEL]
    assert capture.apply() == []  # idempotent
    assert AscendFusedMoE.forward_impl.__wrapped__ is originals[0]
    assert NPUModelRunner.execute_model.__wrapped__ is originals[1]
    assert NPUModelRunner.capture_model.__wrapped__ is originals[2]
    assert sorted(capture.undo()) == sorted([FORWARD_IMPL, EXECUTE_MODEL, CAPTURE_MODEL])
    assert (AscendFusedMoE.forward_impl, NPUModelRunner.execute_model, NPUModelRunner.capture_model) == originals


def test_capture_records_the_ids_the_layer_selects(capture):
    g = torch.Generator().manual_seed(1)
    layers = [_layer(i, seed=i) for i in range(SPEC.num_layers)]
    x = torch.randn(5, HIDDEN, generator=g)
    logits = torch.randn(SPEC.num_layers, 5, SPEC.num_experts, generator=g)
    native = OneRankMoEComm()
    before = _run(layers, x, logits, native)

    capture.apply()
    capture.CaptureSession.start(SPEC, max_tokens=16, num_slots=64, block_size=4, device="cpu")
    captured = OneRankMoEComm()
    after = _run(layers, x, logits, captured)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # outputs bit-identical
    buffer = capture.CaptureSession.recorder.buffer
    for i in range(SPEC.num_layers):
        # the step's 5 rows, before prepare() padded them; the same ids the layer's own apply() selected
        assert torch.equal(buffer[i, :5].long(), captured.selected[i][:5].long()), i
        assert torch.equal(buffer[i, :5].long().sort(-1).values, logits[i].topk(SPEC.topk).indices.sort(-1).values)


def test_capture_under_graph_replay_of_the_real_layer(capture):
    """The real ``AscendFusedMoE.forward_impl`` with the capture, recorded once per batch size with the CPU graph
    stand-in (Python runs at capture only) inside vllm-ascend's forward context, then replayed on new rows: each
    replay writes the ids the layer's own ``apply()`` selects into the buffer reserved before capture, and the
    graphs keep writing into it after the slot store is re-created."""
    from mindspeed_rl_r3.bench.graph_replay import GraphReplay

    layers = [_layer(i, seed=i) for i in range(SPEC.num_layers)]
    capture.apply()
    capture.CaptureSession.reserve(SPEC, max_tokens=16, device="cpu")  # what capture_model's wrapper does
    comm = OneRankMoEComm()

    def forward(x, logits):
        return sum(layer.forward_impl(x, logits[i]) for i, layer in enumerate(layers))

    graphs = GraphReplay(forward, sizes=(1, 2, 4, 8))
    with _forward_context(comm):
        graphs.capture(lambda size: (torch.randn(size, HIDDEN), torch.randn(SPEC.num_layers, size, SPEC.num_experts)))
    capture.CaptureSession.graphs_captured = True
    buffer = capture.CaptureSession.buffer
    g = torch.Generator().manual_seed(3)
    for call in range(2):  # two generate calls, the slot store re-created in between
        capture.CaptureSession.start(SPEC, max_tokens=16, num_slots=64, block_size=4, device="cpu")
        assert capture.CaptureSession.recorder.buffer is buffer
        for size in (1, 2, 4, 8):
            x = torch.randn(size, HIDDEN, generator=g)
            logits = torch.randn(SPEC.num_layers, size, SPEC.num_experts, generator=g)
            buffer.fill_(255)
            graphs(x, logits)  # replay: no Python of the wrapper or the layer runs
            replayed = buffer[:, :size].clone()
            selected = OneRankMoEComm()
            _run(layers, x, logits, selected)  # eager, for the ids the layer's own apply() selects
            for i in range(SPEC.num_layers):
                assert torch.equal(replayed[i].long(), selected.selected[i][:size].long()), (call, size, i)
                expected = logits[i].topk(SPEC.topk).indices.sort(-1).values
                assert torch.equal(replayed[i].long().sort(-1).values, expected), (call, size, i)
    assert graphs.replays == 8 and graphs.eager_runs == 0


def test_the_real_capture_model_reserves_the_buffer_before_any_graph(capture, monkeypatch):
    """The wrapped real ``NPUModelRunner.capture_model`` reserves the buffer (sized by the engine's token budget or
    largest graph, plus slack) before its ``_capture_model`` captures anything, and pins it afterwards."""
    from vllm_ascend.worker.model_runner_v1 import NPUModelRunner

    hf_config = {"num_hidden_layers": SPEC.num_layers, "num_experts": 8, "num_experts_per_tok": SPEC.topk}
    runner = object.__new__(NPUModelRunner)
    runner.device = torch.device("cpu")
    runner.vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf_config),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=64),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=[512, 256, 8, 4, 2, 1]),
    )
    seen = []
    monkeypatch.setattr(NPUModelRunner, "_capture_model", lambda self: seen.append(capture.CaptureSession.buffer))
    capture.apply()
    runner.capture_model()
    (buffer,) = seen
    assert buffer is capture.CaptureSession.buffer and capture.CaptureSession.graphs_captured
    assert tuple(buffer.shape) == (SPEC.num_layers, 512 + capture.CAPTURE_SLACK_TOKENS, SPEC.topk)
    capture.CaptureSession.stop()
    assert capture.CaptureSession.buffer is buffer  # graphs hold it: kept across stop()


def test_torchair_and_sequence_parallel_are_refused(capture, monkeypatch):
    from vllm.config import VllmConfig
    from vllm_ascend import ascend_config

    config = ascend_config.AscendConfig(VllmConfig(additional_config={}))
    monkeypatch.setattr(config.torchair_graph_config, "enabled", True)
    monkeypatch.setattr(ascend_config, "_ASCEND_CONFIG", config)
    with pytest.raises(RoutingError, match="torchair graph mode"):
        capture.apply()
    monkeypatch.setattr(config.torchair_graph_config, "enabled", False)
    capture.apply()
    capture.CaptureSession.start(SPEC, max_tokens=16, num_slots=64, block_size=4, device="cpu")
    comm = OneRankMoEComm()
    context = SimpleNamespace(moe_comm_method=comm, weight_prefetch_method=None, in_profile_run=False, sp_enabled=True)
    from vllm.forward_context import override_forward_context

    with override_forward_context(context), pytest.raises(RoutingError, match="sequence parallelism"):
        _layer(0, seed=0).forward_impl(torch.randn(5, HIDDEN), torch.randn(5, SPEC.num_experts))


def test_the_v091_layout_is_absent_from_the_pinned_tree(capture):
    """MindSpeed-RL 2.3.0's vllm-ascend line kept the MoE layer in ``ops/fused_moe.py``; 1b16c01 has no such module,
    so that layout reports its targets missing and refuses to attach."""
    rows = {r["name"]: r for r in capture.check("0.9.1")}
    assert rows["vllm_ascend.ops.fused_moe.AscendFusedMoE.forward"]["found"] is False
    with pytest.raises(RoutingError, match=r"targets not found.*ops\.fused_moe\.AscendFusedMoE\.forward"):
        capture.apply("0.9.1")


def test_with_r3_the_engine_installs_capture_before_it_builds_vllm(capture, integration, monkeypatch):
    """The patched ``VLLMInferEngine.__init__`` installs the adapter before the original body builds the ``LLM``
    (and so before any graph capture); without R3 it installs nothing. (On the CPU backend, as in this session, the
    rollout patch attaches vLLM's own adapter instead: here it is told it runs on NPUs.)"""
    from mindspeed_rl.models.rollout.vllm_engine import VLLMInferEngine

    from mindspeed_rl_r3.patches import mindspeed_rl_rollout

    monkeypatch.setattr(mindspeed_rl_rollout, "loaded_cpu_backend", lambda: None)
    integration()
    assert getattr(VLLMInferEngine.__init__, mindspeed_rl_rollout.PATCHES.mark, False)
    seen: list[list[str]] = []
    body = mindspeed_rl_rollout.engine_init_capture_wrapper(
        lambda self, *args, **kwargs: seen.append(sorted(capture.PATCHES.installed))
    )
    body(object(), "tokenizer")
    assert {FORWARD_IMPL, EXECUTE_MODEL, CAPTURE_MODEL} <= set(seen[0])


def test_without_r3_the_engine_installs_no_capture(capture, integration):
    from mindspeed_rl_r3.integration.runtime import active
    from mindspeed_rl_r3.patches import mindspeed_rl_rollout

    integration({"r3": {"mode": "disabled"}, "aqn": {"enabled": True}})
    seen: list[tuple[bool, list[str]]] = []
    body = mindspeed_rl_rollout.engine_init_capture_wrapper(
        lambda self, *args, **kwargs: seen.append((active() is not None, list(capture.PATCHES.installed)))
    )
    body(object(), "tokenizer")
    assert seen == [(True, [])]  # the integration is active (AQN), and no capture was installed


def test_on_the_cpu_backend_the_engine_installs_vllms_own_adapter(capture, integration):
    """A CPU run's engine is vLLM's own ``FusedMoE`` / ``GPUModelRunner``: the rollout patch attaches
    :mod:`mindspeed_rl_r3.patches.vllm_capture` there, and nothing on vllm-ascend's classes."""
    from mindspeed_rl_r3.patches import mindspeed_rl_rollout, vllm_capture

    integration()
    assert mindspeed_rl_rollout.loaded_cpu_backend() is not None
    body = mindspeed_rl_rollout.engine_init_capture_wrapper(lambda self, *args, **kwargs: None)
    body(object(), "tokenizer")
    assert sorted(vllm_capture.PATCHES.installed) == sorted(
        [f"{vllm_capture.LAYOUTS['0.11'].moe_class}.forward_impl", f"{vllm_capture.RUNNER_CLASS}.execute_model"]
    )
    assert capture.PATCHES.installed == []
