"""The routing replay feed against MindSpeed-RL's own batch utilities (05a90d77): the real dispatch padding
(``unpack_pad_experience``), micro-batch split (fixed, and dynamic batch size through ``rearrange_micro_batches``),
remove-padding packing (``preprocess_packed_seqs``) and CP split (``get_batch_on_this_cp_rank``, megatron zigzag per
packed sample / over the row, ulysses), all run by the real ``BaseTrainingEngine`` on a one-rank or mocked parallel
state.

Every token id is a probe ``1 + sample * STRIDE + position`` (0 is padding), so whatever the real functions do to
the batch, the model stub can read which (sample, position) each router row holds; the package's replay must hand
that row exactly the rollout's experts for that token (and native routing where the trace has none). Only the last
step, Megatron's ``[b, s] -> [s, b]`` embedding with the SP scatter / ``alltoall_seq`` TP gather, is a restatement
(``tests.layout_oracle.router_rows``): it needs a TP group."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from mindspeed_rl_r3.integration.settings import ROUTED_EXPERTS
from mindspeed_rl_r3.replay.state import ReplayConfig, ReplayMode, RouterReplayState
from mindspeed_rl_r3.routing import RoutingError, RoutingTrace, encode
from tests.layout_oracle import STRIDE, router_rows
from tests.upstream.support import integration  # noqa: F401  (fixture)

LAYERS, TOPK, EXPERTS, PAD_ID = 2, 2, 8, 0


@dataclass(frozen=True)
class Parallel:
    """One rank's parallel settings, as MindSpeed-RL's config and parallel state give them."""

    tp: int = 1
    tp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0
    algo: str = "megatron_cp_algo"
    sp: bool = False
    dispatcher: str = "alltoall_seq"
    remove_padding: bool = False
    dynamic: bool = False
    reset_attention_mask: bool = False

    @property
    def multiple(self) -> int:
        """The dispatch's padding multiple (``BaseWorker.dispatch_transfer_dock_data``)."""
        return 2 * self.tp * self.cp if self.algo == "megatron_cp_algo" else self.tp * self.cp


class OneRank:
    """``megatron.core.parallel_state`` of one rank of a (tp, cp) group, for ``mindspeed_rl.utils.compute``."""

    def __init__(self, p: Parallel) -> None:
        self.p = p

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.p.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.p.tp_rank

    def get_context_parallel_world_size(self) -> int:
        return self.p.cp

    def get_context_parallel_rank(self) -> int:
        return self.p.cp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_world_size(self) -> int:
        return 1


def megatron_config(p: Parallel, **overrides: Any) -> Any:
    """MindSpeed-RL's own ``MegatronConfig`` for a 2-layer, 8-expert, top-2 MoE under ``p``."""
    from mindspeed_rl.config_cls.megatron_config import MegatronConfig

    values = dict(
        stage="ray_grpo", num_layers=LAYERS, num_experts=EXPERTS, moe_router_topk=TOPK,
        tensor_model_parallel_size=p.tp, context_parallel_size=p.cp, context_parallel_algo=p.algo,
        sequence_parallel=p.sp, moe_token_dispatcher_type=p.dispatcher, reset_attention_mask=p.reset_attention_mask,
    )  # fmt: skip
    values.update(overrides)
    return MegatronConfig(values, {})


def random_traces(seq_lens: list[int], tokens: list[torch.Tensor], seed: int) -> list[RoutingTrace]:
    """A trace per sample (``len - 1`` rows of distinct random ids), fingerprinted with the sample's tokens."""
    g = torch.Generator().manual_seed(seed)
    traces = []
    for n, t in zip(seq_lens, tokens, strict=True):
        ids = torch.rand(n - 1, LAYERS, EXPERTS, generator=g).argsort(-1)[..., :TOPK]
        traces.append(RoutingTrace.from_ids(ids, EXPERTS, token_ids=t))
    return traces


def dispatch_batch(tokens: list[torch.Tensor], prompt_lens: list[int], traces: list[RoutingTrace], multiple: int):
    """The padded batch a worker gets from the TransferDock, through MindSpeed-RL's ``unpack_pad_experience``."""
    from mindspeed_rl.trainer.utils.transfer_dock import unpack_pad_experience

    payloads = [encode(t) for t in traces]
    columns = {
        "input_ids": tokens,
        "responses": [t[p:] for t, p in zip(tokens, prompt_lens, strict=True)],
        ROUTED_EXPERTS: payloads,
    }
    data = {k: torch.cat(v) for k, v in columns.items()}
    lengths = {k: torch.tensor([x.numel() for x in v]) for k, v in columns.items()}
    data["prompt_length"] = torch.tensor(prompt_lens)
    data["response_length"] = lengths["responses"].clone()
    lengths["prompt_length"] = lengths["response_length"] = torch.ones(len(tokens), dtype=torch.long)
    return unpack_pad_experience(data, lengths, PAD_ID, multiple)


