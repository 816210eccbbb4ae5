"""Routing replay in MindSpeed-RL's real training engine (05a90d77) on a real megatron-core MoE ``GPTModel`` on CPU:
the real ``Actor`` with its GRPO actor loss, Megatron's own no-pipelining schedule, fixed and dynamic batch size,
right-padded and remove-padding batches. The package's patches are activated the way a Ray worker activates them.

Every (sample, position) of a batch gets its own token id, so the tokens the model is fed tell which routing row
each router row must replay; forward hooks on the routers read what they really chose."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from mindspeed_rl_r3.integration.metrics import reduce_entries
from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.routing import RoutingError, RoutingTrace
from tests.upstream.support import R3_SECTIONS, integration  # noqa: F401  (fixture)
from tests.upstream.test_batch_utils import EXPERTS, LAYERS, Parallel, actor, dispatch_batch, megatron_config

pytestmark = pytest.mark.megatron

VOCAB = 128
SETTINGS = {
    "padded": Parallel(dispatcher="allgather"),
    "padded-dynamic": Parallel(dispatcher="allgather", dynamic=True),
    "packed": Parallel(dispatcher="allgather", remove_padding=True),
    "packed-dynamic": Parallel(dispatcher="allgather", remove_padding=True, dynamic=True),
}


class Samples:
    """A GRPO batch of distinct tokens: ``ids[b]`` are sample b's prompt + response tokens."""

    def __init__(self, seed: int, count: int = 5) -> None:
        rng = random.Random(seed)
        self.lens = [rng.randint(5, 13) for _ in range(count)]
        self.prompts = [rng.randint(2, n - 2) for n in self.lens]
        order = torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(seed))[: sum(self.lens)] + 1
        self.ids = list(torch.split(order, self.lens))
        self.where = {int(t): (b, pos) for b, ids in enumerate(self.ids) for pos, t in enumerate(ids.tolist())}

    def random_traces(self, seed: int) -> list[RoutingTrace]:
        g = torch.Generator().manual_seed(seed)
        ids = [torch.rand(n - 1, LAYERS, EXPERTS, generator=g).argsort(-1)[..., :2] for n in self.lens]
        return self.traces(ids)

    def traces(self, ids: list[torch.Tensor]) -> list[RoutingTrace]:
        return [RoutingTrace.from_ids(x, EXPERTS, token_ids=t) for x, t in zip(ids, self.ids, strict=True)]

    def batch(self, traces: list[RoutingTrace], p: Parallel, **float_columns: list[torch.Tensor]) -> dict:
        batch = dispatch_batch(self.ids, self.prompts, traces, p.multiple)
        width = batch["responses"].shape[1]
        for name, rows in float_columns.items():
            batch[name] = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
        return batch

    def response_rows(self, value: float, seed: int | None = None) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed or 0)
        rows = [torch.full((n - p,), value) for n, p in zip(self.lens, self.prompts, strict=True)]
        return [r + torch.randn(r.shape, generator=g) if seed is not None else r for r in rows]


