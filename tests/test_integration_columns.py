"""The routing and rollout log-prob columns without MindSpeed-RL: the column plan, the sections' transport, cutting,
group dedupe, partial-rollout joins, the metric reduction (through the real TransferDock and trainer:
tests/upstream/test_transfer_dock.py and test_trainer.py)."""

import pytest
import torch

from mindspeed_rl_r3.config import ConfigError, load_sections
from mindspeed_rl_r3.integration.feed import expand_group_payloads, micro_batch_traces
from mindspeed_rl_r3.integration.metrics import max_entry, mean_entry, merge_entries, min_entry, reduce_entries
from mindspeed_rl_r3.integration.rollout_columns import (
    GeneratedSample,
    PreviousSegments,
    join_partial,
    previous_segments,
    rollout_columns,
)
from mindspeed_rl_r3.integration.settings import (
    ROLLOUT_LOG_PROBS,
    ROUTED_EXPERTS,
    ColumnPlan,
    decode_sections,
    encode_sections,
    sections_from_environment,
)
from mindspeed_rl_r3.routing import RoutingError, RoutingTrace, decode, token_fingerprint
from tests.routing_data import random_trace

LAYERS, TOPK, EXPERTS = 3, 2, 8


def _samples(prompt_lens, response_lens, seed=0):
    """Generations whose traces cover prompt + full response - 1 rows, with log-probs."""
    out, ids = [], []
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        trace = random_trace(p + r - 1, LAYERS, TOPK, EXPERTS, seed=seed + i)
        out.append(GeneratedSample(trace, -torch.rand(r, generator=torch.Generator().manual_seed(i))))
        ids.append(torch.arange(p + r, dtype=torch.int64) + 10 * i)
    return out, ids


def test_column_plan_is_a_function_of_the_sections():
    plan = ColumnPlan.from_config(load_sections({"r3": {"mode": "R3", "replay_reference": True}}))
    assert plan.transfer_dock_columns() == [ROUTED_EXPERTS, ROLLOUT_LOG_PROBS]
    assert plan.consumer_columns("actor_train") == [ROUTED_EXPERTS, ROLLOUT_LOG_PROBS]
    assert plan.consumer_columns("ref_log_prob") == [ROUTED_EXPERTS]
    assert plan.consumer_columns("actor_rollout") == []
    assert plan.consumer_columns("actor_rollout", partial_rollout=True) == [ROUTED_EXPERTS, ROLLOUT_LOG_PROBS]
    aqn_only = ColumnPlan.from_config(load_sections({"aqn": {"enabled": True}}))
    assert aqn_only.transfer_dock_columns() == [ROLLOUT_LOG_PROBS] and aqn_only.consumer_columns("ref_log_prob") == []
    with pytest.raises(ConfigError, match="R2 is not supported through MindSpeed-RL"):
        ColumnPlan.from_config(load_sections({"r3": {"mode": "R2"}}))


def test_sections_travel_as_json_and_bad_ones_name_the_variable(tmp_path):
    text = encode_sections({"r3": {"mode": "R3"}, "lora_extras": {"lora_router_trainable": True}})
    raw, config = decode_sections(text)
    assert raw["r3"] == {"mode": "R3"} and config.lora_extras.lora_router_trainable
    assert sections_from_environment({"MINDSPEED_RL_R3_SECTIONS": text})[1].r3.capture
    assert sections_from_environment({"MINDSPEED_RL_R3_SECTIONS": text, "MINDSPEED_RL_R3_DISABLE": "1"}) is None
    assert sections_from_environment({}) is None
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("rl_config: {}\naqn: {enabled: true}\n")
    assert sections_from_environment({"MINDSPEED_RL_R3_CONFIG": str(yaml_file)})[1].aqn.enabled
    with pytest.raises(ConfigError, match="MINDSPEED_RL_R3_SECTIONS is not valid JSON"):
        decode_sections("{r3")
    with pytest.raises(ConfigError, match=r"MINDSPEED_RL_R3_SECTIONS: r3\.group_dedupe"):
        decode_sections('{"r3": {"group_dedupe": "yes"}}')


def test_responses_cut_at_the_first_pad_cut_routing_and_log_probs():
    samples, ids = _samples([3], [6])
    kept = ids[0][:5]  # MindSpeed-RL cut the response after 2 of its 6 tokens
    cols = rollout_columns(samples, [kept], [kept[3:]], routed_experts=True)
    trace = decode(cols[ROUTED_EXPERTS][0])
    assert trace.rows == 4 and torch.equal(trace.ids, samples[0].trace.ids[:4])
    assert trace.token_hash == token_fingerprint(kept) and torch.equal(
        cols[ROLLOUT_LOG_PROBS][0], samples[0].log_probs[:2]
    )
    with pytest.raises(RoutingError, match="sample 0: the rollout recorded 8 routing rows"):
        rollout_columns(samples, [torch.arange(11)], [torch.arange(3)], routed_experts=True)
    with pytest.raises(RoutingError, match="2 generations for 1 TransferDock samples"):
        rollout_columns(samples * 2, [kept], [kept[3:]], routed_experts=True)


