"""Capture on a real transformers Qwen3-MoE during sampling, against independent records of the same generation."""

import pytest
import torch

from mindspeed_rl_r3.patches.hf_qwen3_moe import attach_capture, gate_topk, moe_blocks, spec_of
from tests.hf_models import left_padded, tiny_qwen3_moe

pytest.importorskip("transformers")
NEW = 12


def _generate_with_capture(model, prompts, seed=0):
    spec = spec_of(model)
    ids, mask = left_padded(prompts)
    # Independent record: every gate call's raw ids plus the step's mask, kept in plain lists.
    raw: list[list[torch.Tensor]] = []
    masks: list[torch.Tensor] = []

    def new_step(_module, _args, kwargs):
        masks.append(kwargs["attention_mask"].clone())
        raw.append([])

    handles = [model.register_forward_pre_hook(new_step, with_kwargs=True)]
    for _, block in moe_blocks(model):
        handles.append(block.gate.register_forward_hook(lambda m, i, o, b=block: raw[-1].append(gate_topk(b, o))))
    with attach_capture(model, spec, max_batch=len(prompts), max_len=64) as capture:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, pad_token_id=0)
        capture.recorder.finish_all()
        traces = [capture.trace(b, num_tokens=len(p) + NEW, prompt_len=len(p)) for b, p in enumerate(prompts)]
    for h in handles:
        h.remove()
    return out, traces, raw, masks, ids.shape[1]


def test_trace_equals_the_routing_computed_during_generation():
    model = tiny_qwen3_moe(seed=1)
    prompts = [[5, 17, 99, 3, 42, 7], [8, 9], [100, 101, 102, 103]]
    _, traces, raw, masks, width = _generate_with_capture(model, prompts)
    layers = len(raw[0])
    for b, prompt in enumerate(prompts):
        # Rebuild row b position by position with explicit loops over steps and tokens.
        rows: dict[int, list[torch.Tensor]] = {}
        for step, (ids_per_layer, mask) in enumerate(zip(raw, masks, strict=True)):
            q = width if step == 0 else 1
            for j in range(q):
                col = mask.shape[1] - q + j
                if mask[b, col] == 0:
                    continue
                position = int(mask[b, : col + 1].sum()) - 1
                rows[position] = [ids_per_layer[layer].view(len(prompts), q, -1)[b, j] for layer in range(layers)]
        trace = traces[b]
        assert trace.rows == len(prompt) + NEW - 1 and trace.prompt_len == len(prompt)
        for p in range(trace.rows):
            for layer in range(layers):
                assert torch.equal(trace.ids[p, layer].long(), rows[p][layer].long()), (b, p, layer)


def test_trace_agrees_with_a_teacher_forced_forward():
    model = tiny_qwen3_moe(seed=2, num_layers=3)
    prompts = [[5, 17, 99, 3, 42, 7, 1, 2], [8, 9, 10], [100, 101, 102, 103, 104]]
    out, traces, _, _, width = _generate_with_capture(model, prompts, seed=3)
    agree = total = 0
    for b, prompt in enumerate(prompts):
        tokens = torch.cat([torch.tensor(prompt), out[b, width:]]).unsqueeze(0)
        seen = []
        handles = [
            block.gate.register_forward_hook(lambda m, i, o, blk=block, seen=seen: seen.append(gate_topk(blk, o)))
            for _, block in moe_blocks(model)
        ]
        with torch.no_grad():
            model(tokens)
        for h in handles:
            h.remove()
        forced = torch.stack(seen, dim=1)[: traces[b].rows]  # [rows, layers, k]
        same = (forced.sort(-1).values == traces[b].ids.long().sort(-1).values).all(-1)
        agree += int(same.sum())
        total += same.numel()
    assert agree / total >= 0.99, agree / total
