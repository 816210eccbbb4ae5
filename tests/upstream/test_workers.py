"""MindSpeed-RL 05a90d77's real ``BaseWorker.dispatch_transfer_dock_data`` / ``collect_transfer_dock_data`` with the
package's column patches, against a real ``GRPOTransferDock`` actor on a local Ray cluster.

Both dispatch transports run for real: the HCCL one (``torch.distributed.broadcast`` over one-rank gloo groups of
megatron-core's parallel state stands in for HCCL) and MindSpeed-RL's default ZMQ one (``rl_config.
zmq_communication: true``; the TP/CP/PP rank 0 worker is a ``ZmqServer`` that publishes the batch, the other ranks
are ``ZmqClient``\\ s), here a server and a client worker in one process talking over real sockets.
"""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.integration.rollout_columns import GeneratedSample
from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.routing import decode, token_fingerprint
from mindspeed_rl_r3.routing.codec import is_group_follower
from mindspeed_rl_r3.routing.trace import RoutingTrace

LAYERS, EXPERTS, TOPK, N = 2, 8, 2, 2
PAD = 0
PROMPTS = [torch.tensor([151, 11, 12, 13, 14]), torch.tensor([151, 21, 22, 23])]
RESPONSES = [[31, 32, 33], [41, 42], [51, 52, 53, 54], [61]]  # sample i * N + j: completion j of prompt i
LOG_PROB_COLUMNS = ["input_ids", "responses", "response_length", "prompt_length"]  # the actor's compute_log_prob


def routing_of(tokens: torch.Tensor) -> torch.Tensor:
    """Distinct expert ids ``[len, layers, k]`` that depend on the token prefix only, as a causal model's do."""
    rows = []
    for t in range(tokens.numel()):
        g = torch.Generator().manual_seed(int(tokens[: t + 1].sum()) * 31 + t)
        rows.append(torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(LAYERS)]))
    return torch.stack(rows)


