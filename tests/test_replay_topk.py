"""The core 0.12 ``topk_softmax_with_capacity`` replay path against megatron-core's own function."""

import pytest
import torch

from mindspeed_rl_r3.replay.router import replay_topk
from mindspeed_rl_r3.replay.state import ReplayConfig, ReplayHook, RouterAction, RouterReplayState
from mindspeed_rl_r3.routing.layout import ReplayBatch

pytestmark = pytest.mark.megatron

T, E, K = 40, 8, 2


def _hooked(megatron, config: ReplayConfig, ids: torch.Tensor):
    """Call the wrapped function as if from a router whose hook replays ``ids``."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "topk_softmax_with_capacity"):
        pytest.skip("topk_softmax_with_capacity exists in megatron-core 0.12.x only")
    original = moe_utils.topk_softmax_with_capacity
    wrapped = megatron.topk_softmax_with_capacity_replay_wrapper(original)
    state = RouterReplayState(config)
    state.bind_layers((1,))
    hook = ReplayHook(state, 1)

    def call(*args, **kwargs):
        state.begin_pass(RouterAction.REPLAY)
        state.load(ReplayBatch((1,), ids.unsqueeze(1).to(torch.uint8), 255))
        megatron._active_hooks.append(hook)
        try:
            return wrapped(*args, **kwargs)
        finally:
            megatron._active_hooks.pop()
            state.end_pass()

    return original, call


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_pre_softmax": True},
        {"score_function": "sigmoid"},
        {"score_function": "sigmoid", "expert_bias": torch.linspace(-0.1, 0.1, E)},
        {"scaling_factor": 2.5},
        {"capacity_factor": 1.0, "drop_policy": "probs"},
        {"capacity_factor": 0.5, "drop_policy": "position", "pad_to_capacity": True},
        {"num_groups": 4, "group_topk": 2},
    ],
)
def test_replaying_the_native_choice_is_bit_identical(megatron, kwargs):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    probe = logits.clone().requires_grad_(True)
    original, _ = _hooked(megatron, ReplayConfig(mode="R3", alarm_min_rows=10**9), torch.zeros(T, K, dtype=torch.long))
    native_probs, native_map, native_counts = original(probe, K, **kwargs)
    native_probs.pow(2).sum().backward()
    native_grad = probe.grad.clone()
    ids = native_map.nonzero()[:, 1].reshape(T, -1) if not kwargs.get("capacity_factor") else None
    if ids is None:  # token dropping changes the map; replay the pre-drop choice
        ids = original(logits, K, **{k: v for k, v in kwargs.items() if k not in ("capacity_factor",)})[1]
        ids = ids.nonzero()[:, 1].reshape(T, -1)
    _, call = _hooked(megatron, ReplayConfig(mode="R3", alarm_min_rows=10**9), ids)
    probe.grad = None
    probs, routing_map, counts = call(probe, K, **kwargs)
    probs.pow(2).sum().backward()
    assert torch.equal(routing_map, native_map)
    assert torch.equal(probs, native_probs)
    assert torch.equal(counts, native_counts)
    assert torch.equal(probe.grad, native_grad)


def test_aux_loss_counts_follow_the_config(megatron):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(1))
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    native_choice = logits.topk(K, dim=1).indices
    for routing, expected_ids in (("native", native_choice), ("replayed", ids)):
        _, call = _hooked(megatron, ReplayConfig(mode="R3", aux_loss_routing=routing, alarm_min_rows=10**9), ids)
        _, routing_map, counts = call(logits, K)
        assert torch.equal(counts, torch.bincount(expected_ids.reshape(-1), minlength=E)), routing
        assert torch.equal(routing_map, torch.zeros(T, E, dtype=torch.bool).scatter(1, ids, True))


def test_replay_topk_pure_function_gives_gradient_to_every_replayed_expert():
    logits = torch.randn(6, E, requires_grad=True)
    ids = torch.tensor([[0, 1]] * 6)
    missing = torch.tensor([False, True, False, False, False, True])
    probs, routing_map = replay_topk(logits, ids, missing, norm_topk_prob=True)
    native = logits.detach().topk(K, dim=1).indices
    want = torch.where(missing.unsqueeze(1), native, ids)
    assert torch.equal(routing_map, torch.zeros(6, E, dtype=torch.bool).scatter(1, want, True))
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    (probs * torch.arange(E)).sum().backward()
    assert (logits.grad[~missing][:, :2] != 0).all()  # replayed experts get gradient even when not the native top-k
