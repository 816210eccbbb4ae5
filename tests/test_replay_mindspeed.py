"""Replay wrappers registered through (a fake of) MindSpeed's patch manager, over MindSpeed-LLM's routing."""

import sys
from pathlib import Path

import pytest
import torch

from mindspeed_rl_r3.replay.state import ReplayConfig, ReplayMode, RouterAction, RouterReplayState
from mindspeed_rl_r3.routing.layout import RouterTokenLayout, layout_micro_batch
from tests.megatron_models import batch, capture_routing, gpt_model, map_to_ids, moe_config
from tests.test_replay_megatron import B, S, _random_traces

pytestmark = pytest.mark.megatron
FAKES = str(Path(__file__).parent / "fakes")


@pytest.fixture
def mindspeed(megatron, monkeypatch):
    """Fake mindspeed + mindspeed_llm importable; router attributes restored afterwards."""
    from megatron.core.transformer.moe import moe_utils, router

    if not hasattr(router, "topk_softmax_with_capacity"):
        pytest.skip("MindSpeed-LLM a2c0733 runs on megatron-core 0.12.x")
    monkeypatch.syspath_prepend(FAKES)
    for name in ("mindspeed", "mindspeed.patch_utils", "mindspeed_llm"):
        sys.modules.pop(name, None)
    monkeypatch.setattr(router.TopKRouter, "routing", router.TopKRouter.routing)
    monkeypatch.setattr(router, "topk_softmax_with_capacity", router.topk_softmax_with_capacity)
    monkeypatch.setattr(moe_utils, "topk_softmax_with_capacity", moe_utils.topk_softmax_with_capacity)
    from mindspeed.patch_utils import MindSpeedPatchesManager

    MindSpeedPatchesManager.patches_info.clear()
    yield MindSpeedPatchesManager
    MindSpeedPatchesManager.patches_info.clear()
    for name in [m for m in sys.modules if m.split(".")[0] in ("mindspeed", "mindspeed_llm")]:
        sys.modules.pop(name)


def test_wrappers_stack_over_mindspeed_llm_routing(mindspeed, megatron):
    from mindspeed_llm.core.transformer.moe import router as llm_router

    from mindspeed_rl_r3.patches import mindspeed_llm_router

    # MindSpeed-LLM's feature adaptor registers its replacement first, then we add the wrappers.
    mindspeed.register_patch("megatron.core.transformer.moe.router.TopKRouter.routing", llm_router.topk_router_routing)
    mindspeed.apply_patches()
    assert mindspeed_llm_router.apply(mindspeed) == [name for name, _ in mindspeed_llm_router.REGISTRATIONS]
    mindspeed_llm_router.apply(mindspeed)  # idempotent: the manager deduplicates wrappers
    patch = mindspeed.patches_info["megatron.core.transformer.moe.router.TopKRouter.routing"]
    assert patch.wrappers == [megatron.topk_router_routing_replay_wrapper]
    with pytest.raises(RuntimeError, match="the patch of routing exist"):
        mindspeed.register_patch("megatron.core.transformer.moe.router.TopKRouter.routing", lambda self, x: x)

    torch.manual_seed(0)
    model = gpt_model(moe_config(2))
    state = RouterReplayState(ReplayConfig(mode=ReplayMode.R3, alarm_min_rows=10**9))
    megatron.bind_replay(model, state)
    replay = layout_micro_batch(_random_traces(2, seed=8), [S] * B, RouterTokenLayout())
    maps, handles = capture_routing(model)
    calls_before = llm_router.calls
    state.begin_pass(RouterAction.REPLAY)
    state.load(replay)
    tokens, positions, mask = batch(B, S)
    model(tokens, positions, mask, labels=tokens).float().mean().backward()
    state.end_pass()
    for h in handles:
        h.remove()
    assert llm_router.calls == calls_before + 2  # MindSpeed-LLM's routing ran in both layers, under replay
    for j, n in enumerate(replay.layer_numbers):
        ids, missing = replay.column(j)
        assert torch.equal(map_to_ids(maps[n])[~missing], ids.sort(dim=1).values[~missing])


def test_wrapper_survives_topk_softmax_in_fp32_replacement(mindspeed, megatron):
    """--topk-softmax-in-fp32 replaces moe_utils' function; the manager rebinds the router module's copy too."""
    from mindspeed_rl_r3.patches import mindspeed_llm_router

    calls = []

    def topk_softmax_with_capacity(logits, topk, *args, **kwargs):  # stands in for MindSpeed-LLM's fp32 version
        calls.append(1)
        return original(logits.float(), topk, *args, **kwargs)

    from megatron.core.transformer.moe import moe_utils, router

    original = moe_utils.topk_softmax_with_capacity
    router.topk_softmax_with_capacity = original  # as on a fresh import, before our direct apply()
    mindspeed.register_patch(
        "megatron.core.transformer.moe.moe_utils.topk_softmax_with_capacity", topk_softmax_with_capacity
    )
    mindspeed.apply_patches()
    mindspeed_llm_router.apply(mindspeed)
    assert megatron.is_wrapped(router.topk_softmax_with_capacity)

    torch.manual_seed(0)
    model = gpt_model(moe_config(2))
    state = RouterReplayState(ReplayConfig(mode=ReplayMode.R3, alarm_min_rows=10**9))
    megatron.bind_replay(model, state)
    tokens, positions, mask = batch(B, S)
    with torch.no_grad():
        model(tokens, positions, mask)
    assert len(calls) == 2  # native routing still goes through MindSpeed-LLM's replacement
    state.begin_pass(RouterAction.REPLAY)
    state.load(layout_micro_batch(_random_traces(2, seed=9), [S] * B, RouterTokenLayout()))
    with torch.no_grad():
        model(tokens, positions, mask)
    state.end_pass()
    assert state.consumption() == {} and len(state.last_alignment) == 2
