"""Routing capture under graph replay: the capture adapter's wrappers (``forward_impl``, ``execute_model``,
``capture_model`` of :mod:`mindspeed_rl_r3.patches.vllm_ascend_capture`) on a model runner whose MoE forward is a
captured graph (:class:`~mindspeed_rl_r3.bench.graph_replay.GraphReplay`: Python runs once per captured batch size,
replays run only the recorded tensor ops), driven by the simulated continuous-batching engine over random schedules
(prefix caching, chunked prefill, preemption, n > 1), through several generate calls with the KV cache freed and
re-created in between, as MindSpeed-RL does every iteration. Graphs are captured once, at the first cache
initialisation, before any rollout records.

Traces from replayed steps must equal the oracle row for row; and captures that decide in Python at capture time
(a recorder switch, a late install, a buffer replaced after capture) must fail.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mindspeed_rl_r3.bench.graph_replay import GraphReplay
from mindspeed_rl_r3.patches import vllm_ascend_capture as capture
from mindspeed_rl_r3.routing import RoutingError
from tests.sim_engine import BLOCK, SPEC, Engine, Request, add_requests, check_traces, oracle, run_to_completion

SIZES = (1, 2, 4, 8, 16)  # captured batch sizes; larger steps run eagerly
HIDDEN = 8
HF_CONFIG = {"num_hidden_layers": SPEC.num_layers, "num_experts": SPEC.num_experts, "num_experts_per_tok": SPEC.topk}


def select_experts(hidden_states, router_logits, top_k, **_):
    """The selector binding the capture calls: softmax top-k, ids in descending weight order."""
    weights, ids = router_logits.softmax(-1).topk(top_k)
    return weights, ids.to(torch.int32)


class MoELayer(torch.nn.Module):
    """An MoE layer with the routing attributes ``AscendFusedMoE`` carries; ``forward_impl`` mixes a few experts."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.layer_name = f"model.layers.{index}.mlp.experts"
        self.top_k, self.global_num_experts = SPEC.topk, SPEC.num_experts
        self.use_grouped_topk, self.renormalize, self.scoring_func = False, True, "softmax"
        self.topk_group = self.num_expert_group = self.custom_routing_function = self.e_score_correction_bias = None
        self.experts = torch.nn.Parameter(torch.randn(SPEC.num_experts, HIDDEN, HIDDEN) / 4, requires_grad=False)

    def forward_impl(self, hidden_states, router_logits):
        weights, ids = router_logits.softmax(-1).topk(self.top_k)
        mixed = torch.einsum("th,tkhg->tkg", hidden_states, self.experts[ids])
        return (weights.unsqueeze(-1) * mixed).sum(1)


def oracle_logits(tok: torch.Tensor, pos: torch.Tensor, layer: int) -> torch.Tensor:
    """Router logits whose top-k (in order) is ``oracle(tok, pos, layer)``: pure tensor ops, so a graph records them."""
    ids = oracle(tok, pos, layer)
    values = torch.arange(SPEC.topk, 0, -1, dtype=torch.float32).expand(ids.shape[0], -1)
    return torch.zeros(ids.shape[0], SPEC.num_experts).scatter(1, ids, values)


class Model(torch.nn.Module):
    def __init__(self, forward_impl) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(MoELayer(i) for i in range(SPEC.num_layers))
        self.forward_impl = forward_impl

    def forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden = torch.eye(HIDDEN)[tok % HIDDEN]
        for i, layer in enumerate(self.layers):
            hidden = hidden + self.forward_impl(layer, hidden, oracle_logits(tok, pos, i))
        return hidden


class Runner:
    """The attributes of vllm-ascend's ``NPUModelRunner`` the capture reads, and a graph-replayed forward."""

    def __init__(self, forward_impl, budget: int, num_blocks: int) -> None:
        torch.manual_seed(0)
        self.model = GraphReplay(Model(forward_impl), SIZES)
        self.device = torch.device("cpu")
        self.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(hf_config=HF_CONFIG),
            scheduler_config=SimpleNamespace(max_num_batched_tokens=budget),
            compilation_config=SimpleNamespace(cudagraph_capture_sizes=list(reversed(SIZES))),
        )
        self.num_slots, self.step_inputs, self.requests = num_blocks * BLOCK, None, {}

    def capture_model(self) -> None:
        """Graph capture, as in ``compile_or_warm_up_model``: dummy batches of every captured size."""
        self.model.capture(lambda size: (torch.randint(0, 50, (size,)), torch.randint(0, 64, (size,))))

    def execute_model(self, scheduler_output):
        tok, pos = self.step_inputs
        real = tok.shape[0]
        size = self.model.padded_size(real) or real
        pad = size - real  # padding rows compute garbage routing, as padded graph batches do
        self.model(torch.cat([tok, torch.randint(0, 50, (pad,))]), torch.cat([pos, torch.randint(0, 64, (pad,))]))


