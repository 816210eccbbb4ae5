"""Defects the real MindSpeed-RL exposed, each against its real classes: refusals that used to hang or fail late,
the reward model's forward, temperature-biased mismatch metrics, and a separate reference worker's metrics."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mindspeed_rl_r3.config import ConfigError, load_sections
from mindspeed_rl_r3.config_rules import refusals
from mindspeed_rl_r3.routing import RoutingError

AQN_ONLY = {"aqn": {"enabled": True, "num_stages": 2, "sigma_start": 0.05, "sigma_end": 0.01}}
R3 = {"r3": {"mode": "R3"}}


def _configs(rl: dict[str, Any], generate: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    from mindspeed_rl.config_cls.generate_config import GenerateConfig
    from mindspeed_rl.config_cls.megatron_config import MegatronConfig
    from mindspeed_rl.config_cls.rl_config import RLConfig

    megatron = MegatronConfig({"stage": "ray_grpo", "num_layers": 2, "num_experts": 8, "moe_router_topk": 2}, {})
    # infer TP 1 (MindSpeed-RL's default is 8): an expert group of one NPU needs no moe_tp_extend_ep to sync experts
    return RLConfig(rl), megatron, GenerateConfig({"infer_tensor_parallel_size": 1, **(generate or {})})


def _actor_worker(rl: dict[str, Any]) -> Any:
    """A real ``ActorHybridWorkerBase`` without its Ray/NPU constructor: the three configs ``initialize`` reads."""
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase

    worker = object.__new__(ActorHybridWorkerBase)
    worker.rl_config, worker.megatron_config, worker.generate_config = _configs(rl)
    return worker


def test_graph_mode_rollouts_with_capture_are_accepted():
    """Capture under ACL graphs is proven with the graph-replay stand-in (tests/test_capture_graph.py): graph mode
    with R3 passes the worker's checks; torchair graph mode stays refused."""
    rl = {"guarantee_order": True}
    assert refusals(*_configs(rl, {"enforce_eager": False}), load_sections(R3)) == []
    assert refusals(*_configs(rl, {"enforce_eager": False}), load_sections(AQN_ONLY)) == []
    (problem,) = refusals(*_configs(rl, {"enforce_eager": False, "torchair_graph": True}), load_sections(R3))
    assert "torchair" in problem
    assert _configs(rl)[2].enforce_eager is True  # MindSpeed-RL's default: eager


@pytest.mark.parametrize("setting", ["async_engine", "multi_turn_enable"])
def test_unwrapped_rollout_paths_are_refused_even_without_r3(setting, integration):
    """With AQN only, the rollout still owes the dock ``rollout_log_probs``; a path that never puts it would leave
    every training stage waiting forever, so worker initialisation refuses it."""
    integration(AQN_ONLY)
    worker = _actor_worker({setting: True, "guarantee_order": True})
    with pytest.raises(RoutingError, match=f"rl_config.{setting}"):
        worker.initialize()  # the patched real method: refused before upstream's initialize builds anything


def test_group_dedupe_needs_guarantee_order(integration):
    integration({"r3": {"mode": "R3", "group_dedupe": True}})
    assert _configs({})[0].guarantee_order is False  # MindSpeed-RL's default
    with pytest.raises(RoutingError, match=r"rl_config\.guarantee_order: true or r3\.group_dedupe: false"):
        _actor_worker({}).initialize()
    config = load_sections({"r3": {"mode": "R3", "group_dedupe": False}})
    assert refusals(*_configs({}), config) == []
    assert refusals(*_configs({"guarantee_order": True}), load_sections(R3)) == []
    # guarantee_order hands each DP rank a contiguous range: whole groups only if the dispatch is a multiple of n
    split = {"guarantee_order": True, "n_samples_per_prompt": 4, "actor_update_dispatch_size": 6}
    (problem,) = refusals(*_configs(split), load_sections(R3))
    assert "rl_config.actor_update_dispatch_size: 6, not a multiple of n_samples_per_prompt 4" in problem
    assert refusals(*_configs({**split, "actor_update_dispatch_size": 8}), load_sections(R3)) == []


def test_the_driver_refuses_the_same_configs_before_ray_starts(monkeypatch, tmp_path):
    from mindspeed_rl_r3 import train
    from mindspeed_rl_r3.integration.env import ENV_SECTIONS

    monkeypatch.setenv(ENV_SECTIONS, "")
    monkeypatch.delenv(ENV_SECTIONS)
    name = sorted(p.stem for p in train.REPO_CONFIGS.glob("grpo_*.yaml"))[0]
    with pytest.raises(ConfigError, match=r"rl_config\.guarantee_order"):
        train.prepare_job(name, overrides=["rl_config.guarantee_order=false"])
    with pytest.raises(ConfigError, match=r"rl_config\.async_engine"):
        train.prepare_job(name, overrides=["+rl_config.async_engine=true", "~r3"])