class RouterTap:
    """What the model was fed and what each router chose, per micro-batch, by global layer number."""

    def __init__(self, model: torch.nn.Module) -> None:
        from mindspeed_rl_r3.patches.megatron_router import iter_routers

        self.tokens: list[torch.Tensor] = []
        self.choices: dict[int, list[torch.Tensor]] = {}
        self.handles = [model.register_forward_pre_hook(self._fed, with_kwargs=True)]
        for _, router in iter_routers(model):
            self.handles.append(router.register_forward_hook(self._chose(int(router.layer_number))))

    def _fed(self, _module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens.append(input_ids.detach().transpose(0, 1).reshape(-1).clone())  # the routers' s-major rows

    def _chose(self, n: int):
        def hook(_module, _inputs, output):
            routing_map = output[1].detach()
            self.choices.setdefault(n, []).append(routing_map.nonzero()[:, 1].reshape(routing_map.shape[0], -1))

        return hook

    def rows(self):
        """``(token, {layer number: sorted expert ids})`` for every router row, in router order."""
        for m, tokens in enumerate(self.tokens):
            for r, t in enumerate(tokens.tolist()):
                yield t, {n: self.choices[n][m][r] for n in self.choices}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def grpo_actor(model, p: Parallel, *, max_tokens: int = 24):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from mindspeed_rl.trainer.utils.compute_utils import FixedKLController

    engine = actor([model], megatron_config(p, moe_token_dispatcher_type="allgather"), p, get_forward_backward_func(),
                   micro_batch_size=2, max_tokens=max_tokens)  # fmt: skip
    engine.kl_ctrl = FixedKLController(0.01)  # what update_actor(data, kl_ctrl) sets
    return engine


@pytest.fixture
def moe(megatron, monkeypatch):
    """A fresh 2-layer, 8-expert top-2 megatron-core GPTModel, MindSpeed-RL's parallel state and vocab-parallel
    cross entropy set the way ``BaseWorker.setup_distributed_rank`` sets them."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from mindspeed_rl.utils import compute

    from tests.megatron_models import gpt_model, moe_config

    monkeypatch.setattr(compute, "_ParallelState", parallel_state)
    monkeypatch.setattr(compute, "_VocabParallel", vocab_parallel_cross_entropy)
    # A backward outside Megatron's schedule (other tests) leaves a 0-d aux-loss scale the schedule cannot copy into.
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    _moe_logging_tracker().clear()
    torch.manual_seed(0)
    model = gpt_model(moe_config(LAYERS), vocab_size=VOCAB)
    yield model
    _moe_logging_tracker().clear()


def _moe_logging_tracker() -> dict:
    """Megatron's global layer-wise aux-loss tracker (sized by the first MoE model that logs)."""
    from megatron.core import parallel_state

    return parallel_state.get_moe_layer_wise_logging_tracker()


def replay_counts(tap: RouterTap, samples: Samples, traces: list[RoutingTrace]) -> tuple[int, int]:
    """Checks every router row: rows with a trace row chose exactly its experts. Returns (replayed, other) rows."""
    replayed = other = 0
    for token, chosen in tap.rows():
        b, pos = samples.where.get(token, (None, None))
        if b is None or pos >= samples.lens[b] - 1:
            other += 1
            continue
        for n, ids in chosen.items():
            assert torch.equal(ids, traces[b].ids[pos, n - 1].long().sort().values), (b, pos, n)
        replayed += 1
    return replayed, other


def stage_metrics(runtime: Any, stage: str) -> dict[str, float]:
    reduced, _ = reduce_entries(runtime.take_metrics())
    return {k.split("/", 2)[2]: v for k, v in reduced.items() if k.startswith(f"r3/{stage}/")} | {
        k: v for k, v in reduced.items() if k.startswith("mismatch/")
    }


@pytest.mark.parametrize("name", list(SETTINGS))
def test_update_pass_replays_the_rollout_experts_and_trains_the_router(moe, integration, name):  # noqa: F811
    integration()
    from mindspeed_rl_r3.integration.runtime import active

    p = SETTINGS[name]
    samples = Samples(seed=3)
    traces = samples.random_traces(seed=4)
    batch = samples.batch(traces, p, old_log_prob=samples.response_rows(-2.0, seed=1),
                          ref_log_prob=samples.response_rows(-2.0, seed=2), advantages=samples.response_rows(1.0),
                          **{ROLLOUT_LOG_PROBS: samples.response_rows(-2.0, seed=5)})  # fmt: skip
    engine = grpo_actor(moe, p)
    tap = RouterTap(moe)
    try:
        stats = engine._forward_backward_batch(batch, forward_only=False)
    finally:
        tap.remove()
    replayed, other = replay_counts(tap, samples, traces)
    assert replayed == sum(n - 1 for n in samples.lens) and other > 0
    assert len(stats) == len(tap.tokens) > 1 and all("actor/pg_loss" in s for s in stats)
    metrics = stage_metrics(active(), "update")
    assert 0.0 <= metrics["set_agreement"] < 0.5  # random traces: the live router rarely agrees
    assert metrics["fallback_fraction"] == pytest.approx(other / (replayed + other))
    assert {"mismatch/update/k3_kl", "mismatch/update/max_abs_dlogp"} <= set(metrics)
    for layer in moe.decoder.layers:  # gate weights come from the live logits: gradients reach every router
        assert layer.mlp.router.weight.grad is not None and layer.mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["padded", "packed-dynamic"])
