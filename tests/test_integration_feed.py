"""The per-micro-batch replay feed in MindSpeed-RL's training engine (fake at 05a90d77), checked against the layout
oracle: right-padded and remove-padding batches, fixed and dynamic batch size, CP / SP / TP-gather ranks."""

import pytest
import torch

from mindspeed_rl_r3.integration.settings import ROUTED_EXPERTS
from mindspeed_rl_r3.replay.state import ReplayConfig, ReplayMode, RouterAction, RouterReplayState
from mindspeed_rl_r3.routing import RoutingError, RoutingTrace, encode, token_fingerprint
from tests.integration_support import OneRank, fakes, integration, megatron_config, probe_ids  # noqa: F401
from tests.layout_oracle import PAD, STRIDE, expected_router_probe

LAYERS, TOPK, EXPERTS, PAD_ID = 2, 2, 8, 0


class RouterStub(torch.nn.Module):
    """Stands for the model: its "routers" consume one queue entry per layer per micro-batch, like TopKRouter."""

    def __init__(self, state):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self._r3_replay_state = state
        self.loaded = []
        original = state.load

        def spy(batch):
            self.loaded.append(batch)
            original(batch)

        state.load = spy

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if self._r3_replay_state.action is RouterAction.NATIVE:
            return torch.zeros(*input_ids.shape, 16)
        batch = self.loaded[-1]
        for n in batch.layer_numbers:
            scores = torch.rand(batch.num_tokens, EXPERTS)
            self._r3_replay_state.route(
                n, scores, TOPK, None, None, lambda s, k, num_groups=None, group_topk=None: torch.topk(s, k, dim=1)
            )
        return torch.zeros(*input_ids.shape, 16)


def schedule(forward_step_func, data_iterator, model, num_microbatches, forward_only, **_):
    """Forward only, no loss: one row of zeros per sample, like forward-only log-probs."""
    out = []
    for _ in range(num_microbatches):
        _, loss = forward_step_func(data_iterator, model[0])
        out.append(torch.zeros(loss.keywords["batch"]["prompt_length"].shape[0], 1))
    return out


