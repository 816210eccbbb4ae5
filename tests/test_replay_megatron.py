"""Replay in real megatron-core routers on CPU (core 0.12.x through the wrappers, core 0.16+ through its hook)."""

import pytest
import torch

from mindspeed_rl_r3.replay.state import (
    MisalignedRoutingError,
    ReplayConfig,
    ReplayMode,
    RouterAction,
    RouterReplayState,
)
from mindspeed_rl_r3.routing import RoutingError, RoutingTrace
from mindspeed_rl_r3.routing.layout import ReplayBatch, RouterTokenLayout, layout_micro_batch, traces_from_recorded
from tests.megatron_models import NUM_EXPERTS, TOPK, batch, capture_routing, gpt_model, map_to_ids, moe_config

pytestmark = pytest.mark.megatron

B, S = 2, 16


def _model(megatron, num_layers=2, seed=0, alarm_min_rows=10**9, **overrides):
    """A model bound to a replay state; random replay data would trip the alarm, so it is off unless asked."""
    torch.manual_seed(seed)
    model = gpt_model(moe_config(num_layers, **overrides))
    state = RouterReplayState(ReplayConfig(mode=ReplayMode.R3, alarm_min_rows=alarm_min_rows))
    megatron.bind_replay(model, state)
    return model, state


def _random_traces(num_layers, seed, missing=0.0):
    g = torch.Generator().manual_seed(seed)
    traces = []
    for _ in range(B):
        ids = torch.rand(S - 1, num_layers, NUM_EXPERTS, generator=g).topk(TOPK, dim=-1).indices
        if missing:
            ids[torch.rand(S - 1, num_layers, generator=g) < missing] = -1
        traces.append(RoutingTrace.from_ids(ids, NUM_EXPERTS))
    return traces


def _replay_batch(traces, layers=None, numbers=None):
    return layout_micro_batch(traces, [S] * B, RouterTokenLayout(), layers=layers, layer_numbers=numbers)


def _run(model, seed=0, backward=True):
    tokens, positions, mask = batch(B, S, seed=seed)
    loss = model(tokens, positions, mask, labels=tokens).float().mean()
    if backward:
        loss.backward()
    return loss


def _native_routing(model, seed=0):
    maps, handles = capture_routing(model)
    with torch.no_grad():
        _run(model, seed, backward=False)
    for h in handles:
        h.remove()
    return {n: map_to_ids(m) for n, m in maps.items()}


def test_replayed_routing_equals_the_replay_data_and_gradients_flow(megatron):
    model, state = _model(megatron)
    traces = _random_traces(2, seed=1)
    replay = _replay_batch(traces)
    maps, handles = capture_routing(model)
    state.begin_pass(RouterAction.REPLAY)
    state.load(replay)
    _run(model)
    for h in handles:
        h.remove()
    layers = state.end_pass()
    for j, n in enumerate(replay.layer_numbers):
        ids, missing = replay.column(j)
        got = map_to_ids(maps[n])
        want = ids.sort(dim=1).values
        assert torch.equal(got[~missing], want[~missing]), n
    # Random replay ids differ from the live choice, so agreement is low but reported for every layer.
    assert [x.layer_number for x in layers] == [1, 2]
    for _, router in megatron.iter_routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_missing_rows_fall_back_to_native(megatron):
    model, state = _model(megatron)
    traces = _random_traces(2, seed=2, missing=0.5)
    replay = _replay_batch(traces)
    maps, handles = capture_routing(model)
    state.begin_pass(RouterAction.REPLAY)
    state.load(replay)
    with torch.no_grad():
        _run(model, backward=False)
    for h in handles:
        h.remove()
    state.end_pass()
    hooks = {router.layer_number: router._r3_hook for _, router in megatron.iter_routers(model)}
    for j, n in enumerate(replay.layer_numbers):
        ids, missing = replay.column(j)
        got = map_to_ids(maps[n])
        native = hooks[n].last_native.sort(dim=1).values  # the live router's own choice in this same forward
        assert missing.any() and (~missing).any()
        assert torch.equal(got[missing], native[missing]), n
        assert torch.equal(got[~missing], ids.sort(dim=1).values[~missing]), n


def _record(model, state, seed=0):
    state.begin_pass(RouterAction.RECORD)
    with torch.no_grad():
        _run(model, seed, backward=False)
    state.end_pass()
    return state.take_recorded()