def test_old_log_prob_pass_replaying_native_routing_reproduces_native_log_probs(moe, integration, name):  # noqa: F811
    """Traces of the training router's own choices replay with agreement 1 and give the native log-probs; random
    traces replay too, and move the log-probs."""
    p = SETTINGS[name]
    samples = Samples(seed=8)
    engine = grpo_actor(moe, p)
    tap = RouterTap(moe)
    native_out, _ = engine.compute_log_prob(samples.batch(samples.random_traces(0), p))  # R3 not active: native
    tap.remove()
    ids = [torch.zeros(n - 1, LAYERS, 2, dtype=torch.long) for n in samples.lens]
    for token, chosen in tap.rows():
        b, pos = samples.where.get(token, (None, None))
        if b is not None and pos < samples.lens[b] - 1:
            for n, row in chosen.items():
                ids[b][pos, n - 1] = row
    native_traces = samples.traces(ids)

    integration()
    from mindspeed_rl_r3.integration.runtime import active

    tap = RouterTap(moe)
    replay_out, _ = engine.compute_log_prob(samples.batch(native_traces, p))
    tap.remove()
    assert replay_counts(tap, samples, native_traces)[0] == sum(n - 1 for n in samples.lens)
    metrics = stage_metrics(active(), "old_log_prob")
    assert metrics["set_agreement"] == 1.0 and metrics["min_layer_overlap"] == 1.0
    assert torch.allclose(torch.cat(replay_out), torch.cat(native_out), atol=1e-5)

    random_out, _ = engine.compute_log_prob(samples.batch(samples.random_traces(9), p))
    assert stage_metrics(active(), "old_log_prob")["set_agreement"] < 0.5
    assert not torch.allclose(torch.cat(random_out), torch.cat(native_out), atol=1e-3)


def test_reference_pass_routes_natively(moe, integration):  # noqa: F811
    integration()
    from mindspeed_rl.models.reference import Reference

    p = SETTINGS["padded"]
    samples = Samples(seed=2)
    reference = Reference([moe], megatron_config=megatron_config(p), stage="ray_grpo", micro_batch_size=2,
                          forward_backward_func=grpo_actor(moe, p).forward_backward_func)  # fmt: skip
    batch = samples.batch(samples.random_traces(1), p)
    del batch[ROUTED_EXPERTS]  # the reference dispatch does not fetch the column unless r3.replay_reference
    output, _ = reference.compute_log_prob(batch)  # a replaying pass would refuse the batch without the column
    assert torch.cat(output).shape == batch["responses"].shape
    assert not hasattr(moe, "_r3_replay_state")  # the routers were never bound for replay


def test_missing_column_and_misaligned_traces_are_refused(moe, integration):  # noqa: F811
    integration()
    p = SETTINGS["padded"]
    samples = Samples(seed=4)
    engine = grpo_actor(moe, p)
    traces = samples.random_traces(2)
    batch = samples.batch(traces, p)
    without = {k: v for k, v in batch.items() if k != ROUTED_EXPERTS}
    with pytest.raises(RoutingError, match="no routed_experts column"):
        engine.compute_log_prob(without)
    shifted = samples.batch(traces, p)
    shifted["input_ids"] = torch.roll(shifted["input_ids"], 1, dims=1)  # other tokens than the rollout routed
    with pytest.raises(RoutingError, match="token fingerprint"):
        engine.compute_log_prob(shifted)
    short = samples.batch(traces[1:] + traces[:1], p)  # traces of other samples: the row counts differ
    with pytest.raises(RoutingError, match="sample 0"):
        engine.compute_log_prob(short)
    engine.model = [moe, moe]
    with pytest.raises(RoutingError, match="virtual pipeline"):
        engine.compute_log_prob(samples.batch(traces, p))


def test_routing_of_other_tokens_trips_the_alignment_alarm(moe, integration):  # noqa: F811
    """Traces without token fingerprints, one position off: the replay agrees with the live router no better than
    chance, and the pass fails instead of training on it."""
    from mindspeed_rl_r3.replay.state import MisalignedRoutingError

    p = SETTINGS["padded"]
    samples = Samples(seed=6)
    engine = grpo_actor(moe, p)
    tap = RouterTap(moe)
    engine.compute_log_prob(samples.batch(samples.random_traces(0), p))  # R3 not active yet: native routing
    tap.remove()
    ids = [torch.zeros(n - 1, LAYERS, 2, dtype=torch.long) for n in samples.lens]
    for token, chosen in tap.rows():
        b, pos = samples.where.get(token, (None, None))
        if b is not None and 0 < pos < samples.lens[b]:
            for n, row in chosen.items():
                ids[b][pos - 1, n - 1] = row  # row pos-1 gets the experts of token pos
    shifted = [RoutingTrace.from_ids(x, EXPERTS) for x in ids]
    integration({**R3_SECTIONS, "r3": {**R3_SECTIONS["r3"], "alarm_min_rows": 8}})
    with pytest.raises(MisalignedRoutingError, match="other tokens"):
        engine.compute_log_prob(samples.batch(shifted, p))
