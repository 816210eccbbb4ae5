"""Routing codec under hostile conditions: every shape, any corruption, mispaired group followers, other models.

The contract: a payload either decodes to the identical trace or raises :class:`RoutingError`, never anything else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindspeed_rl_r3.routing import (
    MoEModelSpec,
    RoutingError,
    RoutingTrace,
    codec,
    decode,
    decode_group,
    encode,
    encode_group,
)
from tests.routing_data import random_trace

HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


def _same(a: RoutingTrace, b: RoutingTrace) -> bool:
    return (
        a.ids.dtype == b.ids.dtype
        and torch.equal(a.ids, b.ids)
        and (a.num_experts, a.prompt_len, a.token_hash) == (b.num_experts, b.prompt_len, b.token_hash)
        and a.layout == b.layout
    )


@st.composite
def groups(draw):
    """A GRPO group: any dtype, top-k, layer count; followers share the prompt except for any set of rows."""
    experts = draw(st.sampled_from([2, 16, 255, 256, 300, 32767]))
    topk = draw(st.integers(1, min(4, experts)))
    layers = draw(st.integers(1, 4))
    prompt = draw(st.integers(0, 12))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    leader = random_trace(prompt + draw(st.integers(0, 6)), layers, topk, experts, seed=seed, prompt_len=prompt)
    group = [leader]
    for j in range(1, n):
        own = random_trace(prompt + draw(st.integers(0, 6)), layers, topk, experts, seed=seed + j, missing=0.2)
        ids = own.ids.clone()
        shared = min(prompt, ids.shape[0], leader.rows)
        ids[:shared] = leader.ids[:shared]
        differing = draw(st.lists(st.integers(0, max(0, shared - 1)), max_size=shared)) if shared else []
        for row in differing:
            ids[row] = own.ids[row]
        group.append(RoutingTrace(ids, experts, prompt))
    return group, prompt


@settings(max_examples=120, deadline=None, suppress_health_check=HEALTH)
@given(groups())
def test_encode_group_round_trips_every_shape(data):
    group, prompt = data
    payloads = encode_group(group, prompt)
    for got, want in zip(decode_group(payloads), group, strict=True):
        assert _same(got, want)


def test_wide_ids_top1_with_identical_prompts_is_not_a_stride_error():
    leader = random_trace(6, 2, 1, 300, prompt_len=4)
    follower = RoutingTrace(torch.cat([leader.ids[:4], random_trace(3, 2, 1, 300, seed=1).ids]), 300, 4)
    back = decode_group(encode_group([leader, follower], 4))
    assert torch.equal(back[1].ids, follower.ids)


def _reseal(payload: torch.Tensor, word: int, value: int) -> torch.Tensor:
    """Change one header word and recompute the header CRC: a wrong header from a buggy encoder, not line noise."""
    bad = payload.clone()
    head = bad[: codec.HEADER_WORDS].numpy()
    head[word] = np.int32(codec._i32(value & 0xFFFFFFFF))
    head[codec._HEADER_CRC] = codec._i32(codec._header_crc(head))
    return bad


@settings(max_examples=200, deadline=None, suppress_health_check=HEALTH)
@given(groups(), st.data())
def test_any_corruption_raises_or_decodes_identically(data, draw):
    group, prompt = data
    payloads = encode_group(group, prompt)
    i = draw.draw(st.integers(0, len(payloads) - 1))
    p = payloads[i]
    how = draw.draw(st.sampled_from(["flip", "truncate", "extend", "reseal", "swap"]))
    if how == "flip":
        bad = p.clone()
        word = draw.draw(st.integers(0, p.numel() - 1))
        bad[word] ^= 1 << draw.draw(st.integers(0, 31))
    elif how == "truncate":
        bad = p[: draw.draw(st.integers(0, p.numel() - 1))]
    elif how == "extend":
        bad = torch.cat([p, torch.full((draw.draw(st.integers(1, 5)),), 7, dtype=torch.int32)])
    elif how == "reseal":
        # prompt length, token fingerprint and layout are provenance, checked against the training side (its
        # tokens, its spec), not against the payload itself; every structural field is checked here
        free = (codec._HEADER_CRC, codec._PROMPT_LEN, codec._TOKEN_HASH, codec._LAYOUT)
        words = [w for w in range(codec.HEADER_WORDS) if w not in free]
        word = draw.draw(st.sampled_from(words))
        bad = _reseal(p, word, int(p[word]) + draw.draw(st.sampled_from([-2, -1, 1, 2, 1 << 20])))
    else:
        # another sample's payload in this slot: a follower then meets whichever leader its offset now points at;
        # it must rebuild its own trace or raise (a whole payload in the wrong slot is the token fingerprint's job)
        j = draw.draw(st.integers(0, len(payloads) - 1))
        bad = payloads[j]
        group = [*group[:i], group[j], *group[i + 1 :]]
    batch = [*payloads[:i], bad, *payloads[i + 1 :]]
    try:
        decoded = decode_group(batch, allow_trailing_padding=how == "extend")
    except RoutingError:
        return
    for got, want in zip(decoded, group, strict=True):
        assert _same(got, want)


def _two_groups(experts: int = 16, prompt: int = 6):
    a = random_trace(prompt + 4, 3, 2, experts, seed=1, prompt_len=prompt)
    b = random_trace(prompt + 4, 3, 2, experts, seed=2, prompt_len=prompt)

    def follower(leader, seed):
        ids = random_trace(prompt + 3, 3, 2, experts, seed=seed).ids.clone()
        ids[:prompt] = leader.ids[:prompt]
        return RoutingTrace(ids, experts, prompt)

    return [a, follower(a, 10)], [b, follower(b, 20)]


def test_interleaved_groups_are_an_error_naming_both_samples():
    group_a, group_b = _two_groups()
    pa, pb = encode_group(group_a, 6), encode_group(group_b, 6)
    # A0, B0, A1, B1: A1's offset 1 points at B0, another group's leader
    with pytest.raises(RoutingError, match=r"sample 2: .*wrong group leader.*sample 1"):
        decode_group([pa[0], pb[0], pa[1], pb[1]])
    with pytest.raises(RoutingError, match=r"sample 7: .*wrong group leader.*sample 3"):
        decode(pa[1], leader=group_b[0], sample_index=7, leader_index=3)
    assert torch.equal(decode(pa[1], leader=group_a[0]).ids, group_a[1].ids)


@settings(max_examples=60, deadline=None, suppress_health_check=HEALTH)
@given(groups(), groups())
def test_a_follower_against_any_other_leader_raises_or_is_identical(first, second):
    (group, prompt), (other, _) = first, second
    payloads = encode_group(group, prompt)
    for p, want in zip(payloads[1:], group[1:], strict=True):
        try:
            got = decode(p, leader=other[0], sample_index=1, leader_index=0)
        except RoutingError as err:
            assert "sample 1" in str(err) and "sample 0" in str(err)
            continue
        assert _same(got, want)


def test_declared_body_length_is_checked_against_rows_layers_topk():
    trace = random_trace(10, 4, 3, 16)
    payload = encode(trace)
    for word, value in ((codec._ROWS, 11), (codec._LAYERS, 3), (codec._TOPK, 2), (codec._BODY_BYTES, 10 * 12 + 4)):
        with pytest.raises(RoutingError, match=r"body|truncated"):
            decode(_reseal(payload, word, value), sample_index=0)
    # layers and top-k swapped keep the byte count: only the model spec (or layout) can tell
    swapped = _reseal(_reseal(payload, codec._LAYERS, 3), codec._TOPK, 4)
    assert decode(swapped).ids.shape == (10, 3, 4)
    with pytest.raises(RoutingError, match=r"expected \(4, 3, 16\)"):
        decode(swapped, spec=MoEModelSpec(num_layers=4, topk=3, num_experts=16))


def test_model_layout_identity_refuses_another_model_with_equal_counts():
    spec_a = MoEModelSpec(num_layers=6, topk=2, num_experts=16, moe_layers=(1, 2, 4, 5))
    spec_b = MoEModelSpec(num_layers=6, topk=2, num_experts=16, moe_layers=(0, 1, 3, 5))
    assert spec_a.layout_id != spec_b.layout_id
    trace = random_trace(9, 4, 2, 16)
    payload = encode(trace, spec=spec_a)
    assert decode(payload, spec=spec_a).layout == spec_a.layout_id
    with pytest.raises(RoutingError, match=r"sample 4: .*routing layout.*MoE layers \[0, 1, 3, 5\] of 6"):
        decode(payload, spec=spec_b, sample_index=4)
    # the identity travels with the decoded trace: re-encoded (e.g. group expansion) it is still refused
    with pytest.raises(RoutingError, match="routing layout"):
        decode(encode(decode(payload)), spec=spec_b)
    group = encode_group([RoutingTrace(trace.ids, 16, 3, layout=spec_a.layout_id)], 3)
    with pytest.raises(RoutingError, match="routing layout"):
        decode_group(group, spec=spec_b)
    # a payload without a recorded layout still decodes against either (counts are checked)
    assert decode(encode(trace), spec=spec_b).rows == 9
    with pytest.raises(RoutingError, match="expects"):
        encode(random_trace(9, 3, 2, 16), spec=spec_a)