def _recorded_traces(recorded):
    """Per-sample traces of a one-micro-batch recorded pass (both layers of the 2-layer model)."""
    return traces_from_recorded(
        recorded,
        [[S] * B],
        RouterTokenLayout(),
        trace_layers=[0, 1],
        layer_numbers=[1, 2],
        num_layers=2,
        num_experts=NUM_EXPERTS,
    )


def test_r2_replay_restores_recorded_routing_after_the_router_changes(megatron):
    model, state = _model(megatron)
    recorded = _record(model, state)
    numbers = sorted(recorded)
    traces = _recorded_traces(recorded)
    with torch.no_grad():
        for _, router in megatron.iter_routers(model):
            router.weight.add_(torch.randn_like(router.weight))
    drifted = _native_routing(model)
    assert any(not torch.equal(drifted[n], recorded[n][0].sort(dim=1).values) for n in numbers)

    maps, handles = capture_routing(model)
    state.begin_pass(RouterAction.REPLAY)
    state.load(_replay_batch(traces))
    _run(model)
    for h in handles:
        h.remove()
    state.end_pass()
    for n in numbers:
        got, want = map_to_ids(maps[n]), recorded[n][0].sort(dim=1).values
        last_token = torch.arange(S * B) >= (S - 1) * B  # the final position of each sample routes natively
        assert torch.equal(got[~last_token], want[~last_token])


def test_replaying_native_ids_reproduces_native_loss_and_gradients_exactly(megatron):
    model, state = _model(megatron)
    traces = _recorded_traces(_record(model, state))
    model.zero_grad()
    native_loss = _run(model)
    native_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    state.begin_pass(RouterAction.REPLAY)
    state.load(_replay_batch(traces))
    replay_loss = _run(model)
    layers = state.end_pass()
    assert torch.equal(native_loss, replay_loss)
    for k, p in model.named_parameters():
        if k in native_grads:
            assert torch.equal(p.grad, native_grads[k]), k
    assert all(x.set_agreement == 1.0 and x.mean_overlap == 1.0 for x in layers)


def test_router_gradient_matches_reference_formula(megatron):
    from megatron.core.transformer.moe.router import TopKRouter

    config = moe_config(1, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    torch.manual_seed(3)
    try:
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        router = TopKRouter(config, pg_collection=get_default_pg_collection())  # core 0.16 needs its groups
    except ImportError:
        router = TopKRouter(config)
    router.set_layer_number(1)
    holder = torch.nn.ModuleDict({"router": router})
    state = RouterReplayState(ReplayConfig(mode=ReplayMode.R3, alarm_min_rows=10**9))
    megatron.bind_replay(holder, state)
    tokens = 24
    x = torch.randn(tokens, 1, config.hidden_size)
    ids = torch.rand(tokens, NUM_EXPERTS).topk(TOPK, dim=1).indices
    replay = ReplayBatch((1,), ids.unsqueeze(1).to(torch.uint8), 255)
    weights = torch.randn(tokens, NUM_EXPERTS)

    state.begin_pass(RouterAction.REPLAY)
    state.load(replay)
    probs, routing_map = router(x)
    (probs * weights).sum().backward()
    state.end_pass()

    w = router.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(tokens, -1) @ w.t()
    ref = torch.zeros(tokens, NUM_EXPERTS).scatter(1, ids, torch.softmax(logits.gather(1, ids), dim=-1))
    (ref * weights).sum().backward()
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, ids, True))
    torch.testing.assert_close(probs, ref)
    torch.testing.assert_close(router.weight.grad, w.grad)


def test_several_micro_batches_and_exactly_once(megatron):
    model, state = _model(megatron)
    replays = [_replay_batch(_random_traces(2, seed=10 + i)) for i in range(3)]
    state.begin_pass(RouterAction.REPLAY)
    for i, replay in enumerate(replays):
        state.load(replay)
        _run(model, seed=i)
    assert state.consumption() == {1: (3, 3, 0), 2: (3, 3, 0)}
    state.end_pass()

    state.begin_pass(RouterAction.REPLAY)
    state.load(replays[0])
    state.load(replays[1])
    _run(model)
    with pytest.raises(RoutingError, match="layer 1: 1 of 2 queued micro-batches were never routed"):
        state.end_pass()

    state.begin_pass(RouterAction.REPLAY)
    state.load(replays[0])
    _run(model)
    with pytest.raises(RoutingError, match="router call 1 has no replay entry"):
        _run(model)
    state.end_pass()


