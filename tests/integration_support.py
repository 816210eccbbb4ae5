"""Shared pieces of the MindSpeed-RL integration tests: the fakes on ``sys.path``, activation through the import
hook, a one-rank parallel state, a pipeline schedule, and the parts of an actor worker."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

FAKES = str(Path(__file__).parent / "fakes")
FAKE_PACKAGES = ("mindspeed_rl", "vllm_ascend", "mindspeed", "mindspeed_llm")

R3_SECTIONS = {
    "r3": {"mode": "R3", "alarm_min_rows": 10**9, "group_dedupe": True},
    "aqn": {"enabled": True, "num_stages": 2, "sigma_start": 0.05, "sigma_end": 0.01, "precision": "fp32"},
}


def drop_fake_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in FAKE_PACKAGES]:
        sys.modules.pop(name)


def reset_integration() -> None:
    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration import runtime
    from mindspeed_rl_r3.patches import mindspeed_rl_integration, mindspeed_rl_rollout, vllm_ascend_capture

    mindspeed_rl_integration.undo()
    vllm_ascend_capture.undo()
    vllm_ascend_capture.CaptureSession.stop()
    mindspeed_rl_rollout._capture_installed.clear()
    autopatch.uninstall()
    runtime.deactivate()


@pytest.fixture
def fakes(monkeypatch):
    """The MindSpeed-RL / vllm-ascend fakes importable (fresh), in-process Ray actors; everything undone after."""
    import ray

    from tests.inline_actors import plain_get

    drop_fake_modules()
    monkeypatch.syspath_prepend(FAKES)
    monkeypatch.setattr(ray, "get", plain_get)
    yield
    reset_integration()
    drop_fake_modules()


@pytest.fixture
def integration(fakes, monkeypatch):
    """Activate with :data:`R3_SECTIONS` the way a Ray worker does: sections in the environment, import hook on."""
    from mindspeed_rl_r3 import autopatch
    from mindspeed_rl_r3.integration.env import ENV_SECTIONS

    def start(sections: dict[str, Any] | None = None) -> None:
        monkeypatch.setenv(ENV_SECTIONS, json.dumps(R3_SECTIONS if sections is None else sections))
        autopatch.install()

    return start


class OneRank:
    """``megatron.core.parallel_state`` of one rank of a (tp, cp) group."""

    def __init__(self, tp: int = 1, tp_rank: int = 0, cp: int = 1, cp_rank: int = 0) -> None:
        self.tp, self.tp_rank, self.cp, self.cp_rank = tp, tp_rank, cp, cp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_context_parallel_world_size(self) -> int:
        return self.cp

    def get_context_parallel_rank(self) -> int:
        return self.cp_rank

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def no_pipelining(forward_step_func, data_iterator, model, num_microbatches, forward_only, **_: Any):
    """Megatron's schedule without pipelining: forward, loss, backward per micro-batch; forward-only collects."""
    collected = []
    for _ in range(num_microbatches):
        output, loss_func = forward_step_func(data_iterator, model[0])
        result = loss_func(output)
        if forward_only:
            collected.append(result)
        else:
            loss, stats = result
            loss.backward()
            collected.append(stats)
    return collected


def megatron_config(**overrides: Any) -> SimpleNamespace:
    """The MegatronConfig fields the integration reads (a 2-layer, 8-expert, top-2 MoE by default)."""
    values = dict(
        stage="ray_grpo", num_layers=2, num_experts=8, moe_router_topk=2, noop_layers=None, train_iters=4,
        tensor_model_parallel_size=1, context_parallel_size=1, context_parallel_algo="megatron_cp_algo",
        sequence_parallel=False, moe_token_dispatcher_type="alltoall_seq", reset_attention_mask=False,
        attention_mask_type="causal", num_layers_per_virtual_pipeline_stage=None, lora_target_modules=None,
    )  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


def rl_config(**overrides: Any) -> SimpleNamespace:
    values = dict(
        n_samples_per_prompt=2, partial_rollout_max_split=1, async_engine=False, multi_turn_enable=False,
        is_multimodal=False, actor_rollout_dispatch_size=4, actor_logprob_dispatch_size=4,
        actor_update_dispatch_size=4, ref_dispatch_size=4, guarantee_order=True, share_backbone=True,
        data_strategy="td",
    )  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


def generate_config(**overrides: Any) -> SimpleNamespace:
    values = dict(torchair_graph=False, dtype="float32", sampling_config={"max_tokens": 6, "logprobs": 1})
    values.update(overrides)
    return SimpleNamespace(**values)


def probe_ids(sample: int, position: int, layers: int, topk: int, experts: int) -> torch.Tensor:
    """Distinct ids ``[layers, topk]`` that encode (sample, position): what each trace row holds in layout tests."""
    base = (sample * 7 + position * 3) % experts
    return torch.stack([(base + layer + torch.arange(topk)) % experts for layer in range(layers)])
