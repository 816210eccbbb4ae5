"""The real ``GRPOTransferDock`` (MindSpeed-RL 05a90d77) as a Ray actor, built by the patched ``RayGRPOTrainer``:
the routing and log-prob columns round-trip through it, what each of its sampling modes hands a consumer (and what
that means for group-deduplicated routing), and partial rollout's placeholders and segments."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mindspeed_rl_r3.integration.feed import expand_group_payloads, micro_batch_traces
from mindspeed_rl_r3.integration.rollout_columns import (
    GeneratedSample,
    join_partial,
    previous_segments,
    rollout_columns,
)
from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.routing import RoutingError, RoutingTrace, decode
from tests.routing_data import random_ids
from tests.upstream.support import R3_SECTIONS, integration, ray_cluster, reset_integration  # noqa: F401  (fixtures)

PACKAGE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "grpo_qwen3_30b_a3b_lora_r3_aqn.yaml"
LAYERS, TOPK, EXPERTS = 2, 2, 8
N, PROMPTS = 4, 2  # GRPO group size, prompts per step: the dock holds 8 rows
PAD = 151643
MSRL_COLUMNS = [
    "prompts", "prompt_length", "responses", "response_length", "attention_mask", "labels", "input_ids",
    "input_ids_length", "actor_rollout", "rm_scores", "token_level_rewards", "old_log_prob", "ref_log_prob",
    "advantages", "returns",
]  # fmt: skip
CONSUMED = ["responses", "input_ids", "prompt_length", "response_length", ROUTED_EXPERTS, ROLLOUT_LOG_PROBS]


# -- shared with test_trainer.py ---------------------------------------------------------------------------------------
def package_rl_config(**overrides: Any) -> Any:
    """MindSpeed-RL's real ``RLConfig`` from the package's shipped config (its ``rl_config`` section) and overrides."""
    import yaml
    from mindspeed_rl.config_cls.rl_config import RLConfig

    section = yaml.safe_load(PACKAGE_CONFIG.read_text())["rl_config"]
    return RLConfig({**section, **overrides})


class WorkerGroup:
    """What ``RayGRPOTrainer`` reads of a ``RayActorGroup`` (its configs) and hands it (the dock)."""

    def __init__(self, rl_config: Any, global_batch_size: int) -> None:
        self.rl_config = rl_config
        self.megatron_config = SimpleNamespace(global_batch_size=global_batch_size)
        self.docks: list[Any] = []

    def sync_init_transfer_dock(self, td: Any, mm_td: Any = None) -> None:
        self.docks.append(td)


@contextlib.contextmanager
def activated(sections: dict[str, Any]) -> Iterator[None]:
    """The integration active as in a Ray worker (sections in the environment, import hook), undone on exit."""
    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.env import ENV_SECTIONS

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_SECTIONS, json.dumps(sections))
        autopatch.install()
        try:
            yield
        finally:
            reset_integration()


def build_trainer(rl_config: Any, global_batch_size: int, reward_list: Sequence[Any] = ()) -> Any:
    """The real ``RayGRPOTrainer``; its ``__init__`` runs ``transfer_dock_init`` (the dock actor starts here)."""
    from mindspeed_rl.trainer.grpo_trainer_hybrid import RayGRPOTrainer

    group = WorkerGroup(rl_config, global_batch_size)
    return RayGRPOTrainer(
        group, group, list(reward_list), global_batch_size=global_batch_size,
        n_samples_per_prompt=rl_config.n_samples_per_prompt, dataset_additional_keys=["labels"],
        guarantee_order=rl_config.guarantee_order, partial_rollout_max_split=rl_config.partial_rollout_max_split,
    )  # fmt: skip


def put_prompts(trainer: Any, prompts: list[torch.Tensor], labels: list[torch.Tensor], **kwargs: Any) -> list[int]:
    """The trainer's prompt put of one dataloader batch (``fit``), through the name bound in grpo_trainer_hybrid."""
    from mindspeed_rl.trainer import grpo_trainer_hybrid

    batch, indexes = grpo_trainer_hybrid.put_prompts_experience(
        {"prompts": prompts, "labels": labels}, trainer.n_samples_per_prompt, trainer.dataset_additional_keys, **kwargs
    )
    trainer.data_strategy.put_experience(batch, indexes, is_prompt=True)
    return indexes


def rollout_put(td: Any, output: dict[str, list[torch.Tensor]], indexes: list[int]) -> None:
    """``BaseWorker.collect_transfer_dock_data``'s put (TP rank 0 of the last stage)."""
    import ray
    from mindspeed_rl.utils.pad_process import padding_dict_to_tensor_dict

    ray.get(td.put_experience.remote(data_dict=padding_dict_to_tensor_dict(output), indexes=indexes))


