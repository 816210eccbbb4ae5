"""Routing replay registered through MindSpeed's real patch manager (``mindspeed/patch_utils.py``, ac9f0e74), stacked
over MindSpeed-LLM's real ``topk_router_routing`` (``mindspeed_llm/core/transformer/moe/router.py``, a2c0733), on a
megatron-core 0.12.1 GPT model on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.replay.state import ReplayConfig, ReplayMode, RouterAction, RouterReplayState
from mindspeed_rl_r3.routing.layout import RouterTokenLayout, layout_micro_batch
from tests.megatron_models import TOPK, batch, capture_routing, gpt_model, map_to_ids, moe_config
from tests.test_replay_megatron import B, S, _random_traces
from tests.upstream.llm_modules import mindspeed_llm_modules

ROUTING = "megatron.core.transformer.moe.router.TopKRouter.routing"
# The MindSpeed-LLM arguments topk_router_routing reads (get_args()); norm_topk_prob makes its work visible.
LLM_ARGS = dict(norm_topk_prob=True, topk_softmax_in_fp32=False, moe_tp_extend_ep=False, fix_router=False)


@pytest.fixture(scope="module")
def llm_router(upstream_sources):
    with mindspeed_llm_modules(upstream_sources, "mindspeed_llm.core.transformer.moe.router") as (module,):
        yield module


@pytest.fixture
def manager(megatron, monkeypatch):
    """MindSpeed's real patch manager, empty; megatron's router attributes and global args restored afterwards."""
    from megatron.core.transformer.moe import moe_utils, router
    from megatron.training import global_vars
    from mindspeed.patch_utils import MindSpeedPatchesManager

    monkeypatch.setattr(router.TopKRouter, "routing", router.TopKRouter.routing)
    monkeypatch.setattr(router, "topk_softmax_with_capacity", router.topk_softmax_with_capacity)
    monkeypatch.setattr(moe_utils, "topk_softmax_with_capacity", moe_utils.topk_softmax_with_capacity)
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", SimpleNamespace(**LLM_ARGS))
    monkeypatch.setattr(MindSpeedPatchesManager, "patches_info", {})
    return MindSpeedPatchesManager


def _replay_state(model, megatron):
    state = RouterReplayState(ReplayConfig(mode=ReplayMode.R3, alarm_min_rows=10**9))
    megatron.bind_replay(model, state)
    return state


def _probs(model):
    """Forward hooks storing each router's probs ``[T, E]`` by layer number."""
    from mindspeed_rl_r3.patches.megatron_router import iter_routers

    probs = {}
    for _, router in iter_routers(model):
        router.register_forward_hook(lambda m, i, out, n=router.layer_number: probs.__setitem__(n, out[0].detach()))
    return probs


def test_manager_stacks_replay_over_mindspeed_llm_routing(manager, megatron, llm_router):
    from megatron.core.transformer.moe import router

    from mindspeed_rl_r3.patches import mindspeed_llm_router

    # MindSpeed-LLM's feature registers its replacement first; the package's wrappers are added on top.
    manager.register_patch(ROUTING, llm_router.topk_router_routing)
    manager.apply_patches()
    assert mindspeed_llm_router.apply(manager) == [name for name, _ in mindspeed_llm_router.REGISTRATIONS]
    mindspeed_llm_router.apply(manager)  # idempotent: the manager deduplicates wrappers by identity
    assert manager.patches_info[ROUTING].wrappers == [megatron.topk_router_routing_replay_wrapper]
    assert router.TopKRouter.routing.__wrapped__ is llm_router.topk_router_routing
    with pytest.raises(RuntimeError, match="the patch of routing exist"):
        manager.register_patch(ROUTING, lambda self, logits: logits)
    rows = {r["name"]: r for r in mindspeed_llm_router.check()}
    assert all(r["found"] and r["compatible"] for r in rows.values()), rows

    torch.manual_seed(0)
    model = gpt_model(moe_config(2))
    state = _replay_state(model, megatron)
    maps, _ = capture_routing(model)
    probs = _probs(model)
    tokens, positions, mask = batch(B, S)
    with torch.no_grad():
        model(tokens, positions, mask)
    native = {n: map_to_ids(m) for n, m in maps.items()}
    for n, p in probs.items():  # MindSpeed-LLM's norm_topk_prob ran: the k gate weights sum to one
        assert torch.allclose(p.sum(-1), torch.ones(B * S), atol=1e-5), n

    traces = _random_traces(2, seed=8)
    replay = layout_micro_batch(traces, [S] * B, RouterTokenLayout())
    state.begin_pass(RouterAction.REPLAY)
    state.load(replay)
    model(tokens, positions, mask, labels=tokens).float().mean().backward()
    state.end_pass()
    assert state.consumption() == {}
    for j, n in enumerate(replay.layer_numbers):
        ids, missing = replay.column(j)
        assert torch.equal(map_to_ids(maps[n])[~missing], ids.sort(dim=1).values[~missing])
        assert torch.equal(map_to_ids(maps[n])[missing], native[n][missing])  # missing rows route natively
        assert torch.allclose(probs[n].sum(-1), torch.ones(B * S), atol=1e-5)
        assert (probs[n] > 0).sum(-1).eq(TOPK).all()
    assert model.decoder.layers[0].mlp.router.weight.grad.abs().sum() > 0  # gate weights stay differentiable


def test_wrapper_survives_a_topk_softmax_replacement(manager, megatron, llm_router):
    """``--topk-softmax-in-fp32`` replaces moe_utils' function; the manager rebinds the router module's copy too,
    under the replay wrapper, and MindSpeed-LLM's routing still calls it."""
    from megatron.core.transformer.moe import moe_utils, router

    from mindspeed_rl_r3.patches import mindspeed_llm_router

    original = moe_utils.topk_softmax_with_capacity
    calls = []

    def topk_softmax_with_capacity(logits, topk, *args, **kwargs):  # a replacement that counts its calls
        calls.append(1)
        return original(logits.float(), topk, *args, **kwargs)

    router.topk_softmax_with_capacity = original  # as on a fresh import, before any direct apply()
    manager.register_patch(ROUTING, llm_router.topk_router_routing)
    manager.register_patch(
        "megatron.core.transformer.moe.moe_utils.topk_softmax_with_capacity", topk_softmax_with_capacity
    )
    manager.apply_patches()
    mindspeed_llm_router.apply(manager)
    assert megatron.is_wrapped(router.topk_softmax_with_capacity)

    torch.manual_seed(0)
    model = gpt_model(moe_config(2))
    state = _replay_state(model, megatron)
    tokens, positions, mask = batch(B, S)
    with torch.no_grad():
        model(tokens, positions, mask)
    assert len(calls) == 2  # native routing goes through the replacement
    state.begin_pass(RouterAction.REPLAY)
    state.load(layout_micro_batch(_random_traces(2, seed=9), [S] * B, RouterTokenLayout()))
    with torch.no_grad():
        model(tokens, positions, mask)
    state.end_pass()
    assert state.consumption() == {} and len(state.last_alignment) == 2