def actor(model: list, config: Any, p: Parallel, schedule: Any, *, micro_batch_size: int, max_tokens: int = 0):
    """``Actor`` built the way ``ActorHybridWorkerBase.initialize`` builds its ``ActorRolloutHybrid``."""
    from mindspeed.core.context_parallel.get_batch_utils import get_actual_seq_len, set_actual_seq_len
    from mindspeed.utils import set_position_ids
    from mindspeed_rl.models.actor import Actor

    return Actor(
        model, optimizer=None, opt_param_scheduler=None, megatron_config=config, stage="ray_grpo",
        forward_backward_func=schedule, micro_batch_size=micro_batch_size, clip_ratio=0.2, kl_penalty="low_var_kl",
        use_remove_padding=p.remove_padding, use_dynamic_bsz=p.dynamic,
        actor_max_packing_token_size=max_tokens, update_max_packing_token_size=max_tokens,
        set_actual_seq_len=set_actual_seq_len, get_actual_seq_len=get_actual_seq_len,
        set_position_ids=set_position_ids, context_parallel_size=p.cp,
    )  # fmt: skip


class ProbeRouters(torch.nn.Module):
    """Stands for the Megatron model: reads the probe tokens it is fed, turns them into the rows its routers see
    (``router_rows``) and routes every MoE layer through the replay state, keeping what each row got."""

    def __init__(self, p: Parallel) -> None:
        super().__init__()
        self.p = p
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.state = RouterReplayState(ReplayConfig(mode=ReplayMode.R3, alarm_min_rows=10**9))
        self.state.bind_layers(list(range(1, LAYERS + 1)))
        self._r3_replay_state = self.state  # what the replay patch binds on a real model
        self.seen: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        p = self.p
        rows = router_rows(input_ids, p.tp, p.tp_rank, p.sp, p.dispatcher == "alltoall_seq")
        routed, native = [], []
        for n in range(1, LAYERS + 1):
            scores = torch.rand(rows.numel(), EXPERTS)
            _, ids, own = self.state.route(n, scores, TOPK, None, None, _topk)
            routed.append(ids)
            native.append(own)
        self.seen.append((rows, routed, native))
        return torch.zeros(*input_ids.shape, 4)


def _topk(scores, k, num_groups=None, group_topk=None):
    return torch.topk(scores, k, dim=1)


def forward_only(forward_step_func, data_iterator, model, num_microbatches, forward_only, **_):
    """The schedule without the loss: the stub's logits are not log-probs."""
    out = []
    for _ in range(num_microbatches):
        _, loss = forward_step_func(data_iterator, model[0])
        out.append(torch.zeros(loss.keywords["batch"]["prompt_length"].shape[0], 1))
    return out


def assert_rows_replay_their_tokens(seen, traces: list[RoutingTrace], seq_lens: list[int]) -> int:
    """Every router row holding a token with a trace row replays exactly that row; the rest route natively.
    Returns how many rows replayed."""
    replayed = 0
    for rows, routed, native in seen:
        for r, value in enumerate(rows.tolist()):
            sample, pos = divmod(value - 1, STRIDE)
            for j in range(LAYERS):
                if value == PAD_ID or pos >= seq_lens[sample] - 1:
                    assert torch.equal(routed[j][r], native[j][r]), (r, value, j)
                    continue
                expected = traces[sample].ids[pos, j].long().sort().values
                assert torch.equal(routed[j][r].sort().values, expected), (r, sample, pos, j)
                replayed += 1
    return replayed


def random_parallel(rng: random.Random) -> Parallel:
    """A supported rank setting: megatron zigzag CP packs per sample (reset_attention_mask) with remove-padding and
    splits the whole row without it."""
    tp, cp = rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
    algo = rng.choice(["megatron_cp_algo", "ulysses_cp_algo"])
    remove_padding = rng.random() < 0.5
    reset = remove_padding if algo == "megatron_cp_algo" and cp > 1 else rng.random() < 0.5
    return Parallel(
        tp=tp, tp_rank=rng.randrange(tp), cp=cp, cp_rank=rng.randrange(cp), algo=algo, sp=tp > 1 and rng.random() < 0.5,
        dispatcher=rng.choice(["alltoall_seq", "alltoall", "allgather"]), remove_padding=remove_padding,
        dynamic=rng.random() < 0.5, reset_attention_mask=reset,
    )  # fmt: skip