def install(runner_cls, forward_impl):
    """A runner class with the adapter's step and capture wrappers, and a forward_impl (wrapped or not)."""
    cls = type("CapturedRunner", (runner_cls,), {})
    cls.execute_model = capture.execute_model_capture_wrapper(runner_cls.execute_model)
    cls.capture_model = capture.capture_model_reserve_wrapper(runner_cls.capture_model)
    return cls, forward_impl


PACKAGE_CAPTURE = capture.forward_impl_capture_wrapper(MoELayer.forward_impl, lambda: select_experts)


class GraphEngine(Engine):
    """The simulated scheduler handing each step to the runner as vLLM's ``SchedulerOutput``."""

    def __init__(self, runner: Runner, rng: random.Random, budget: int, num_blocks: int, preempt_p: float) -> None:
        super().__init__(rng, num_blocks, budget, 1, preempt_p)
        self.runner = runner

    def execute(self, scheduled, tokens, positions, slots, finished) -> None:
        runner = self.runner
        req_ids = [req.rid for req, _ in scheduled]
        runner.input_batch = SimpleNamespace(
            req_ids=req_ids,
            block_table=[SimpleNamespace(slot_mapping_np=np.array(slots + [-1] * 4, dtype=np.int64))],
            num_computed_tokens_cpu=np.array([req.computed for req, _ in scheduled], dtype=np.int32),
        )
        runner.requests = {req.rid: SimpleNamespace(block_ids=(list(req.blocks),)) for req, _ in scheduled}
        runner.step_inputs = torch.tensor(tokens), torch.tensor(positions)
        output = SimpleNamespace(
            total_num_scheduled_tokens=len(tokens),
            num_scheduled_tokens={req.rid: n for req, n in scheduled},
            finished_req_ids=set(finished),
        )
        runner.execute_model(output)


@pytest.fixture(autouse=True)
def session():
    capture.CaptureSession.release()
    yield capture.CaptureSession
    capture.CaptureSession.release()


def start(runner: Runner, budget: int) -> None:
    """What ``start_capture`` does at each actor rollout: a slot store for the (re-created) KV cache, recording on."""
    spec = capture.MoEModelSpec.from_hf_config(HF_CONFIG)
    shape = dict(max_tokens=budget + capture.CAPTURE_SLACK_TOKENS, num_slots=runner.num_slots, block_size=BLOCK)
    if capture.CaptureSession.fits(spec, **shape, device="cpu"):
        capture.CaptureSession.recorder.reset()
    else:
        capture.CaptureSession.start(spec, **shape, device="cpu")
    capture.CaptureSession.enabled = True


def rollouts(runner: Runner, seed: int, budget: int, num_blocks: int, preempt_p: float, calls: int = 2) -> None:
    """``calls`` generate calls on one engine (graphs kept), the KV cache freed and re-created in between."""
    rng = random.Random(seed)
    for _ in range(calls):
        start(runner, budget)
        engine = GraphEngine(runner, rng, budget, num_blocks, preempt_p)
        add_requests(engine, rng)
        run_to_completion(engine)
        check_traces(engine, capture.CaptureSession.recorder)
        capture.CaptureSession.enabled = False  # validation generates between rollouts record nothing


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    budget=st.sampled_from([5, 16, 32]),
    preempt_p=st.sampled_from([0.0, 0.15]),
    num_blocks=st.sampled_from([24, 64]),
)
def test_graph_replayed_traces_equal_the_oracle(seed, budget, preempt_p, num_blocks):
    capture.CaptureSession.release()
    cls, forward_impl = install(Runner, PACKAGE_CAPTURE)
    runner = cls(forward_impl, budget, num_blocks)
    runner.capture_model()  # the first init_cache_engine, before any rollout
    buffer = capture.CaptureSession.buffer
    assert buffer is not None and capture.CaptureSession.graphs_captured
    rollouts(runner, seed, budget, num_blocks, preempt_p)
    assert runner.model.replays > 0
    assert capture.CaptureSession.buffer is buffer  # one buffer for the engine's life, across cache re-creation


