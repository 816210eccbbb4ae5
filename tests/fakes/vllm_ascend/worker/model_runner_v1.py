"""Fake ``vllm_ascend/worker/model_runner_v1.py::NPUModelRunner`` at 1b16c01: the attributes the capture reads.

``execute_model(scheduler_output)`` updates its persistent batch from the scheduler output (new and cached requests,
finished ones dropped), builds positions and the CPU slot mapping, and runs the model on the step's tokens padded
to a multiple of ``graph_pad`` (as ACL graph sizes do).
"""

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list
    block_ids: tuple
    num_computed_tokens: int
    output_token_ids: list = field(default_factory=list)


class _BlockTable:
    def __init__(self, max_tokens):
        self.slot_mapping_np = np.zeros(max_tokens, dtype=np.int64)


class InputBatch:
    def __init__(self, max_tokens):
        self.req_ids = []
        self.block_table = [_BlockTable(max_tokens)]
        self.num_computed_tokens_cpu = np.zeros(64, dtype=np.int32)


class NPUModelRunner:
    def __init__(self, model, block_size, max_tokens=256, graph_pad=8):
        self.model = model
        self.block_size = block_size
        self.graph_pad = graph_pad
        self.requests = {}
        self.input_batch = InputBatch(max_tokens)

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.prompt_token_ids), (list(new.block_ids),), new.num_computed_tokens
            )
        for req_id, (tokens, block_ids, computed) in scheduler_output.scheduled_cached_reqs.items():
            state = self.requests[req_id]
            state.output_token_ids = list(tokens)
            state.block_ids = (list(block_ids),)
            state.num_computed_tokens = computed
        self.input_batch.req_ids = [r for r in scheduler_output.num_scheduled_tokens if r in self.requests]
        for row, req_id in enumerate(self.input_batch.req_ids):
            self.input_batch.num_computed_tokens_cpu[row] = self.requests[req_id].num_computed_tokens

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._update_states(scheduler_output)
        tokens, slots = [], []
        for req_id in self.input_batch.req_ids:
            state = self.requests[req_id]
            all_tokens = state.prompt_token_ids + state.output_token_ids
            blocks = state.block_ids[0]
            for p in range(
                state.num_computed_tokens, state.num_computed_tokens + scheduler_output.num_scheduled_tokens[req_id]
            ):
                tokens.append(all_tokens[p])
                slots.append(blocks[p // self.block_size] * self.block_size + p % self.block_size)
        total = scheduler_output.total_num_scheduled_tokens
        self.input_batch.block_table[0].slot_mapping_np[:total] = slots
        padded = -(-total // self.graph_pad) * self.graph_pad
        ids = torch.tensor(tokens + [0] * (padded - total))
        hidden = self.model(ids)
        return SimpleNamespace(req_ids=list(self.input_batch.req_ids), hidden=hidden[:total])