@pytest.mark.parametrize(
    "recompute",
    [
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        dict(moe_layer_recompute=True),
    ],
    ids=["full", "moe_layer"],
)
def test_recompute_replays_the_same_ids_in_1f1b_order(megatron, recompute):
    """Two micro-batches, both forwards before both backwards (1F1B steady state); recompute on vs off."""
    replays = [_replay_batch(_random_traces(2, seed=4 + i)) for i in range(2)]
    results = []
    for extra in ({}, recompute):
        model, state = _model(megatron, seed=7, **extra)
        state.begin_pass(RouterAction.REPLAY)
        losses = []
        for i, replay in enumerate(replays):
            state.load(replay)
            tokens, positions, mask = batch(B, S, seed=i)
            losses.append(model(tokens, positions, mask, labels=tokens).float().mean())
        for loss in losses:
            loss.backward()
        consumption = state.consumption()
        state.end_pass()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((torch.stack(losses), grads, consumption))
    (loss_a, grads_a, cons_a), (loss_b, grads_b, cons_b) = results
    assert cons_a == {1: (2, 2, 0), 2: (2, 2, 0)}
    assert cons_b == {1: (2, 2, 2), 2: (2, 2, 2)}  # every router re-ran in backward, replaying each entry once
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_misaligned_routing_trips_the_alarm(megatron):
    model, state = _model(megatron, alarm_min_rows=8)
    aligned = _recorded_traces(_record(model, state))
    shifted = [RoutingTrace(torch.roll(t.ids, 3, dims=0), NUM_EXPERTS) for t in aligned]
    state.begin_pass(RouterAction.REPLAY)
    state.load(_replay_batch(aligned))
    _run(model, backward=False)
    state.end_pass()
    assert state.metrics()["r3/mean_overlap"] == 1.0

    state.begin_pass(RouterAction.REPLAY)
    state.load(_replay_batch(shifted))
    _run(model, backward=False)
    with pytest.raises(MisalignedRoutingError, match="layer 1: overlap"):
        state.end_pass()

    warn_state = RouterReplayState(ReplayConfig(mode="R3", on_misaligned="warn", alarm_min_rows=8))
    megatron.bind_replay(model, warn_state)
    warn_state.begin_pass(RouterAction.REPLAY)
    warn_state.load(_replay_batch(shifted))
    _run(model, backward=False)
    with pytest.warns(RuntimeWarning, match="does not match"):
        warn_state.end_pass()


def test_layout_mismatch_is_named(megatron):
    model, state = _model(megatron)
    short = [RoutingTrace(t.ids[:-4], NUM_EXPERTS) for t in _random_traces(2, seed=5)]
    state.begin_pass(RouterAction.REPLAY)
    state.load(layout_micro_batch(short, [S - 4] * B, RouterTokenLayout()))
    with pytest.raises(RoutingError, match="layer 1 micro-batch 0: the router sees 32 tokens"):
        _run(model)
    state._queues.clear()
    state.end_pass()


