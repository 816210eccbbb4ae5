"""The actor rollout end to end on real code: MindSpeed-RL 05a90d77's ``ActorHybridWorkerBase.generate_sequences`` ->
``sync_generate_process`` -> ``ActorRolloutHybrid`` -> ``VLLMInferEngine.generate_sequences`` (patched) /
``_post_process_outputs`` / ``init_cache_engine`` / ``free_cache_engine`` -> the real vLLM 0.11 ``LLM`` (CPU, fp32,
in-process) on a tiny Qwen3-MoE -> ``collect_transfer_dock_data`` (patched) -> a real ``GRPOTransferDock``.

Routing capture: the package's capture wrappers (:mod:`mindspeed_rl_r3.patches.vllm_ascend_capture`) on the vLLM
classes vllm-ascend's derive from (:func:`tests.upstream.builders.vllm_engine`). The stored routing and log-probs are
checked against a Hugging Face forward of the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.routing import decode, decode_group, token_fingerprint
from tests.upstream.builders import IM_START, hf_reference, kv_caches, rollout_worker, save_tiny_model
from tests.upstream.builders import vllm_engine as build_engine

N, MAX_TOKENS = 2, 6
PROMPTS = [[IM_START, 72, 101, 108, 108, 111], [IM_START, 87, 111, 114]]


@pytest.fixture(scope="module")
def vllm_engine(tmp_path_factory, upstream_sources):
    path = str(tmp_path_factory.mktemp("tiny_qwen3_moe"))
    save_tiny_model(path)
    with build_engine(path, N, MAX_TOKENS) as engine:
        yield engine


@pytest.fixture
def dock(ray_cluster):
    import ray
    from mindspeed_rl.trainer.utils.transfer_dock import GRPOTransferDock, put_prompts_experience
    from mindspeed_rl.utils.metrics import Metric

    td = GRPOTransferDock.remote(
        prompts_num=len(PROMPTS), n_samples_per_prompt=N, metrics=Metric(), GBS_train=len(PROMPTS),
        addition_columns=[ROUTED_EXPERTS, ROLLOUT_LOG_PROBS],
    )  # fmt: skip
    data, indexes = put_prompts_experience({"prompts": [torch.tensor(p) for p in PROMPTS]}, N, [])
    ray.get(td.put_experience.remote(data, indexes=indexes, is_prompt=True))
    yield td
    ray.kill(td)


def make_worker(engine, td):
    return rollout_worker(engine, td, n=N, max_tokens=MAX_TOKENS, dispatch_size=N * len(PROMPTS))


def test_actor_rollout_on_real_vllm_puts_routing_and_log_probs_of_the_stored_tokens(vllm_engine, dock, integration):
    import ray

    integration()
    worker = make_worker(vllm_engine, dock)
    seen = []
    generate = vllm_engine.llm.generate
    vllm_engine.llm.generate = lambda prompts, **kw: seen.extend(prompts) or generate(prompts, **kw)
    try:
        worker.generate_sequences()
    finally:
        del vllm_engine.llm.generate

    assert sorted(p["prompt_token_ids"] for p in seen) == sorted(PROMPTS)  # token ids, the special token kept
    assert vllm_engine._r3_last_rollout is None and not kv_caches(vllm_engine)
    data = ray.get(dock.get_experience_data.remote())
    traces = decode_group([data[ROUTED_EXPERTS][i] for i in range(N * len(PROMPTS))])
    for i, trace in enumerate(traces):
        ids = data["input_ids"][i].long()
        response = data["responses"][i]
        assert ids[: len(PROMPTS[i // N])].tolist() == PROMPTS[i // N]
        assert trace.rows == ids.numel() - 1 and trace.token_hash == token_fingerprint(ids)
        sets, log_probs = hf_reference(vllm_engine.path, ids[:-1])
        assert torch.equal(trace.ids.long().sort(-1).values, sets)
        want = log_probs[torch.arange(ids.numel() - 1), ids[1:]][-response.numel() :]
        assert torch.allclose(data[ROLLOUT_LOG_PROBS][i], want, atol=1e-3)


def test_unpatched_engine_sends_text_and_loses_the_chat_token(vllm_engine):
    """MindSpeed-RL's own path (no integration): prompts decoded with skip_special_tokens, vLLM tokenizes again."""
    seen = []
    generate = vllm_engine.llm.generate
    vllm_engine.llm.generate = lambda prompts, **kw: seen.extend(prompts) or generate(prompts, **kw)
    try:
        responses, _ = vllm_engine.generate_sequences([PROMPTS[0]], n=1, max_tokens=1)
    finally:
        del vllm_engine.llm.generate
    assert responses.shape[0] == 1 and isinstance(seen[0], str)
    routed = vllm_engine.llm.get_tokenizer().encode(seen[0])
    assert IM_START not in routed and routed != PROMPTS[0]  # vLLM would route other tokens than training sees