def random_samples(rng: random.Random, sample_offset: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    lens = [rng.randint(2, 30) for _ in range(rng.randint(3, 7))]
    prompts = [rng.randint(1, n - 1) for n in lens]
    tokens = [1 + (sample_offset + b) * STRIDE + torch.arange(n) for b, n in enumerate(lens)]
    return tokens, prompts


def run_probe(monkeypatch, p: Parallel, seed: int, config: Any = None, spread: bool = False) -> tuple[int, list[int]]:
    """One forward-only replay pass of a random batch through the real engine; returns (replayed rows, micro-batch
    router sizes). ``spread``: micro-batches of 2, or the tightest token budget, so there are several."""
    from mindspeed_rl.utils import compute

    rng = random.Random(seed)
    tokens, prompts = random_samples(rng)
    lens = [t.numel() for t in tokens]
    traces = random_traces(lens, tokens, seed)
    batch = dispatch_batch(tokens, prompts, traces, p.multiple)
    monkeypatch.setattr(compute, "_ParallelState", OneRank(p))
    model = ProbeRouters(p)
    micro, slack = (2, 0) if spread else (rng.randint(1, 3), rng.randint(0, 30))
    engine = actor([model], config or megatron_config(p), p, forward_only, micro_batch_size=micro,
                   max_tokens=max(lens) + slack)  # fmt: skip
    out = engine._forward_backward_batch(batch, forward_only=True)
    assert model.state.consumption() == {}  # the pass was closed: every micro-batch consumed exactly once
    sizes = [routed[0].shape[0] for _, routed, _ in model.seen]
    assert len(out) == len(model.seen) or p.dynamic
    return assert_rows_replay_their_tokens(model.seen, traces, lens), sizes


CASES = {
    "padded": Parallel(),
    "packed": Parallel(remove_padding=True),
    "packed-dynamic": Parallel(remove_padding=True, dynamic=True),
    "padded-dynamic-tp2-sp-gather": Parallel(tp=2, tp_rank=1, sp=True, dynamic=True),
    "packed-tp2-sp-alltoall": Parallel(tp=2, tp_rank=1, sp=True, dispatcher="alltoall", remove_padding=True),
    "padded-cp2-zigzag": Parallel(cp=2, cp_rank=1),
    "packed-cp2-zigzag-dynamic": Parallel(cp=2, cp_rank=1, remove_padding=True, dynamic=True,
                                          reset_attention_mask=True),
    "packed-cp4-zigzag-tp2-sp": Parallel(tp=2, tp_rank=0, cp=4, cp_rank=2, sp=True, remove_padding=True,
                                         reset_attention_mask=True),
    "padded-ulysses-cp2-tp2-sp": Parallel(tp=2, tp_rank=1, cp=2, cp_rank=0, algo="ulysses_cp_algo", sp=True,
                                          dispatcher="alltoall"),
    "packed-ulysses-cp2": Parallel(cp=2, cp_rank=1, algo="ulysses_cp_algo", remove_padding=True, dynamic=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_router_rows_replay_the_tokens_the_real_engine_feeds(integration, monkeypatch, name):  # noqa: F811
    integration()
    replayed, sizes = run_probe(monkeypatch, CASES[name], seed=sum(map(ord, name)), spread=True)
    assert replayed > 0 and len(sizes) > 1


def test_random_batches_and_rank_settings(integration, monkeypatch):  # noqa: F811
    integration()
    rng = random.Random(7)
    replayed = 0
    for i in range(40):
        replayed += run_probe(monkeypatch, random_parallel(rng), seed=1000 + i)[0]  # a rank may hold only padding
    assert replayed > 0


def test_every_cp_and_tp_rank_sees_each_token_once(integration, monkeypatch):  # noqa: F811
    """Over all ranks of a tp2 x cp2 group with SP (no TP gather), every trace row is replayed exactly once."""
    integration()
    for base in (Parallel(algo="megatron_cp_algo", remove_padding=True, reset_attention_mask=True),
                 Parallel(algo="ulysses_cp_algo"), Parallel(algo="megatron_cp_algo")):  # fmt: skip
        total = 0
        for tp_rank in range(2):
            for cp_rank in range(2):
                p = replace(base, tp=2, tp_rank=tp_rank, cp=2, cp_rank=cp_rank, sp=True, dispatcher="alltoall")
                replayed, _ = run_probe(monkeypatch, p, seed=5)
                total += replayed
        tokens, _ = random_samples(random.Random(5))
        assert total == sum(t.numel() - 1 for t in tokens) * LAYERS, base


def test_cp_algorithm_without_cp_pads_packed_samples_like_the_engine(integration, monkeypatch):  # noqa: F811
    """With context_parallel_size 1 the engine packs remove-padding samples to 2*tp only for megatron_cp_algo and
    to tp for any other algorithm (MindSpeed-RL's config default is ulysses_cp_algo; hybrid_cp_algo is valid too)."""
    integration()
    for algo in ("ulysses_cp_algo", "hybrid_cp_algo", "megatron_cp_algo"):
        p = Parallel(remove_padding=True, algo="megatron_cp_algo" if algo == "megatron_cp_algo" else "ulysses_cp_algo")
        config = megatron_config(p, context_parallel_algo=algo)
        replayed, _ = run_probe(monkeypatch, p, seed=11, config=config)
        assert replayed > 0, algo


def test_unsupported_cp_layouts_are_refused_before_any_forward(integration, monkeypatch):  # noqa: F811
    """The layouts the replay cannot follow are refused with the setting to change, not replayed misaligned."""
    integration()
    refused = {
        "hybrid_cp_algo": (Parallel(cp=2, algo="megatron_cp_algo"), {"context_parallel_algo": "hybrid_cp_algo"}),
        "reset_attention_mask: true": (Parallel(cp=2, remove_padding=True), {}),
        "stale": (Parallel(cp=2), {"reset_attention_mask": True}),
    }
    for match, (p, overrides) in refused.items():
        with pytest.raises(RoutingError, match=match):
            run_probe(monkeypatch, p, seed=3, config=megatron_config(p, **overrides))