def test_two_stage_pipeline_binds_by_global_layer_number(megatron, monkeypatch):
    from megatron.core import parallel_state
    from megatron.core.transformer import transformer_block, transformer_layer

    from mindspeed_rl_r3.routing.stages import PipelineSplit, moe_layers_on_stage
    from mindspeed_rl_r3.routing.trace import MoEModelSpec

    spec = MoEModelSpec(num_layers=4, topk=TOPK, num_experts=NUM_EXPERTS)
    split = PipelineSplit(num_layers=4, pp_size=2)
    traces = _random_traces(4, seed=6)
    tokens, positions, mask = batch(B, S)
    hidden = None
    for pp_rank in (0, 1):
        monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda r=pp_rank: r)
        monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 2)
        monkeypatch.setattr(parallel_state, "is_pipeline_first_stage", lambda ignore_virtual=False, r=pp_rank: r == 0)
        monkeypatch.setattr(parallel_state, "is_pipeline_last_stage", lambda ignore_virtual=False, r=pp_rank: r == 1)
        for module in (transformer_block, transformer_layer):  # core 0.16 reads the stage from its groups
            if hasattr(module, "get_pg_rank"):
                monkeypatch.setattr(module, "get_pg_rank", lambda group, r=pp_rank: r)
        config = moe_config(4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
        stage = gpt_model(config, pre_process=pp_rank == 0, post_process=pp_rank == 1)
        state = RouterReplayState(ReplayConfig(mode=ReplayMode.R3, alarm_min_rows=10**9))
        bound = megatron.bind_replay(stage, state)
        layers, numbers = moe_layers_on_stage(spec, split.layer_numbers(pp_rank))
        assert bound == numbers == [2 * pp_rank + 1, 2 * pp_rank + 2]
        replay = _replay_batch(traces, layers=layers, numbers=numbers)
        maps, handles = capture_routing(stage)
        state.begin_pass(RouterAction.REPLAY)
        state.load(replay)
        with torch.no_grad():
            if pp_rank == 0:
                hidden = stage(tokens, positions, mask)
            else:
                stage.set_input_tensor(hidden)
                stage(tokens, positions, mask, labels=tokens)
        state.end_pass()
        for h in handles:
            h.remove()
        for j, n in enumerate(numbers):
            ids, missing = replay.column(j)
            assert torch.equal(map_to_ids(maps[n])[~missing], ids.sort(dim=1).values[~missing])


def test_binding_refuses_what_cannot_replay(megatron):
    model = gpt_model(moe_config(2))
    state = RouterReplayState()
    megatron.bind_replay(model, state)
    state.begin_pass(RouterAction.REPLAY)
    with pytest.raises(RoutingError, match="no replay ids for layers"):
        state.load(_replay_batch(_random_traces(2, seed=1), layers=[0], numbers=[1]))
    state.end_pass()
    with pytest.raises(RoutingError, match="sinkhorn routing has no top-k"):
        megatron.bind_replay(gpt_model(moe_config(2, moe_router_load_balancing_type="sinkhorn")), state)


def test_r2_records_per_micro_batch_and_replays_under_another_split(megatron):
    from mindspeed_rl_r3.replay.state import action_for
    from mindspeed_rl_r3.routing.layout import select_micro_batch

    model, state = _model(megatron)
    r2 = ReplayConfig(mode="R2")
    assert action_for(r2, "old_log_prob") is RouterAction.RECORD and action_for(r2, "update") is RouterAction.REPLAY
    tokens, positions, mask = batch(B, S, seed=3)
    state.begin_pass(action_for(r2, "old_log_prob"))
    with torch.no_grad():  # old log-prob: one sample per micro-batch
        for b in range(B):
            model(tokens[b : b + 1], positions[b : b + 1], mask)
    state.end_pass()
    traces = traces_from_recorded(
        state.take_recorded(),
        [[S]] * B,
        RouterTokenLayout(),
        trace_layers=[0, 1],
        layer_numbers=[1, 2],
        num_layers=2,
        num_experts=NUM_EXPERTS,
    )
    with torch.no_grad():
        for _, router in megatron.iter_routers(model):
            router.weight.add_(torch.randn_like(router.weight))
    # update: both samples in one micro-batch, in reversed (dynamic batch size) order
    order = [1, 0]
    replay = layout_micro_batch(select_micro_batch(traces, order), [S] * B, RouterTokenLayout())
    maps, handles = capture_routing(model)
    state.begin_pass(action_for(r2, "update"))
    state.load(replay)
    model(tokens[order], positions, mask, labels=tokens[order]).float().mean().backward()
    state.end_pass()
    for h in handles:
        h.remove()
    for j, n in enumerate(replay.layer_numbers):
        ids, missing = replay.column(j)
        assert missing.sum() == B  # only each sample's last position routes natively
        assert torch.equal(map_to_ids(maps[n])[~missing], ids.sort(dim=1).values[~missing])


def test_stage_actions():
    from mindspeed_rl_r3.replay.state import action_for

    r3 = ReplayConfig(mode="R3")
    assert [action_for(r3, s) for s in ("old_log_prob", "update", "reference")] == [
        RouterAction.REPLAY,
        RouterAction.REPLAY,
        RouterAction.NATIVE,
    ]
    assert action_for(ReplayConfig(mode="R3", replay_reference=True), "reference") is RouterAction.REPLAY
    assert action_for(ReplayConfig(), "update") is RouterAction.NATIVE
    with pytest.raises(RoutingError, match="needs mode R3"):
        action_for(ReplayConfig(mode="R2", replay_reference=True), "reference")
    with pytest.raises(ValueError, match="aux_loss_routing"):  # replay.modes.ReplayConfigError, torch-free
        ReplayConfig(aux_loss_routing="both")
    observe = ReplayConfig(mode="observe")
    assert [action_for(observe, s) for s in ("old_log_prob", "update", "reference")] == [
        RouterAction.OBSERVE,
        RouterAction.OBSERVE,
        RouterAction.NATIVE,
    ]
    with pytest.raises(ValueError, match="replay_reference replays routing: it needs mode R3"):
        ReplayConfig(mode="observe", replay_reference=True)


def test_observe_measures_agreement_but_routes_natively(megatron):
    model, state = _model(megatron)
    native = _native_routing(model)
    traces = _random_traces(2, seed=12)
    maps, handles = capture_routing(model)
    state.begin_pass(RouterAction.OBSERVE)
    state.load(_replay_batch(traces))
    with torch.no_grad():
        _run(model, backward=False)
    layers = state.end_pass()
    for h in handles:
        h.remove()
    for n in native:
        assert torch.equal(map_to_ids(maps[n]), native[n])
    assert [x.layer_number for x in layers] == [1, 2] and all(x.mean_overlap < 0.9 for x in layers)


def _dispatched_pass(model, state, action, traces):
    """One pass under ``action``; returns the per-layer alignment and each router's routing map."""
    maps, handles = capture_routing(model)
    state.begin_pass(action)
    state.load(_replay_batch(traces))
    with torch.no_grad():
        _run(model, backward=False)
    for h in handles:
        h.remove()
    return {x.layer_number: x for x in state.end_pass()}, maps


def _differing_rows(routing_map, traces, j):
    """Rows with rollout routing whose dispatched expert set differs from the rollout's (an independent count)."""
    ids, missing = _replay_batch(traces).column(j)
    rollout = torch.zeros_like(routing_map).scatter(1, ids.clamp(min=0), True)
    return int(((routing_map != rollout).any(dim=1) & ~missing).sum()), int((~missing).sum())


@pytest.mark.parametrize("missing", [0.0, 0.2])
def test_routing_mismatch_is_zero_under_replay_and_the_native_gap_under_observe(megatron, missing):
    model, state = _model(megatron)
    traces = _random_traces(2, seed=21, missing=missing)
    replayed, _ = _dispatched_pass(model, state, RouterAction.REPLAY, traces)
    observed, maps = _dispatched_pass(model, state, RouterAction.OBSERVE, traces)
    for j, n in enumerate(sorted(maps)):
        differs, rows = _differing_rows(maps[n], traces, j)
        assert replayed[n].dispatched_rows == observed[n].dispatched_rows == rows > 0
        assert replayed[n].routing_mismatch == 0.0
        # random rollout ids against the live router: almost every row differs, and exactly the counted ones
        assert observed[n].routing_mismatch == differs / rows > 0.5
        assert observed[n].routing_mismatch == pytest.approx(1.0 - observed[n].set_agreement)
    metrics = state.metrics()
    assert metrics["r3/routing_mismatch"] == pytest.approx(
        sum(observed[n].routing_mismatch * observed[n].dispatched_rows for n in observed)
        / sum(x.dispatched_rows for x in observed.values())
    )


def test_routing_mismatch_counts_tokens_dropped_after_replay(megatron):
    """The measurement reads the map the layer dispatches, not the replayed ids: capacity drops show up."""
    model, state = _model(megatron, moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")
    traces = _random_traces(2, seed=22)
    replayed, maps = _dispatched_pass(model, state, RouterAction.REPLAY, traces)
    for j, n in enumerate(sorted(maps)):
        differs, rows = _differing_rows(maps[n], traces, j)
        assert replayed[n].routing_mismatch == differs / rows > 0.0


def test_recomputed_forwards_are_not_measured_twice(megatron):
    model, state = _model(megatron, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    traces = _random_traces(2, seed=23)
    state.begin_pass(RouterAction.REPLAY)
    state.load(_replay_batch(traces))
    _run(model)  # the backward re-runs every router once
    layers = state.end_pass()
    assert [x.dispatched_rows for x in layers] == [B * (S - 1)] * 2
    assert [x.routing_mismatch for x in layers] == [0.0, 0.0]
