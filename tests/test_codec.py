import ast
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
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
    encoded_words,
    payload_words,
)
from mindspeed_rl_r3.routing.codec import HEADER_WORDS, is_group_follower, is_payload, standalone_words
from tests.routing_data import random_trace

SPEC = MoEModelSpec(num_layers=4, topk=3, num_experts=16)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 40),
    layers=st.integers(1, 5),
    topk=st.integers(1, 4),
    experts=st.sampled_from([4, 16, 255, 256, 1000]),
    prompt_len=st.one_of(st.none(), st.integers(1, 20)),
    missing=st.floats(0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(rows, layers, topk, experts, prompt_len, missing, seed):
    topk = min(topk, experts)
    trace = random_trace(rows, layers, topk, experts, missing=missing, seed=seed, prompt_len=prompt_len)
    payload = encode(trace)
    assert payload.dtype == torch.int32 and payload.dim() == 1
    assert payload.numel() == encoded_words(trace) == payload_words(payload)
    assert payload.numel() == standalone_words(rows, MoEModelSpec(layers, topk, experts))
    assert is_payload(payload) and not is_group_follower(payload)
    back = decode(payload)
    assert back.ids.dtype == trace.ids.dtype
    assert torch.equal(back.ids, trace.ids)
    assert (back.num_experts, back.prompt_len, back.token_hash) == (experts, prompt_len, trace.token_hash)
    assert torch.equal(back.missing(), trace.missing())


def test_dtype_is_the_smallest_that_fits():
    assert random_trace(3, 2, 2, 255).ids.dtype == torch.uint8
    assert random_trace(3, 2, 2, 256).ids.dtype == torch.int16
    small = encode(random_trace(100, 48, 8, 128))
    # 100 rows x 48 layers x 8 ids, one byte each, plus the header.
    assert small.numel() * 4 == 100 * 48 * 8 + HEADER_WORDS * 4


def test_token_hash_round_trips():
    tokens = torch.arange(11)
    trace = RoutingTrace.from_ids(random_trace(10, 2, 2, 8).ids, 8, prompt_len=4, token_ids=tokens)
    assert decode(encode(trace)).token_hash == trace.token_hash


def _flip(payload: torch.Tensor, word: int) -> torch.Tensor:
    bad = payload.clone()
    bad[word] ^= 1 << 3
    return bad


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p[:-1], "truncated"),
        (lambda p: p[:5], "header alone needs"),
        (lambda p: _flip(p, HEADER_WORDS + 2), "ids are corrupted"),
        (lambda p: _flip(p, 6), "header is corrupted"),
        (lambda p: _flip(p, 0), "not a routing payload"),
        (lambda p: torch.cat([p, torch.zeros(3, dtype=torch.int32)]), "past its declared end"),
        (lambda p: p.to(torch.int64), "1-D int32"),
        (lambda p: p.view(1, -1), "1-D int32"),
    ],
)
def test_damaged_payloads_are_rejected_with_the_reason(mutate, message):
    payload = encode(random_trace(20, 4, 3, 16))
    with pytest.raises(ValueError, match=message) as err:
        decode(mutate(payload), sample_index=7)
    assert "sample 7" in str(err.value)


def test_batch_padding_is_accepted_when_asked():
    trace = random_trace(20, 4, 3, 16)
    padded = torch.cat([encode(trace), torch.full((5,), 151643, dtype=torch.int32)])
    assert payload_words(padded) == encoded_words(trace)
    assert torch.equal(decode(padded, allow_trailing_padding=True).ids, trace.ids)


def test_wrong_model_is_rejected():
    payload = encode(random_trace(5, 4, 3, 16))
    with pytest.raises(RoutingError, match=r"expected \(48, 8, 128\)"):
        decode(payload, spec=MoEModelSpec.qwen3_30b_a3b(), sample_index=2)
    assert decode(payload, spec=SPEC).rows == 5


def _group(prompt_len: int, n: int, response_lens: list[int], seed: int = 0) -> list[RoutingTrace]:
    leader = random_trace(prompt_len + response_lens[0] - 1, 4, 3, 16, seed=seed, prompt_len=prompt_len)
    group = [leader]
    for j in range(1, n):
        own = random_trace(prompt_len + response_lens[j] - 1, 4, 3, 16, seed=seed + j, prompt_len=prompt_len)
        ids = own.ids.clone()
        shared = min(prompt_len, ids.shape[0], leader.rows)
        ids[:shared] = leader.ids[:shared]
        group.append(RoutingTrace(ids, 16, prompt_len))
    return group