def test_long_prefills_run_eagerly_and_decodes_replay_padded_graphs():
    """Prefill chunks over 16 tokens run eagerly; decode steps of 3-6 requests replay graphs of 4 or 8 rows, whose
    padding rows compute garbage routing that must not reach a trace."""
    cls, forward_impl = install(Runner, PACKAGE_CAPTURE)
    runner = cls(forward_impl, 32, 96)
    runner.capture_model()
    start(runner, 32)
    rng = random.Random(7)
    engine = GraphEngine(runner, rng, 32, 96, 0.0)
    for i in range(5):
        engine.waiting.append(Request(str(i), [rng.randint(0, 50) for _ in range(40)], 40, 6))
    run_to_completion(engine)
    check_traces(engine, capture.CaptureSession.recorder)
    assert runner.model.replays > 5 and runner.model.eager_runs > 0


def conditional_capture(layer, hidden_states, router_logits):
    """A capture that asks at run time whether a rollout is recording: under a graph, it is asked once, at capture."""
    if capture.CaptureSession.enabled:
        return PACKAGE_CAPTURE(layer, hidden_states, router_logits)
    return MoELayer.forward_impl(layer, hidden_states, router_logits)


def test_a_capture_deciding_in_python_at_run_time_fails():
    cls, forward_impl = install(Runner, conditional_capture)
    runner = cls(forward_impl, 16, 64)
    runner.capture_model()  # warm-up and capture happen with recording off: the graphs hold no write
    with pytest.raises(RoutingError, match="did not write the capture buffer"):
        rollouts(runner, seed=1, budget=16, num_blocks=64, preempt_p=0.0, calls=1)


def test_the_same_conditional_capture_passes_eagerly():
    """The failure above is the graph's doing: without graphs, the run-time condition sees the live value."""
    cls, forward_impl = install(Runner, conditional_capture)
    runner = cls(forward_impl, 16, 64)
    rollouts(runner, seed=1, budget=16, num_blocks=64, preempt_p=0.0, calls=1)
    assert runner.model.replays == 0


def test_capture_installed_after_the_graphs_fails():
    """Graphs captured before the adapter was installed (the pre-issue-13 order) have no write in them."""
    runner = Runner(PACKAGE_CAPTURE, 16, 64)
    runner.capture_model()  # unwrapped: nothing reserved a buffer, the forward's capture is skipped in the graphs
    cls, _ = install(Runner, PACKAGE_CAPTURE)
    runner.__class__ = cls
    with pytest.raises(RoutingError, match="did not write the capture buffer"):
        rollouts(runner, seed=2, budget=16, num_blocks=64, preempt_p=0.0, calls=1)


def test_a_buffer_replaced_after_capture_fails():
    """A session that allocates a new buffer at the next cache re-init leaves the graphs writing into the old one."""
    cls, forward_impl = install(Runner, PACKAGE_CAPTURE)
    runner = cls(forward_impl, 16, 64)
    runner.capture_model()
    rollouts(runner, seed=3, budget=16, num_blocks=64, preempt_p=0.0, calls=1)
    capture.CaptureSession.release()  # forgets the buffer the graphs write into
    with pytest.raises(RoutingError, match="did not write the capture buffer"):
        rollouts(runner, seed=3, budget=16, num_blocks=64, preempt_p=0.0, calls=1)


def test_the_session_refuses_to_replace_a_buffer_graphs_write_into():
    cls, forward_impl = install(Runner, PACKAGE_CAPTURE)
    runner = cls(forward_impl, 16, 64)
    runner.capture_model()
    spec = capture.MoEModelSpec.from_hf_config(HF_CONFIG)
    rows = capture.CaptureSession.buffer.shape[1]
    assert capture.CaptureSession.reserve(spec, max_tokens=rows, device="cpu") is capture.CaptureSession.buffer
    with pytest.raises(RoutingError, match="invisible to graph-replayed steps"):
        capture.CaptureSession.start(spec, max_tokens=rows + 1, num_slots=64, block_size=BLOCK, device="cpu")
    capture.CaptureSession.stop()  # stop keeps the buffer the graphs hold
    assert capture.CaptureSession.buffer is not None


def test_requests_longer_than_a_graph_and_finished_across_calls():
    """A request that finishes in the last step of one call is read out at the next call's first step (vLLM reports
    finished ids one step late), before the re-created cache reuses its blocks."""
    cls, forward_impl = install(Runner, PACKAGE_CAPTURE)
    runner = cls(forward_impl, 16, 24)
    runner.capture_model()
    start(runner, 16)
    rng = random.Random(5)
    engine = GraphEngine(runner, rng, 16, 24, 0.0)
    engine.waiting.append(Request("0", [rng.randint(0, 50) for _ in range(30)], 30, 12))
    run_to_completion(engine)
    check_traces(engine, capture.CaptureSession.recorder)
    assert runner.model.replays >= 11  # every decode step of the 12 new tokens but the first was replayed