def dispatch(
    td: Any, stage: str, columns: list[str], count: int, indexes: list[int] | None = None, *,
    get_n_samples: bool = False, multiple: int = 2,
) -> tuple[dict[str, torch.Tensor] | None, list[int]]:  # fmt: skip
    """``BaseWorker.dispatch_transfer_dock_data`` on one rank: get, pack, unpack-pad to ``2*tp*cp``."""
    import ray
    from mindspeed_rl.trainer.utils.transfer_dock import pack_experience_columns, unpack_pad_experience
    from mindspeed_rl.utils.pad_process import remove_padding_tensor_dict_to_dict

    batch, index = ray.get(
        td.get_experience.remote(stage, list(columns), count, indexes=indexes, get_n_samples=get_n_samples)
    )
    if not index:
        return None, []
    packed, lengths = pack_experience_columns(stage, remove_padding_tensor_dict_to_dict(batch), len(index))
    return unpack_pad_experience(packed, lengths, PAD, multiple), list(index)


# -- rollout data --------------------------------------------------------------------------------------------------
def group_rollout(prompts: list[torch.Tensor], seed: int = 0) -> tuple[list[GeneratedSample], list[torch.Tensor]]:
    """Generations of ``N`` samples per prompt; a group's prompt rows are routed alike (one prefill)."""
    g = torch.Generator().manual_seed(seed)
    samples, input_ids = [], []
    for p, prompt in enumerate(prompts):
        shared = random_ids(len(prompt), LAYERS, TOPK, EXPERTS, g)
        for j in range(N):
            r = 2 + (3 * p + j) % 4
            ids = torch.cat([prompt, 1000 + torch.randint(0, 500, (r,), generator=g)])
            own = random_ids(r - 1, LAYERS, TOPK, EXPERTS, g)
            trace = RoutingTrace.from_ids(torch.cat([shared, own]), EXPERTS)
            samples.append(GeneratedSample(trace, -torch.rand(r, generator=g)))
            input_ids.append(ids)
    return samples, input_ids


def truth(samples: list[GeneratedSample], rows: Sequence[int]) -> list[torch.Tensor]:
    return [samples[r].trace.ids for r in rows]


def leaders_in_place(rows: Sequence[int], n: int) -> bool:
    """Whether every follower of a dispatch sits ``row % n`` places after its own leader (how the codec finds it)."""
    return all(i >= r % n and rows[i - r % n] == r - r % n for i, r in enumerate(rows))


