import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mindspeed_rl_r3.routing import RoutingError
from mindspeed_rl_r3.routing.layout import (
    RouterTokenLayout,
    layout_micro_batch,
    router_token_positions,
    select_micro_batch,
)
from tests.layout_oracle import PAD, STRIDE, expected_router_probe
from tests.routing_data import random_trace


@st.composite
def layouts(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    cp = draw(st.sampled_from([1, 2, 3]))
    return dict(
        tp=tp,
        tp_rank=draw(st.integers(0, tp - 1)),
        cp=cp,
        cp_rank=draw(st.integers(0, cp - 1)),
        algo=draw(st.sampled_from(["megatron_cp_algo", "ulysses_cp_algo"])),
        sequence_parallel=draw(st.booleans()),
        gathers=draw(st.booleans()),
        remove_padding=draw(st.booleans()),
    )


def _layout(p: dict) -> RouterTokenLayout:
    return RouterTokenLayout(
        tp_size=p["tp"],
        tp_rank=p["tp_rank"],
        cp_size=p["cp"],
        cp_rank=p["cp_rank"],
        cp_algo=p["algo"],
        sequence_parallel=p["sequence_parallel"],
        router_gathers_tp=p["gathers"],
        remove_padding=p["remove_padding"],
    )


@settings(max_examples=300, deadline=None)
@given(
    p=layouts(),
    seq_lens=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    extra_pad=st.integers(0, 2),
    seed=st.integers(0, 1000),
)
def test_layout_matches_the_upstream_oracle(p, seq_lens, extra_pad, seed):
    layout = _layout(p)
    padded_len = layout.padded_len(torch.tensor(seq_lens)) + extra_pad * layout.pad_multiple
    probe = expected_router_probe(seq_lens, padded_len=padded_len, **p)

    sample, pos = router_token_positions(seq_lens, layout, padded_len=padded_len)
    valid = pos < torch.tensor(seq_lens)[sample]
    assert torch.equal(torch.where(valid, sample * STRIDE + pos, PAD), probe)

    # Replay ids: row `pos` of the sample's trace, missing for the last token and for padding.
    traces = [random_trace(n - 1, 3, 2, 16, missing=0.1, seed=seed + i) for i, n in enumerate(seq_lens)]
    batch = layout_micro_batch(traces, seq_lens, layout, padded_len=padded_len)
    assert batch.ids.shape == (probe.numel(), 3, 2)
    for t, v in enumerate(probe.tolist()):
        b, s = divmod(v, STRIDE)
        if v == PAD or s >= seq_lens[b] - 1:
            assert batch.missing()[t].all()
        else:
            assert torch.equal(batch.ids[t], traces[b].ids[s])


def test_known_zigzag_example():
    # Two packed samples of 8 tokens each, cp=2 rank 0: chunks 0 and 3 of each sample.
    layout = RouterTokenLayout(cp_size=2, cp_rank=0, remove_padding=True)
    sample, pos = router_token_positions([8, 5], layout)
    assert sample.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert pos.tolist() == [0, 1, 6, 7, 0, 1, 6, 7]


def test_right_padded_rows_are_seq_major():
    sample, pos = router_token_positions([3, 2], RouterTokenLayout(), padded_len=3)
    assert list(zip(pos.tolist(), sample.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_layers_and_layer_numbers_select_this_stage():
    traces = [random_trace(n - 1, 6, 2, 16, seed=n) for n in (5, 7)]
    batch = layout_micro_batch(traces, [5, 7], RouterTokenLayout(), layers=[1, 2, 4], layer_numbers=[3, 4, 7])
    assert batch.layer_numbers == (3, 4, 7)
    full = layout_micro_batch(traces, [5, 7], RouterTokenLayout())
    assert torch.equal(batch.ids, full.ids[:, [1, 2, 4]])
    ids, missing = batch.layer(7)
    assert ids.dtype == torch.int64 and torch.equal(missing, full.missing()[:, 4])
    assert (ids[missing] == 0).all()
    with pytest.raises(RoutingError, match="layer 5 is not on this rank"):
        batch.layer(5)


def test_dynamic_batch_micro_batches_follow_their_partition():
    lens = [4, 9, 6, 3]
    traces = [random_trace(n - 1, 2, 2, 8, seed=i) for i, n in enumerate(lens)]
    order = [2, 0, 3]
    picked = select_micro_batch(traces, order)
    batch = layout_micro_batch(picked, [lens[i] for i in order], RouterTokenLayout(remove_padding=True))
    assert torch.equal(batch.ids[0], traces[2].ids[0])  # first token of the first sample in partition order


def test_misfit_inputs_are_named():
    traces = [random_trace(4, 2, 2, 8), random_trace(5, 2, 2, 8)]
    with pytest.raises(RoutingError, match="sample 11: expected 6 routing rows for 7 training tokens, found 5"):
        layout_micro_batch(traces, [5, 7], RouterTokenLayout(), first_sample_index=10)
    with pytest.raises(RoutingError, match="2 traces for 3"):
        layout_micro_batch(traces, [5, 6, 7], RouterTokenLayout())
    with pytest.raises(RoutingError, match="sample 1: trace is"):
        layout_micro_batch([traces[0], random_trace(5, 3, 2, 8)], [5, 6], RouterTokenLayout())
    with pytest.raises(RoutingError, match="shorter than the longest"):
        router_token_positions([5, 9], RouterTokenLayout(), padded_len=8)
    with pytest.raises(RoutingError, match="does not split into 4 CP chunks"):
        router_token_positions([5], RouterTokenLayout(cp_size=2), padded_len=6)
    with pytest.raises(RoutingError, match="not supported"):
        RouterTokenLayout(cp_algo="hybrid_cp_algo")
    with pytest.raises(RoutingError, match="tp rank 2"):
        RouterTokenLayout(tp_size=2, tp_rank=2)
