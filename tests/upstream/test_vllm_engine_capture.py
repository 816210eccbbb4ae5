"""Routing capture on the real vLLM 0.11.0 engine (CPU, fp32, in-process), through the package's adapter for vLLM's
own ``FusedMoE`` (:mod:`mindspeed_rl_r3.patches.vllm_capture`) and the slot-keyed recorder the vllm-ascend adapter
uses. One small engine (block size 128, 5 KV blocks of which 4 are usable, 160 tokens a step, prefix caching and
chunked prefill on) is driven into every scheduler feature the recorder is keyed for: paged KV, prefix-cache hits
(also on a block a sibling computes in the same step, and across ``generate`` calls), chunked prefill, preemption with
recompute, n > 1, log-probs. Every trace must equal, row for row, the routing of a teacher-forced fp32 transformers
forward of the same weights; a spy on the engine records what the scheduler did, so each feature is shown to happen.

The vLLM internals the vllm-ascend adapter reads are checked on the real 0.11 objects: runner attributes, block
tables and slot mapping, ``kv_cache_config`` / ``kv_cache_configs``, request ids and output order, and log-prob
semantics (raw log-probs, before temperature).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from mindspeed_rl_r3.integration.rollout_columns import child_request_id
from mindspeed_rl_r3.patches import vllm_capture
from mindspeed_rl_r3.patches.mindspeed_rl_rollout import collect_generation
from tests.upstream.builders import TOPK, VLLM_ENV, VOCAB, save_tiny_model

BLOCK, BLOCKS, BUDGET = 128, 5, 160
SHARED = [(7 * i + 3) % 250 for i in range(130)]  # one full block, then 2 tokens: cached, shared by siblings


@dataclass
class EngineLog:
    """What the real scheduler and runner did, step by step (read by the tests, never by the package)."""

    scheduled: list[dict[str, int]] = field(default_factory=list)  # request id -> tokens, per step
    resumed: list[str] = field(default_factory=list)  # requests resumed after preemption
    finished: set[str] = field(default_factory=set)
    slot_errors: list[str] = field(default_factory=list)
    steps_checked: int = 0

    def clear(self) -> None:
        self.scheduled.clear()
        self.resumed.clear()
        self.finished.clear()


def _check_step(runner, scheduler_output, log: EngineLog) -> None:
    """The slot of every token the step computed is ``block_ids[pos // B] * B + pos % B`` of its request, and the
    request's computed count after the step is its last position + 1: what ``_runner_step`` and ``finish`` assume."""
    batch = runner.input_batch
    table = batch.block_table[0]
    total = int(scheduler_output.total_num_scheduled_tokens)
    slots = table.slot_mapping.np[:total]
    positions = runner.positions.np[:total]
    starts = runner.query_start_loc.np
    for row, req_id in enumerate(batch.req_ids):
        begin, end = int(starts[row]), int(starts[row + 1])
        if end == begin:
            continue
        blocks = runner.requests[req_id].block_ids[0]
        want = [blocks[p // table.block_size] * table.block_size + p % table.block_size for p in positions[begin:end]]
        if list(slots[begin:end]) != want:
            log.slot_errors.append(f"{req_id}: slots {list(slots[begin:end])[:4]}.. want {want[:4]}..")
        computed = int(batch.num_computed_tokens_cpu[row]) + scheduler_output.num_scheduled_tokens[req_id]
        if computed != int(positions[end - 1]) + 1:
            log.slot_errors.append(f"{req_id}: computed {computed}, last position {int(positions[end - 1])}")
    log.steps_checked += 1


@pytest.fixture(scope="module")
def engine(tmp_path_factory, upstream_sources):
    from transformers import Qwen3MoeForCausalLM
    from vllm import LLM

    path = str(tmp_path_factory.mktemp("tiny_qwen3_moe"))
    save_tiny_model(path)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")  # two shared cores: spinning OpenMP threads slow the engine 10x
        moe_class = vllm_capture.LAYOUTS['0.11'].moe_class
        patched = [f"{moe_class}.forward_impl", f"{vllm_capture.RUNNER_CLASS}.execute_model"]
        assert vllm_capture.apply() == patched and vllm_capture.apply() == []  # idempotent
        llm = LLM(
            model=path, dtype="float32", enforce_eager=True, max_model_len=256, max_num_batched_tokens=BUDGET,
            max_num_seqs=8, seed=0, enable_prefix_caching=True, enable_chunked_prefill=True,
            num_gpu_blocks_override=BLOCKS,
        )  # fmt: skip
        runner = vllm_capture.model_runner(llm)
        core = llm.llm_engine.engine_core.engine_core
        log = EngineLog()
        schedule, execute = core.scheduler.schedule, runner.execute_model

        def spy_schedule():
            out = core.scheduler.schedule.__wrapped__()
            log.scheduled.append(dict(out.num_scheduled_tokens))
            cached = out.scheduled_cached_reqs
            log.resumed += [r for r, res in zip(cached.req_ids, cached.resumed_from_preemption, strict=True) if res]
            log.finished |= set(out.finished_req_ids)
            return out

        def spy_execute(scheduler_output, *args, **kwargs):
            out = execute(scheduler_output, *args, **kwargs)
            if scheduler_output.total_num_scheduled_tokens:
                _check_step(runner, scheduler_output, log)
            return out

        spy_schedule.__wrapped__ = schedule
        core.scheduler.schedule, runner.execute_model = spy_schedule, spy_execute
        hf = Qwen3MoeForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        try:
            yield llm, runner, log, hf
        finally:
            vllm_capture.stop()
            vllm_capture.undo()


def reference(hf, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced fp32 forward: top-k sets ``[len, layers, k]`` (sorted) and next-token logits ``[len, vocab]``."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    sets = torch.stack([r.topk(TOPK, dim=-1).indices.sort(-1).values for r in out.router_logits], dim=1)
    return sets, out.logits[0].float()


def generate(engine, prompts: list[list[int]], **sampling):
    """One ``generate`` with capture on; each completion's trace is checked against the reference forward."""
    from vllm import SamplingParams

    llm, _, log, hf = engine
    log.clear()
    params = SamplingParams(**({"n": 1, "logprobs": 1, "ignore_eos": True} | sampling))
    recorder = vllm_capture.start(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    rollout = collect_generation(outputs, prompts, params.n, recorder)
    checked = 0
    for i, request in enumerate(outputs):
        for j, completion in enumerate(request.outputs):
            sample = rollout.samples[i * params.n + j]
            ids = prompts[i] + list(completion.token_ids)
            sets, logits = reference(hf, ids[:-1])
            trace = sample.trace
            assert trace.rows == len(ids) - 1 and not trace.missing().any(), (i, j)
            assert torch.equal(trace.ids.long().sort(-1).values, sets), f"prompt {i} completion {j}"
            raw = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            assert torch.allclose(sample.log_probs, raw[len(prompts[i]) - 1 :], atol=2e-3), (i, j)
            checked += 1
    assert checked == len(prompts) * params.n and not log.slot_errors, log.slot_errors
    return outputs, log


def test_prefix_hits_on_a_block_a_sibling_computes_in_the_same_step_n2_and_a_later_call(engine):
    prompts = [[*SHARED, 11, 12], [*SHARED, 13]]
    outputs, log = generate(engine, prompts, n=2, max_tokens=6, temperature=1.0)
    first = int(outputs[0].request_id)
    a0, a1, b0, b1 = (child_request_id(str(first + i), j, 2) for i in range(2) for j in range(2))
    # step 1: the first child computes block 0 and its tail, two siblings hit block 0 and compute only their tails;
    # the 4th request waits for a free block (4 usable) and hits block 0 when it starts
    assert log.scheduled[0] == {a0: 132, a1: 4, b0: 3}
    assert next(step[b1] for step in log.scheduled if b1 in step) == 3

    # a later generate call: block 0 is still in vLLM's prefix cache, and in the recorder's slot store
    outputs, log = generate(engine, [[*SHARED, 14, 15, 16]], max_tokens=4)
    assert outputs[0].num_cached_tokens == BLOCK and log.scheduled[0] == {outputs[0].request_id: 5}


def test_chunked_prefill(engine):
    prompt = [(5 * i + 1) % 250 for i in range(220)]
    outputs, log = generate(engine, [prompt], n=1, max_tokens=5)
    rid = outputs[0].request_id
    chunks = [step[rid] for step in log.scheduled if rid in step]
    assert chunks[:2] == [BUDGET, 220 - BUDGET] and outputs[0].num_cached_tokens == 0


def test_preemption_under_a_small_kv_budget(engine):
    prompts = [[(3 * i + k) % 250 for i in range(120)] for k in (1, 2)]
    # 4 requests of one block each fill the 4 usable blocks; at position 128 each needs a second one
    outputs, log = generate(engine, prompts, n=2, max_tokens=24, temperature=1.0)
    assert log.resumed, "no request was preempted and resumed"
    resumed = log.resumed[0]
    recomputed = [step[resumed] for step in log.scheduled if resumed in step]
    assert max(recomputed) > 1  # the resumed request recomputed its tokens (prompt + generated) in one chunk
    assert all(len(c.token_ids) == 24 for o in outputs for c in o.outputs)


def test_log_probs_are_raw_before_temperature(engine):
    """vLLM 0.11's default ``logprobs_mode`` is ``raw_logprobs``: the log-softmax of the model's logits, before
    temperature (and top-k / top-p); what MindSpeed-RL stores as ``rollout_log_probs`` compares with training's
    log-probs only at temperature 1."""
    llm, _, _, hf = engine
    assert llm.llm_engine.model_config.logprobs_mode == "raw_logprobs"
    prompt = [(11 * i + 2) % 250 for i in range(20)]
    outputs, _ = generate(engine, [prompt], n=1, max_tokens=8, temperature=0.5)  # checks raw log-probs
    ids = prompt + list(outputs[0].outputs[0].token_ids)
    _, logits = reference(hf, ids[:-1])
    tempered = torch.log_softmax(logits / 0.5, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(prompt) - 1 :]
    got = torch.tensor([e[t].logprob for e, t in zip(outputs[0].outputs[0].logprobs, ids[len(prompt) :], strict=True)])
    assert (got - tempered).abs().max() > 1e-2


def test_the_internals_the_adapters_read_on_the_real_runner(engine):
    """What ``_runner_step``, ``start_capture`` and ``collect_generation`` read, on vLLM 0.11's own objects."""
    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    llm, runner, log, _ = engine
    assert isinstance(runner, GPUModelRunner) and type(runner).__name__ == "CPUModelRunner"
    assert log.steps_checked > 0 and not log.slot_errors  # slot mapping = block table, every step of every test
    table = runner.input_batch.block_table[0]
    assert isinstance(table, BlockTable) and table.block_size == BLOCK
    assert table.slot_mapping.np.shape[0] >= BUDGET
    # kv_cache_config: the runner's block count is the engine's; the plain EngineCore keeps no kv_cache_configs
    # (MindSpeed-RL's EngineCore patch adds them), so start_capture falls back to cache_config.num_gpu_blocks
    core = llm.llm_engine.engine_core.engine_core
    assert runner.kv_cache_config.num_blocks == BLOCKS == llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert not hasattr(core, "kv_cache_configs")
    assert core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks == BLOCKS
    # request ids: parents count up across generate calls, children are "{index}_{parent}"; outputs come in prompt
    # order, completions in index order; finished children are reported to the runner by their own ids
    before, _ = generate(engine, [[7, 8]], n=1, max_tokens=1)
    outputs, log = generate(engine, [[1, 2, 3], [4, 5], [6]], n=3, max_tokens=2)
    parents = [int(o.request_id) for o in outputs]
    assert parents == list(range(int(before[0].request_id) + 1, parents[0] + 3))
    assert all([c.index for c in o.outputs] == [0, 1, 2] for o in outputs)
    children = {f"{j}_{p}" for p in parents for j in range(3)}
    assert set().union(*log.scheduled) == children
    # the runner hears of a finished request at a later step, for the last ones of a call possibly only at the next
    # call's first step (hence collect_generation's finish_all): here the previous call's request
    assert log.finished == (log.finished & children) | {before[0].request_id}
    assert all(runner.requests.get(c) is None for c in log.finished)
    assert max(max(v) for v in (s.values() for s in log.scheduled)) <= BUDGET and VOCAB == 320