def generated_rollout() -> tuple[SimpleNamespace, list[torch.Tensor]]:
    """What the engine patch leaves after an actor generate: every token fed routed, one log-prob per sampled token."""
    from mindspeed_rl_r3.patches.mindspeed_rl_rollout import GeneratedRollout

    samples, input_ids = [], []
    for i, response in enumerate(RESPONSES):
        ids = torch.cat([PROMPTS[i // N], torch.tensor(response)])
        trace = RoutingTrace.from_ids(routing_of(ids[:-1]), EXPERTS)
        samples.append(GeneratedSample(trace, -torch.arange(1, len(response) + 1, dtype=torch.float32) / (i + 1)))
        input_ids.append(ids)
    return GeneratedRollout(samples, N), input_ids


@pytest.fixture(scope="module")
def transfer_dock(ray_cluster, megatron):
    """One real GRPOTransferDock (2 prompts x N) with our columns, cleared before each test."""
    from mindspeed_rl.trainer.utils.transfer_dock import GRPOTransferDock
    from mindspeed_rl.utils.metrics import Metric

    return GRPOTransferDock.remote(
        prompts_num=len(PROMPTS), n_samples_per_prompt=N, metrics=Metric(), GBS_train=len(PROMPTS),
        addition_columns=[ROUTED_EXPERTS, ROLLOUT_LOG_PROBS],
    )  # fmt: skip


def make_worker(td):
    """A real ``ActorHybridWorkerBase`` without its ``__init__`` (that builds Megatron, vLLM and Ray NPU devices).

    Attributes the exercised methods read: ``rl_config`` (a real ``RLConfig``: ``use_dp_batch_balance``,
    ``partial_rollout_max_split``), ``tokenizer.pad`` / ``.eod`` (the pad of unpacked batches), ``parallel_state``
    (megatron-core's, one gloo rank), ``td`` / ``sampling_transfer_dock`` / ``mm_td`` (``init_transfer_dock``),
    ``zmq_role`` / ``zmq_server`` / ``zmq_client`` (the transport), ``inference_model`` (the rollout engine).
    """
    from megatron.core import parallel_state
    from mindspeed_rl.config_cls.rl_config import RLConfig
    from mindspeed_rl.utils.zmq_communication import ZMQ_ROLE_NONE
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase

    worker = object.__new__(ActorHybridWorkerBase)
    worker.rl_config = RLConfig({"n_samples_per_prompt": N})
    worker.tokenizer = SimpleNamespace(pad=PAD, eod=PAD)
    worker.parallel_state = parallel_state
    worker.zmq_role, worker.zmq_server, worker.zmq_client = ZMQ_ROLE_NONE, None, None
    worker.inference_model = SimpleNamespace()
    worker.init_transfer_dock(td)
    return worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zmq_pair(td, monkeypatch):
    """A ZMQ server worker (TP/CP/PP rank 0 of its DP group) and one client worker, connected over real sockets.

    ``ZmqClient.__init__`` receives the server's address by a TP broadcast from rank 0; with one gloo rank standing
    in for the group, the test hands it the address the broadcast carries.
    """
    from mindspeed_rl.utils import zmq_communication as zc

    info = zc.ZmqServerInfo()
    info.global_rank, info.dp_world_size, info.ip_addr = 0, 2, "127.0.0.1"
    info.register_port, info.publisher_port, info.reliability_port = _free_port(), _free_port(), _free_port()
    address = {k: getattr(info, k) for k in ("ip_addr", "publisher_port", "register_port", "reliability_port")}
    monkeypatch.setattr(zc.ZmqClient, "wait_server_broadcast", lambda self: setattr(self, "server_info", address))
    server_worker, client_worker = make_worker(td), make_worker(td)
    started = {}
    thread = threading.Thread(
        target=lambda: started.setdefault("server", zc.ZmqServer(info, server_worker.parallel_state))
    )
    thread.start()  # the server waits for its client to register
    client_info = zc.ZmqClientInfo()
    client_info.global_rank = 1
    client_worker.zmq_role, client_worker.zmq_client = zc.ZMQ_ROLE_CLIENT, zc.ZmqClient(client_info, None)
    thread.join(timeout=30)
    server_worker.zmq_role, server_worker.zmq_server = zc.ZMQ_ROLE_SERVER, started["server"]
    return server_worker, client_worker


class Hccl:
    """One worker; its dispatch broadcasts over the (one-rank) TP / CP / PP groups."""

    def __init__(self, td, monkeypatch):
        self.worker = make_worker(td)

    def dispatch(self, *args, **kwargs):
        return self.worker.dispatch_transfer_dock_data(*args, **kwargs)


class Zmq:
    """Server and client worker dispatch together; both must end with the same batch."""

    def __init__(self, td, monkeypatch):
        self.worker, self.client = zmq_pair(td, monkeypatch)

    def dispatch(self, *args, **kwargs):
        got = {}
        thread = threading.Thread(
            target=lambda: got.setdefault("server", self.worker.dispatch_transfer_dock_data(*args, **kwargs))
        )
        thread.start()
        client_batch, client_index = self.client.dispatch_transfer_dock_data(*args, **kwargs)
        thread.join(timeout=60)
        batch, index = got["server"]
        assert list(client_index) == list(index) and (batch is None) == (client_batch is None)
        if batch:
            assert set(client_batch) == set(batch)
            assert all(torch.equal(client_batch[k], batch[k]) for k in batch), "the client got another batch"
        return batch, index


def put_prompts(td) -> None:
    import ray
    from mindspeed_rl.trainer.utils.transfer_dock import put_prompts_experience

    ray.get(td.clear.remote())
    data, indexes = put_prompts_experience({"prompts": PROMPTS}, N, [])
    ray.get(td.put_experience.remote(data, indexes=indexes, is_prompt=True))


def check_routing(batch: dict, input_ids: list[torch.Tensor], index: list[int], log_probs: bool = True) -> None:
    """Every dispatched row is a standalone payload of exactly that sample's tokens; log-probs are per token."""
    column = batch[ROUTED_EXPERTS]
    assert column.dtype == torch.int32  # broadcast_data_hccl rebuilds any other dtype as float32 on other ranks
    rollout, _ = generated_rollout()
    for row, i in enumerate(index):
        assert not is_group_follower(column[row])
        trace = decode(column[row], allow_trailing_padding=True)
        ids = input_ids[i]
        assert trace.token_hash == token_fingerprint(ids) and trace.prompt_len == PROMPTS[i // N].numel()
        assert torch.equal(trace.ids.long(), routing_of(ids[:-1]).long())
        response = len(RESPONSES[i])
        assert not log_probs or torch.equal(batch[ROLLOUT_LOG_PROBS][row][:response], rollout.samples[i].log_probs)


@pytest.mark.parametrize("transport", [Hccl, Zmq], ids=["hccl", "zmq"])
def test_stage_columns_through_the_real_dispatch_and_collect(transfer_dock, integration, monkeypatch, transport):
    import ray

    integration()
    put_prompts(transfer_dock)
    workers = transport(transfer_dock, monkeypatch)
    worker = workers.worker

    # the rollout stage asks for prompts only: no routing exists yet, and none is asked for
    batch, index = workers.dispatch("actor_rollout", ["prompts", "prompt_length"], 4, use_vllm=False, is_generate=True)
    assert sorted(index) == [0, 1, 2, 3] and ROUTED_EXPERTS not in batch and ROLLOUT_LOG_PROBS not in batch

    # the rollout put: MindSpeed-RL's columns plus ours, group-deduplicated (each second sample shares its prompt)
    rollout, input_ids = generated_rollout()
    worker.inference_model._r3_last_rollout = rollout
    outputs = {
        "responses": [torch.tensor(r) for r in RESPONSES],
        "input_ids": input_ids,
        "response_length": [torch.tensor([len(r)]) for r in RESPONSES],
    }
    worker.collect_transfer_dock_data(outputs, [0, 1, 2, 3], use_vllm=False, is_generate=True, sync=True)
    assert worker.inference_model._r3_last_rollout is None  # taken: never put twice
    stored = ray.get(transfer_dock.get_experience_data.remote())
    shared = [is_group_follower(stored[ROUTED_EXPERTS][i]) for i in range(4)]
    assert shared == [False, True, False, True]
    assert stored[ROUTED_EXPERTS][1].numel() < stored[ROUTED_EXPERTS][0].numel()

    # old log-probs and update: ours appended to the stage's columns, group payloads expanded in the batch
    for stage in ("actor_log_prob", "actor_train"):
        batch, index = workers.dispatch(stage, list(LOG_PROB_COLUMNS), 4, 1, 1, "megatron_cp_algo")
        assert set(LOG_PROB_COLUMNS) | {ROUTED_EXPERTS, ROLLOUT_LOG_PROBS} == set(batch)
        check_routing(batch, input_ids, index)

    # the reference forward does not replay (r3.replay_reference false): neither column travels
    batch, _ = workers.dispatch("ref_log_prob", list(LOG_PROB_COLUMNS), 4, 1, 1, "megatron_cp_algo")
    assert set(batch) == set(LOG_PROB_COLUMNS)


def test_reference_stage_fetches_routing_when_it_replays(transfer_dock, integration, monkeypatch):
    integration({"r3": {"mode": "R3", "group_dedupe": True, "replay_reference": True}})
    put_prompts(transfer_dock)
    worker = make_worker(transfer_dock)
    rollout, input_ids = generated_rollout()
    worker.inference_model._r3_last_rollout = rollout
    outputs = {"responses": [torch.tensor(r) for r in RESPONSES], "input_ids": input_ids,
               "response_length": [torch.tensor([len(r)]) for r in RESPONSES]}  # fmt: skip
    worker.collect_transfer_dock_data(outputs, [0, 1, 2, 3], use_vllm=False, is_generate=True, sync=True)
    batch, index = worker.dispatch_transfer_dock_data(
        "ref_log_prob", list(LOG_PROB_COLUMNS), 4, 1, 1, "megatron_cp_algo"
    )
    assert set(batch) == set(LOG_PROB_COLUMNS) | {ROUTED_EXPERTS}
    check_routing(batch, input_ids, index, log_probs=False)


def test_without_the_integration_the_dispatch_is_mindspeed_rls_own(transfer_dock):
    import ray

    put_prompts(transfer_dock)
    worker = make_worker(transfer_dock)
    worker.inference_model._r3_last_rollout = generated_rollout()[0]  # would be put if the patches were active
    _, input_ids = generated_rollout()
    outputs = {"responses": [torch.tensor(r) for r in RESPONSES], "input_ids": input_ids,
               "response_length": [torch.tensor([len(r)]) for r in RESPONSES]}  # fmt: skip
    worker.collect_transfer_dock_data(outputs, [0, 1, 2, 3], use_vllm=False, is_generate=True, sync=True)
    stored = ray.get(transfer_dock.get_experience_status.remote())
    assert int(stored[ROUTED_EXPERTS].sum()) == 0 and int(stored["input_ids"].sum()) == 4
    batch, _ = worker.dispatch_transfer_dock_data("actor_log_prob", list(LOG_PROB_COLUMNS), 4, 1, 1, "megatron_cp_algo")
    assert set(batch) == set(LOG_PROB_COLUMNS)