def test_group_dedupe_is_lossless_and_smaller():
    group = _group(prompt_len=30, n=4, response_lens=[10, 1, 25, 7])
    payloads = encode_group(group, prompt_len=30)
    plain = sum(encode(t).numel() for t in group)
    assert sum(p.numel() for p in payloads) < plain
    for got, want in zip(decode_group(payloads, spec=SPEC), group, strict=True):
        assert torch.equal(got.ids, want.ids)
        assert got.prompt_len == 30


def test_group_dedupe_keeps_prompt_rows_that_differ():
    group = _group(prompt_len=12, n=3, response_lens=[5, 6, 7])
    ids = group[2].ids.clone()
    ids[[0, 7], 1] = torch.tensor([15, 14, 13], dtype=ids.dtype)
    ids[3] = 255  # a prompt row the follower did not record
    group[2] = RoutingTrace(ids, 16, 12)
    back = decode_group(encode_group(group, prompt_len=12))
    assert torch.equal(back[2].ids, ids)
    assert torch.equal(back[1].ids, group[1].ids)


def test_follower_needs_its_leader():
    payloads = encode_group(_group(prompt_len=8, n=3, response_lens=[4, 4, 4]), prompt_len=8)
    with pytest.raises(RoutingError, match="decode_group"):
        decode(payloads[1], sample_index=5)
    with pytest.raises(RoutingError, match="not in this batch"):
        decode_group(payloads[1:], first_sample_index=9)
    leader = decode(payloads[0])
    assert decode(payloads[2], leader=leader).rows == 8 + 4 - 1


def test_extend_concatenates_partial_rollouts():
    first = random_trace(10, 4, 3, 16, prompt_len=6)
    more = random_trace(5, 4, 3, 16, seed=3)
    joined = first.extend(more)
    assert joined.rows == 15 and joined.prompt_len == 6
    assert torch.equal(joined.ids[10:], more.ids)
    with pytest.raises(RoutingError, match="continuation"):
        first.extend(random_trace(5, 4, 2, 16))


def test_sniffing_tells_payloads_from_placeholders_and_padding():
    payloads = encode_group(_group(prompt_len=8, n=3, response_lens=[4, 2, 6]), prompt_len=8)
    width = max(p.numel() for p in payloads) + 4
    column = torch.zeros(len(payloads), width, dtype=torch.int32)  # the dispatch's right-padded batch
    for i, p in enumerate(payloads):
        column[i, : p.numel()] = p
    assert [is_payload(row) for row in column] == [True, True, True]
    assert [is_group_follower(row) for row in column] == [False, True, True]
    assert is_payload(column[:1]) and is_group_follower(column[1:2])  # a [1, words] row reads the same
    assert [payload_words(row) for row in column] == [p.numel() for p in payloads]
    for not_payload in (torch.tensor([-1]), torch.zeros(width, dtype=torch.int32), payloads[0][: HEADER_WORDS - 1]):
        assert not is_payload(not_payload)
    assert not is_group_follower(torch.tensor([-1]))


def test_standalone_words_sizes_a_payload_before_it_exists():
    spec = MoEModelSpec.qwen3_30b_a3b()
    assert standalone_words(0, spec) == HEADER_WORDS
    # 48 MoE layers x top-8 of 128 experts: one byte per id, 384 bytes = 96 words per row.
    assert standalone_words(10, spec) == HEADER_WORDS + 10 * 96
    wide = MoEModelSpec(num_layers=3, topk=3, num_experts=300)  # int16 ids, 18 bytes a row: padded to a word
    assert standalone_words(3, wide) == encode(random_trace(3, 3, 3, 300)).numel() == HEADER_WORDS + 14
    with pytest.raises(RoutingError, match="-1 rows"):
        standalone_words(-1, spec)


def _codec_names_used_outside_it() -> dict[str, set[str]]:
    """For each package module but the codec: the codec names it imports, and the magic literal if it holds one."""
    package = Path(codec.__file__).parents[1]
    magic = {codec.MAGIC, codec.MAGIC - (1 << 32)}
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        if path == Path(codec.__file__):
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("routing.codec"):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "codec":
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and node.value in magic and not isinstance(node.value, bool):
                names.add(f"literal {node.value:#x}")
        if names:
            found[str(path.relative_to(package))] = names
    return found


def test_the_wire_format_stays_inside_the_codec():
    public = set(codec.__all__)
    assert all(name.islower() for name in public), "the codec's public API is functions, not header constants"
    leaks = {module: names - public for module, names in _codec_names_used_outside_it().items() if names - public}
    assert not leaks, f"modules reaching into the routing wire format: {leaks}"
    assert "integration/feed.py" in _codec_names_used_outside_it()  # the scan sees the codec's real users