def test_actor_rollout_without_log_probs_is_refused(vllm_engine, integration, monkeypatch):
    from mindspeed_rl_r3.patches.mindspeed_rl_rollout import ACTOR_ROLLOUT
    from mindspeed_rl_r3.patches.vllm_ascend_capture import CaptureSession
    from mindspeed_rl_r3.routing import RoutingError

    integration()
    monkeypatch.setattr(vllm_engine, ACTOR_ROLLOUT, True, raising=False)
    before = copy.deepcopy(vllm_engine.sampling_params)
    with pytest.raises(RoutingError, match=r"sampling_config\.logprobs >= 0"):
        vllm_engine.generate_sequences([PROMPTS[1]], n=1, max_tokens=2, logprobs=None)
    assert not CaptureSession.enabled
    # upstream's update_sampling_params restores its overrides only on a clean exit; the wrapper restores them here
    after = vllm_engine.sampling_params
    assert (after.n, after.max_tokens, after.logprobs) == (before.n, before.max_tokens, before.logprobs)


def test_partial_rollout_appends_each_segment_to_the_earlier_routing_and_log_probs(
    vllm_engine, ray_cluster, megatron, integration, monkeypatch
):
    """``partial_rollout_max_split: 2``: the real worker generates ``max_tokens / 2`` tokens per segment from the
    prompt plus the response so far (``sync_generate_process``, one request per sample) until the dock's groups are
    complete; each segment's put extends the routing and log-probs the earlier segments stored, as tokens extend
    the response. The ``torch.distributed.barrier`` after each dispatch runs on megatron-core's one gloo rank."""
    import ray
    from megatron.core import parallel_state

    from tests.upstream.test_transfer_dock import build_trainer, package_rl_config, put_prompts

    integration()
    rows = N * len(PROMPTS)
    trainer = build_trainer(package_rl_config(n_samples_per_prompt=N, partial_rollout_max_split=2), len(PROMPTS))
    td = trainer.transfer_dock
    # the random policy may sample <|endoftext|> anywhere: no sample stops before its segment ends
    monkeypatch.setattr(vllm_engine.sampling_params, "min_tokens", MAX_TOKENS // 2)
    try:
        put_prompts(trainer, [torch.tensor(p) for p in PROMPTS], [torch.tensor([1]), torch.tensor([2])])
        worker = rollout_worker(
            vllm_engine, td, n=N, max_tokens=MAX_TOKENS, dispatch_size=rows, partial_rollout_max_split=2
        )
        worker.parallel_state = parallel_state  # the dispatch's repeat fill of partial rollout reads Megatron's DP size
        segments, collect = [], worker.collect_transfer_dock_data

        def collect_and_keep(outputs, index, **kwargs):
            # the dock is a threaded actor (max_concurrency=100): a later call may overtake the rollout's fire-and-
            # forget put, so this put is waited for (upstream's own sync=True path) before reading the dock back
            collect(outputs, index, **{**kwargs, "sync": True})
            data = ray.get(td.get_experience_data.remote())
            segments.append({k: [data[k][i].clone() for i in range(rows)] for k in (ROUTED_EXPERTS, ROLLOUT_LOG_PROBS)})

        worker.collect_transfer_dock_data = collect_and_keep
        worker.generate_sequences()
        data = ray.get(td.get_experience_data.remote())
    finally:
        ray.kill(td)

    # what each row held after each put: the placeholder, then its first segment, then both
    first, first_lp = [], []
    for i in range(rows):
        stored = []
        for snapshot in segments:
            payload, lp = snapshot[ROUTED_EXPERTS][i], snapshot[ROLLOUT_LOG_PROBS][i]
            if payload.numel() > 1 and not (stored and torch.equal(stored[-1][0], payload)):
                stored.append((payload, lp))
        assert len(stored) == 2, i  # two segments, each put once: the dock handed the unfinished sample out again
        first.append(decode(stored[0][0]))
        first_lp.append(stored[0][1])
    for i in range(rows):
        ids = data["input_ids"][i].long()
        prompt = PROMPTS[i // N]
        assert ids[: len(prompt)].tolist() == prompt and ids.numel() == len(prompt) + MAX_TOKENS
        assert first[i].rows == len(prompt) + MAX_TOKENS // 2 - 1
        trace = decode(data[ROUTED_EXPERTS][i])
        assert trace.rows == ids.numel() - 1 and trace.token_hash == token_fingerprint(ids)
        assert torch.equal(trace.ids[: first[i].rows], first[i].ids)  # the first segment's routing, kept
        sets, log_probs = hf_reference(vllm_engine.path, ids[:-1])
        assert torch.equal(trace.ids.long().sort(-1).values, sets)  # the joined routing is the whole sequence's
        joined = data[ROLLOUT_LOG_PROBS][i]
        assert torch.equal(joined[: MAX_TOKENS // 2], first_lp[i])
        want = log_probs[torch.arange(ids.numel() - 1), ids[1:]][-MAX_TOKENS:]
        assert torch.allclose(joined, want, atol=1e-3)