def traces_of(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    expanded = expand_group_payloads(batch[ROUTED_EXPERTS], pad_value=PAD)
    column = batch[ROUTED_EXPERTS] if expanded is None else expanded
    traces = micro_batch_traces(column, batch["prompt_length"], batch["response_length"], input_ids=batch["input_ids"])
    return [t.ids for t in traces]


@pytest.fixture(scope="class")
def grpo(ray_cluster):  # noqa: F811
    """A trainer built with the package's config (guarantee_order: true) and dedupe on; the rollout put done."""
    import ray

    with activated(R3_SECTIONS):
        trainer = build_trainer(package_rl_config(n_samples_per_prompt=N), PROMPTS)
    td = trainer.transfer_dock
    prompts = [torch.arange(5) + 10, torch.arange(7) + 40]
    put_prompts(trainer, prompts, [torch.tensor([7]), torch.tensor([9])])
    got, rows = dispatch(td, "actor_rollout", ["prompts", "prompt_length"], N * PROMPTS, get_n_samples=True)
    assert sorted(rows) == list(range(8))  # whole groups, in random group order
    assert got["prompt_length"].reshape(-1).tolist() == [len(prompts[r // N]) for r in rows]
    samples, input_ids = group_rollout(prompts)  # samples[r]: the generation for dock row r
    # the rollout puts its batch (rows in its own order) with the columns of that order
    ids = [input_ids[r] for r in rows]
    responses = [x[len(prompts[r // N]) :] for x, r in zip(ids, rows, strict=True)]
    extra = rollout_columns([samples[r] for r in rows], ids, responses, routed_experts=True, group_size=N,
                            group_dedupe=True)  # fmt: skip
    output = {"responses": responses, "input_ids": ids, **extra}
    output["response_length"] = [torch.tensor([len(r)]) for r in responses]
    rollout_put(td, output, rows)
    extra = {k: {r: v[i] for i, r in enumerate(rows)} for k, v in extra.items()}  # by dock row
    yield SimpleNamespace(trainer=trainer, td=td, samples=samples, payloads=extra[ROUTED_EXPERTS], extra=extra)
    ray.kill(td)


class TestGroupedDock:
    """One dock at a time: MindSpeed-RL asks 10 CPUs per dock actor, the local cluster has 16."""

    def test_patched_trainer_builds_the_dock_with_our_columns(self, grpo):
        import ray

        from mindspeed_rl_r3.patches.patch_set import PatchError

        columns = list(ray.get(grpo.td.get_experience_status.remote()))
        assert columns == [*MSRL_COLUMNS, ROUTED_EXPERTS, ROLLOUT_LOG_PROBS]
        assert "build_grpo" not in vars(grpo.trainer.data_strategy)  # the instance override is gone again
        assert grpo.trainer.actor_worker.docks == [grpo.td, grpo.td]  # handed to the actor and the reference group
        unknown = "put experience ERROR: routing not in TD experience_column"
        with pytest.raises(ray.exceptions.RayTaskError, match=unknown):
            ray.get(grpo.td.put_experience.remote({"routing": [torch.zeros(3, dtype=torch.int32)]}, indexes=[0]))
        with pytest.raises(ray.exceptions.RayTaskError, match="get experience ERROR: routing not in TD experience_col"):
            ray.get(grpo.td.get_experience.remote("actor_train", ["routing"], 1, indexes=[0]))
        with activated(R3_SECTIONS), pytest.raises(PatchError, match="data_strategy 'tq'"):
            build_trainer(package_rl_config(n_samples_per_prompt=N, data_strategy="tq"), PROMPTS)

    def test_payloads_and_log_probs_round_trip_in_guaranteed_order(self, grpo):
        from mindspeed_rl.utils.utils import get_current_dp_range_indexes

        followers = [p.numel() for r, p in grpo.payloads.items() if r % N]
        assert max(followers) < min(p.numel() for r, p in grpo.payloads.items() if r % N == 0)  # dedupe stored
        # actor_train with guarantee_order: one dispatch of actor_update_dispatch_size rows per DP rank, in row order
        (indexes,) = get_current_dp_range_indexes(experience_count=N * PROMPTS, assign_batch_size=N * PROMPTS)
        batch, rows = dispatch(grpo.td, "actor_train", CONSUMED, N * PROMPTS, indexes=indexes)
        assert rows == list(range(8)) and batch[ROUTED_EXPERTS].dtype == torch.int32
        assert batch[ROUTED_EXPERTS].shape[1] % 2 == 0 and bool((batch[ROUTED_EXPERTS][:, -1] == PAD).any())
        for got, want in zip(traces_of(batch), truth(grpo.samples, rows), strict=True):
            assert torch.equal(got, want)
        for i, r in enumerate(rows):
            lp = grpo.extra[ROLLOUT_LOG_PROBS][r]
            assert torch.equal(batch[ROLLOUT_LOG_PROBS][i, : lp.numel()], lp)
            assert not bool(batch[ROLLOUT_LOG_PROBS][i, lp.numel() :].any())  # float columns pad with 0.0

    def test_unordered_sampling_hands_out_single_rows_that_split_groups(self, grpo):
        """guarantee_order: false (MindSpeed-RL's default): actor_log_prob / actor_train / ref_log_prob ask with
        ``get_n_samples=False`` (without partial rollout), and the dock draws ``count`` rows uniformly at random
        among the ready, unconsumed ones (``torch.multinomial`` on equal weights), in random order.
        Group-deduplicated payloads are decoded by position (a follower's leader is the payload ``row % n`` places
        before it), so every such dispatch without each follower's own leader at that place is refused."""
        batches = []
        while True:
            batch, rows = dispatch(grpo.td, "actor_log_prob", CONSUMED, 2)
            if batch is None:
                break
            batches.append((batch, rows))
        seen = [r for _, rows in batches for r in rows]
        assert sorted(seen) == list(range(8)) and all(len(rows) == 2 for _, rows in batches)
        refused = 0
        for batch, rows in batches:
            if leaders_in_place(rows, N):
                assert all(torch.equal(a, b) for a, b in zip(traces_of(batch), truth(grpo.samples, rows), strict=True))
                continue
            with pytest.raises(RoutingError, match=r"r3\.group_dedupe needs whole GRPO groups"):
                traces_of(batch)
            refused += 1
        assert refused >= 2  # 2 leaders for 4 dispatches: at least two hold followers only

        # Whole groups (get_n_samples=True: the rollout and rule_reward consumers) keep every follower after its leader.
        for _ in range(PROMPTS):
            batch, rows = dispatch(grpo.td, "reward_scores", CONSUMED, N, get_n_samples=True)
            assert rows == list(range(rows[0], rows[0] + N)) and rows[0] % N == 0
            assert all(torch.equal(a, b) for a, b in zip(traces_of(batch), truth(grpo.samples, rows), strict=True))

    def test_dispatch_order_decides_what_deduplicated_payloads_decode_to(self, grpo):
        """Rows in MindSpeed-RL's guaranteed order but dispatches smaller than a group are refused, and so is a
        follower right after another group's leader (its token fingerprint would match: it covers the follower's
        own tokens; the leader binding does not)."""
        batch, _ = dispatch(grpo.td, "ref_log_prob", CONSUMED, 2, indexes=[2, 3])
        with pytest.raises(RoutingError, match=r"sample 0: its group leader is 2 samples earlier"):
            traces_of(batch)
        batch, _ = dispatch(grpo.td, "ref_log_prob", CONSUMED, 2, indexes=[4, 1])
        with pytest.raises(RoutingError, match=r"sample 1 is paired with the wrong group leader"):
            traces_of(batch)
        batch, _ = dispatch(grpo.td, "ref_log_prob", CONSUMED, 2, indexes=[4, 5])
        assert all(torch.equal(a, b) for a, b in zip(traces_of(batch), truth(grpo.samples, [4, 5]), strict=True))


def test_partial_rollout_placeholders_and_segments_through_the_dock(ray_cluster, integration):  # noqa: F811
    """partial_rollout_max_split: 2 (dock max_age 2): the prompt put holds one-word placeholders in our columns, the
    rollout reads back the segments it stored, and training gets the joined routing and log-probs."""
    import ray

    integration()
    trainer = build_trainer(package_rl_config(n_samples_per_prompt=2, partial_rollout_max_split=2), 1)
    td, n = trainer.transfer_dock, 2
    try:
        prompts = [torch.arange(4) + 3]
        assert put_prompts(trainer, prompts, [torch.tensor([5])]) == [0, 1]
        assert put_prompts(trainer, [torch.arange(6) + 20], [torch.tensor([6])], add_another_batch=True) == [2, 3]
        columns = ["prompts", "prompt_length", "responses", "response_length", ROUTED_EXPERTS, ROLLOUT_LOG_PROBS]
        data = ray.get(td.get_experience_data.remote())
        assert [data[ROUTED_EXPERTS][i].tolist() for i in range(4)] == [[-1]] * 4
        assert [data[ROLLOUT_LOG_PROBS][i].tolist() for i in range(4)] == [[-1.0]] * 4

        first, second = {}, {}
        for segment, store in ((0, first), (1, second)):
            batch, rows = dispatch(td, "actor_rollout", columns, 4, multiple=1)
            assert rows == [0, 1, 2, 3]
            lengths = batch["response_length"].reshape(-1).tolist()
            assert lengths == ([0] * 4 if segment == 0 else [2] * 4)
            output = {k: [] for k in ("responses", "input_ids", "response_length", "rollout_completed")}
            samples, prev = [], []
            for i, r in enumerate(rows):
                p = int(batch["prompt_length"][i])
                previous = previous_segments(batch[ROUTED_EXPERTS][i], batch[ROLLOUT_LOG_PROBS][i], lengths[i], i)
                if segment == 1:
                    assert torch.equal(previous.trace.ids, first[r].trace.ids)
                    assert torch.equal(previous.log_probs, first[r].log_probs[: lengths[i]])
                prev.append(previous)
                response = torch.cat([batch["responses"][i, : lengths[i]], torch.arange(2) + 100 * segment + r])
                ids = torch.cat([batch["prompts"][i, :p], response])
                g = torch.Generator().manual_seed(10 * segment + r)
                trace = RoutingTrace.from_ids(random_ids(ids.numel() - 1, LAYERS, TOPK, EXPERTS, g), EXPERTS)
                store[r] = GeneratedSample(trace, -torch.rand(2))
                samples.append(store[r])
                output["responses"].append(response)
                output["input_ids"].append(ids)
                output["response_length"].append(torch.tensor([response.numel()]))
                output["rollout_completed"].append(torch.tensor([segment]))
            extra = rollout_columns(samples, output["input_ids"], output["responses"], routed_experts=True,
                                    previous=prev)  # fmt: skip
            rollout_put(td, {**extra, **output}, rows)
        assert ray.get(td.all_consumed.remote("actor_rollout"))
        batch, rows = dispatch(td, "actor_train", CONSUMED, n, get_n_samples=True)
        assert rows == [0, 1]
        for i, (got, r) in enumerate(zip(traces_of(batch), rows, strict=True)):
            assert torch.equal(got, join_partial(first[r].trace, second[r].trace).ids)
            assert got.shape[0] == int(batch["prompt_length"][i]) + 4 - 1
            want = torch.cat([first[r].log_probs, second[r].log_probs])
            assert torch.equal(batch[ROLLOUT_LOG_PROBS][i, :4], want)
        assert decode(batch[ROUTED_EXPERTS][1], allow_trailing_padding=True).prompt_len == 4
    finally:
        ray.kill(td)