class _Dense(torch.nn.Module):
    """A dense model: no MoE router anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


def test_only_actor_and_reference_engines_replay(integration):
    """MindSpeed-RL's reward model is a ``BaseTrainingEngine`` too; its forward must run exactly as upstream."""
    from mindspeed_rl.models.actor import Actor
    from mindspeed_rl.models.reward import Reward

    from mindspeed_rl_r3.patches.mindspeed_rl_replay import forward_backward_batch_replay_wrapper

    integration(R3)
    calls = []
    wrapped = forward_backward_batch_replay_wrapper(lambda engine, batch, forward_only=False: calls.append(engine))
    reward = Reward([_Dense()], stage="ray_grpo")
    wrapped(reward, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, True)
    assert calls == [reward]
    actor = Actor([_Dense()], optimizer=None, opt_param_scheduler=None, stage="ray_grpo")
    with pytest.raises(RoutingError, match="TopKRouter"):  # the actor does replay: a dense model has nothing to bind
        wrapped(actor, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, True)


def _k3(metrics: dict[str, list[float]]) -> float:
    from mindspeed_rl_r3.integration.metrics import reduce_entries

    reduced, _ = reduce_entries({k: list(v) for k, v in metrics.items()})
    return next(v for k, v in reduced.items() if "k3" in k)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.4])
def test_mismatch_compares_raw_log_probs_at_any_temperature(temperature, integration, megatron):
    """vLLM returns raw log-probs (before temperature); the engine hands the loss logits / T. The same policy on
    both sides must show no mismatch at any temperature."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from mindspeed_rl.models.loss.grpo_actor_loss_func import GRPOActorLossFunc
    from mindspeed_rl.utils import compute
    from mindspeed_rl.utils.compute import set_parallel_state

    from mindspeed_rl_r3.integration.runtime import active
    from mindspeed_rl_r3.patches import mindspeed_rl_replay

    integration(AQN_ONLY)
    set_parallel_state(parallel_state)  # what BaseWorker.setup_distributed_rank sets
    compute.set_vocab_parallel(vocab_parallel_cross_entropy)
    batch_size, prompt, response, vocab = 3, 4, 5, 11
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch_size, prompt + response, vocab, generator=generator)
    input_ids = torch.randint(0, vocab, (batch_size, prompt + response), generator=generator)
    responses = input_ids[:, prompt:]
    # what vLLM reports for the sampled tokens: log_softmax of the raw logits at the positions that predict them
    raw = torch.log_softmax(logits[:, prompt - 1 : prompt - 1 + response], -1).gather(-1, responses[..., None])[..., 0]
    batch = {
        "input_ids": input_ids,
        "labels": torch.cat([input_ids[:, 1:], torch.zeros(batch_size, 1, dtype=input_ids.dtype)], dim=1),
        "responses": responses,
        "prompt_length": torch.full((batch_size, 1), prompt),
        "response_length": torch.full((batch_size, 1), response),
        "rollout_log_probs": raw,
    }
    loss_func = GRPOActorLossFunc()
    with mindspeed_rl_replay._stage_context("update", temperature):
        loss_func.compute_log_probs(logits / temperature, batch)  # the patched real method
    assert _k3(active().take_metrics()) == pytest.approx(0.0, abs=1e-6)


def test_a_separate_reference_worker_sends_its_replay_metrics(integration, monkeypatch):
    from mindspeed_rl.workers import reference_worker

    from mindspeed_rl_r3.integration.runtime import active
    from mindspeed_rl_r3.patches import mindspeed_rl_worker

    integration(R3)
    method = reference_worker.ReferenceWorkerBase.compute_ref_log_prob
    assert method.__code__ is mindspeed_rl_worker.reference_metrics_wrapper(lambda self: None).__code__
    sent = []
    monkeypatch.setattr(mindspeed_rl_worker, "send_metrics", lambda worker, rt: sent.append(rt.take_metrics()))
    worker = object.__new__(reference_worker.ReferenceWorker.__ray_actor_class__)
    pass_metrics = mindspeed_rl_worker.reference_metrics_wrapper(
        lambda self: active().add_metrics({"r3/reference/agreement": [1.0]})
    )
    pass_metrics(worker)
    assert sent == [{"r3/reference/agreement": [1.0]}]