def test_group_dedupe_is_expanded_for_whole_groups_and_refused_for_split_ones():
    prompts, responses = [5, 5, 5, 5], [2, 4, 3, 1]
    samples, _ = _samples(prompts, responses)
    shared = torch.arange(5) + 100  # one prompt, four completions
    ids = [torch.cat([shared, torch.arange(r) + 50 + 10 * i]) for i, r in enumerate(responses)]
    for s in samples[1:]:
        s.trace.ids[:5] = samples[0].trace.ids[:5]  # identical prefill routing within the group
    samples[2].trace.ids[1] = (samples[0].trace.ids[1] + 1) % EXPERTS  # except one row (stored as an exception)
    cols = rollout_columns(samples, ids, [x[5:] for x in ids], routed_experts=True, group_size=4, group_dedupe=True)
    payloads = cols[ROUTED_EXPERTS]
    plain = rollout_columns(samples, ids, [x[5:] for x in ids], routed_experts=True)[ROUTED_EXPERTS]
    assert sum(p.numel() for p in payloads[1:]) < sum(p.numel() for p in plain[1:])
    padded = torch.nn.utils.rnn.pad_sequence(payloads, batch_first=True, padding_value=7)
    expanded = expand_group_payloads(padded, pad_value=7)
    for i, row in enumerate(expanded):
        trace = decode(row, allow_trailing_padding=True)
        assert torch.equal(trace.ids, samples[i].trace.ids[: prompts[i] + responses[i] - 1])
    assert expand_group_payloads(expanded) is None  # nothing shared any more
    with pytest.raises(RoutingError, match=r"r3\.group_dedupe needs whole GRPO groups"):
        expand_group_payloads(padded[2:])


def test_partial_rollout_keeps_earlier_segments_and_appends_new_rows():
    first = random_trace(6, LAYERS, TOPK, EXPERTS, seed=1)  # prompt 4 + 3 generated - 1
    continuation = random_trace(9, LAYERS, TOPK, EXPERTS, seed=2)  # re-prefilled 7 + 3 generated - 1
    joined = join_partial(first, continuation)
    assert (
        joined.rows == 9
        and torch.equal(joined.ids[:6], first.ids)
        and torch.equal(joined.ids[6:], continuation.ids[6:])
    )
    assert join_partial(None, continuation) is continuation
    with pytest.raises(RoutingError, match="fewer than the 6 rows"):
        join_partial(first, random_trace(5, LAYERS, TOPK, EXPERTS))
    from mindspeed_rl_r3.routing import encode

    row = torch.cat([encode(first), torch.full((5,), 3, dtype=torch.int32)])
    prev = previous_segments(row, torch.tensor([-0.1, -0.2, -0.3, 0.0]), 3, 0)
    assert torch.equal(prev.trace.ids, first.ids) and prev.log_probs.tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert previous_segments(torch.tensor([-1, 0]), None, 0, 0) == PreviousSegments(None, None)
    with pytest.raises(RoutingError, match="still the placeholder"):
        previous_segments(torch.tensor([-1, 0]), None, 2, 0)


def test_encoded_metrics_reduce_to_weighted_means_maxima_and_minima():
    entries = merge_entries(
        {}, mean_entry("m/k3", 0.5, 10), mean_entry("m/k3", 0.1, 30), max_entry("m/max", 2.0), max_entry("m/max", 5.0),
        min_entry("m/min", 0.3), min_entry("m/min", 0.9), {"actor/lr": [1e-5]},
    )  # fmt: skip
    reduced, rest = reduce_entries(entries)
    assert reduced == pytest.approx({"m/k3": 0.2, "m/max": 5.0, "m/min": 0.3})
    assert rest == {"actor/lr": [1e-5]}


def test_trace_of_other_tokens_is_refused_before_replay():
    trace = random_trace(5, LAYERS, TOPK, EXPERTS)
    tokens = torch.arange(6)
    stamped = RoutingTrace(trace.ids, EXPERTS, 2, token_fingerprint(tokens))
    from mindspeed_rl_r3.routing import encode

    column = encode(stamped).unsqueeze(0)
    micro_batch_traces(column, torch.tensor([[2]]), torch.tensor([[4]]), input_ids=tokens.unsqueeze(0))
    with pytest.raises(RoutingError, match="re-tokenized prompt"):
        micro_batch_traces(column, torch.tensor([[2]]), torch.tensor([[4]]), input_ids=(tokens + 1).unsqueeze(0))
    with pytest.raises(RoutingError, match="expected 6 routing rows"):
        micro_batch_traces(column, torch.tensor([[2]]), torch.tensor([[5]]))
