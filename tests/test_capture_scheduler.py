"""The recorder under the simulated continuous-batching engine (tests/sim_engine.py), against the oracle routing:
paged KV with prefix caching and LRU reuse, chunked prefill, a token budget, preemption, n > 1 samples, and graph
padding of every step (padding rows carry garbage routing)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mindspeed_rl_r3.routing.capture import RoutingRecorder
from tests.sim_engine import BLOCK, SPEC, Engine, add_requests, check_traces, run_to_completion


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    budget=st.sampled_from([5, 16, 32]),
    graph_pad=st.sampled_from([1, 8]),
    preempt_p=st.sampled_from([0.0, 0.15]),
    num_blocks=st.sampled_from([24, 64]),
)
def test_assembled_traces_equal_the_oracle(seed, budget, graph_pad, preempt_p, num_blocks):
    rng = random.Random(seed)
    engine = Engine(rng, num_blocks, budget, graph_pad, preempt_p)
    add_requests(engine, rng)
    run_to_completion(engine)
    check_traces(engine, engine.recorder)


def test_unknown_request_and_oversized_steps_are_named():
    recorder = RoutingRecorder(SPEC, max_tokens=4, num_slots=16, block_size=BLOCK)
    with pytest.raises(ValueError, match="no routing was captured for request 'x'"):
        recorder.pop_trace("x")
    with pytest.raises(ValueError, match="step has 5 tokens"):
        recorder.end_step(5, torch.arange(5))
    with pytest.raises(ValueError, match="step has 5 tokens"):
        recorder.begin_step(num_tokens=5)
    with pytest.raises(ValueError, match="decoder layer 9 has no router"):
        recorder.trace_layer(9)


def test_a_step_whose_rows_the_forward_did_not_write_is_refused():
    """begin_step marks the step's rows missing; rows the forward left so (stale under a graph without the write)
    are refused, naming the decoder layers, instead of being stored as this step's routing."""
    recorder = RoutingRecorder(SPEC, max_tokens=8, num_slots=16, block_size=BLOCK)
    ids = torch.arange(SPEC.topk, dtype=torch.int32).expand(3, -1)
    for layer in range(SPEC.num_moe_layers):
        recorder.capture(layer, ids)  # a previous step's rows
    recorder.begin_step(num_tokens=3)
    recorder.capture(0, ids)
    recorder.capture(2, ids[:2])
    with pytest.raises(ValueError, match=r"step 0: 3 of 3 tokens have no routing in decoder layers \[1, 2\]"):
        recorder.end_step(3, torch.arange(3))
    recorder.begin_step(num_tokens=3)
    for layer in range(SPEC.num_moe_layers):
        recorder.capture(layer, ids[:2])
    recorder.end_step(3, torch.tensor([0, 1, -1]))  # a padding slot (-1) may stay unwritten: never stored
    assert torch.equal(recorder.host[:2].long(), ids[:2].unsqueeze(1).expand(-1, SPEC.num_moe_layers, -1).long())