def _batch(seq_lens, prompt_lens, multiple, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = -(-max(seq_lens) // multiple) * multiple
    input_ids = torch.full((len(seq_lens), width), PAD_ID, dtype=torch.int64)
    payloads, traces = [], []
    for b, (n, p) in enumerate(zip(seq_lens, prompt_lens, strict=True)):
        input_ids[b, :n] = torch.randint(3, 60, (n,), generator=g)
        ids = torch.stack([probe_ids(b, pos, LAYERS, TOPK, EXPERTS) for pos in range(n - 1)])
        trace = RoutingTrace.from_ids(ids, EXPERTS, prompt_len=p, token_ids=input_ids[b, :n])
        traces.append(trace)
        payloads.append(encode(trace))
    routed = torch.nn.utils.rnn.pad_sequence(payloads, batch_first=True, padding_value=PAD_ID)
    responses = [n - p for n, p in zip(seq_lens, prompt_lens, strict=True)]
    batch = {
        "input_ids": input_ids,
        "prompt_length": torch.tensor(prompt_lens).reshape(-1, 1),
        "response_length": torch.tensor(responses).reshape(-1, 1),
        "responses": torch.zeros(len(seq_lens), max(responses), dtype=torch.int64),
        ROUTED_EXPERTS: routed,
    }
    return batch, traces


CASES = {
    "padded-mbs2": dict(remove_padding=False, dynamic=False, tp=1, tp_rank=0, cp=1, cp_rank=0, algo="megatron_cp_algo",
                        sp=False, dispatcher="alltoall_seq"),
    "packed-tp2-sp-gather": dict(remove_padding=True, dynamic=False, tp=2, tp_rank=1, cp=1, cp_rank=0,
                                 algo="megatron_cp_algo", sp=True, dispatcher="alltoall_seq"),
    "packed-dynamic-cp2-zigzag": dict(remove_padding=True, dynamic=True, tp=1, tp_rank=0, cp=2, cp_rank=1,
                                      algo="megatron_cp_algo", sp=False, dispatcher="alltoall_seq"),
    "padded-dynamic-ulysses-tp2-sp": dict(remove_padding=False, dynamic=True, tp=2, tp_rank=1, cp=2, cp_rank=0,
                                          algo="ulysses_cp_algo", sp=True, dispatcher="alltoall"),
    "padded-cp2-zigzag": dict(remove_padding=False, dynamic=False, tp=1, tp_rank=0, cp=2, cp_rank=1,
                              algo="megatron_cp_algo", sp=False, dispatcher="allgather"),
}  # fmt: skip


def _engine(case, state, *, micro_batch_size=2, role="actor"):
    from mindspeed_rl.models.base.base_training_engine import BaseTrainingEngine
    from mindspeed_rl.utils.compute import set_parallel_state

    set_parallel_state(OneRank(case["tp"], case["tp_rank"], case["cp"], case["cp_rank"]))
    config = megatron_config(
        num_layers=LAYERS, context_parallel_size=case["cp"], context_parallel_algo=case["algo"],
        sequence_parallel=case["sp"], moe_token_dispatcher_type=case["dispatcher"],
        reset_attention_mask=case["remove_padding"] and case["algo"] == "megatron_cp_algo" and case["cp"] > 1,
    )  # fmt: skip
    stub = RouterStub(state)
    engine = BaseTrainingEngine(
        [stub], megatron_config=config, role=role, micro_batch_size=micro_batch_size, forward_backward_func=schedule,
        use_remove_padding=case["remove_padding"], use_dynamic_bsz=case["dynamic"],
        actor_max_packing_token_size=40, update_max_packing_token_size=40,
    )  # fmt: skip
    return engine, stub


def _state(mode="R3"):
    state = RouterReplayState(ReplayConfig(mode=ReplayMode(mode), alarm_min_rows=10**9))
    state.bind_layers([1, 2])
    return state


@pytest.mark.parametrize("name", list(CASES))
def test_micro_batch_replay_matches_the_oracle(fakes, integration, name):  # noqa: F811
    integration()
    case = CASES[name]
    tp, cp = case["tp"], case["cp"]
    multiple = 2 * tp * cp if case["algo"] == "megatron_cp_algo" else tp * cp
    seq_lens, prompt_lens = [13, 7, 22, 9, 16], [5, 3, 6, 4, 7]
    batch, traces = _batch(seq_lens, prompt_lens, multiple)
    width = batch["input_ids"].shape[1]
    state = _state()
    engine, stub = _engine(case, state)
    partitions = []
    if case["dynamic"]:
        split = engine._split_batches_with_dynamic_bsz

        def recording(b, max_tokens, max_batch):
            batches, parts = split(b, max_tokens, max_batch)
            partitions.extend(parts)
            return batches, parts

        engine._split_batches_with_dynamic_bsz = recording
    engine._forward_backward_batch(batch, forward_only=True)
    if not case["dynamic"]:
        partitions = [list(range(i, min(i + 2, len(seq_lens)))) for i in range(0, len(seq_lens), 2)]
    assert len(stub.loaded) == len(partitions) and any(len(p) > 1 for p in partitions)
    if case["dynamic"]:
        assert [i for p in partitions for i in p] != list(range(len(seq_lens)))  # reordered
    for replay, part in zip(stub.loaded, partitions, strict=True):
        lens = [seq_lens[i] for i in part]
        probe = expected_router_probe(
            lens, tp=tp, tp_rank=case["tp_rank"], cp=cp, cp_rank=case["cp_rank"], algo=case["algo"],
            sequence_parallel=case["sp"], gathers=case["dispatcher"] == "alltoall_seq",
            remove_padding=case["remove_padding"], padded_len=width,
        )  # fmt: skip
        assert replay.num_tokens == probe.numel() and replay.layer_numbers == (1, 2)
        for row, value in enumerate(probe.tolist()):
            sample, pos = divmod(value, STRIDE)
            if value == PAD or pos >= lens[sample] - 1:
                assert bool(replay.missing()[row].all()), (name, row)
            else:
                expected = traces[part[sample]].ids[pos].to(torch.int64)
                assert torch.equal(replay.ids[row].to(torch.int64), expected), (name, row, part[sample], pos)
    assert state.consumption() == {}  # the pass was closed; every entry consumed exactly once


def test_update_pass_replays_and_reports_agreement(fakes, integration):  # noqa: F811
    integration()
    from mindspeed_rl_r3.integration.runtime import active

    batch, _ = _batch([6, 9], [2, 3], 2)
    engine, stub = _engine(CASES["padded-mbs2"], _state(), micro_batch_size=1)
    engine._forward_backward_batch(batch, forward_only=False)
    assert len(stub.loaded) == 2
    metrics = active().take_metrics()
    assert {"r3/update/set_agreement@sum", "r3/update/fallback_fraction@count"} <= set(metrics)


def test_reference_pass_routes_natively_unless_configured(fakes, integration):  # noqa: F811
    integration()
    batch, _ = _batch([6, 9], [2, 3], 2)
    engine, stub = _engine(CASES["padded-mbs2"], _state(), role="reference")
    engine._forward_backward_batch(dict(batch), forward_only=True)
    assert stub.loaded == []


def test_missing_column_and_misaligned_traces_are_refused(fakes, integration):  # noqa: F811
    integration()
    batch, traces = _batch([6, 9], [2, 3], 2)
    engine, _ = _engine(CASES["padded-mbs2"], _state())
    without = {k: v for k, v in batch.items() if k != ROUTED_EXPERTS}
    with pytest.raises(RoutingError, match="no routed_experts column"):
        engine._forward_backward_batch(without, forward_only=True)
    shifted = dict(batch)
    shifted["input_ids"] = torch.roll(batch["input_ids"], 1, dims=1)  # other tokens than the rollout routed
    engine, _ = _engine(CASES["padded-mbs2"], _state())
    with pytest.raises(RoutingError, match="token fingerprint"):
        engine._forward_backward_batch(shifted, forward_only=True)
    assert token_fingerprint(batch["input_ids"][0, :6]) == traces[0].token_hash


def test_virtual_pipeline_and_unsupported_cp_layouts_are_refused(fakes, integration):  # noqa: F811
    integration()
    from mindspeed_rl_r3.patches.mindspeed_rl_replay import router_layout

    batch, _ = _batch([6, 9], [2, 3], 4)
    engine, stub = _engine(CASES["padded-mbs2"], _state())
    engine.model = [stub, stub]
    with pytest.raises(RoutingError, match="virtual pipeline"):
        engine._forward_backward_batch(batch, forward_only=True)
    config = megatron_config(context_parallel_size=2, context_parallel_algo="hybrid_cp_algo")
    with pytest.raises(RoutingError, match="hybrid_cp_algo"):
        router_layout(config, OneRank(cp=2), remove_padding=False)
    config = megatron_config(context_parallel_size=2, reset_attention_mask=False)
    with pytest.raises(RoutingError, match="reset_attention_mask: true"):
        router_layout(config, OneRank(cp=2), remove_padding=True)
