"""A simulated continuous-batching engine driving the routing recorder, with an oracle routing function.

The engine has a paged KV cache with prefix caching and LRU reuse of freed blocks, chunked prefill, a token budget,
preemption with recompute, and n > 1 samples per prompt. The "model" routes token t at position p in layer l to
``oracle(t, p, l)``, so every assembled trace has one correct answer. :meth:`Engine.execute` runs a step's forward;
the graph-mode tests replace it with a model runner whose forward is a captured graph.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from mindspeed_rl_r3.routing import MoEModelSpec
from mindspeed_rl_r3.routing.capture import RoutingRecorder

SPEC = MoEModelSpec(num_layers=3, topk=4, num_experts=16)
BLOCK = 4
STEPS = (1, 3, 5, 7, 9, 11, 13, 15)  # odd strides: k distinct ids modulo 16


def oracle(tokens: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
    h = (tokens * 7919 + positions * 104729 + layer * 1299709) % 1000003
    start = h % SPEC.num_experts
    step = torch.tensor(STEPS)[(h // 16) % len(STEPS)]
    return (start.unsqueeze(1) + step.unsqueeze(1) * torch.arange(SPEC.topk)) % SPEC.num_experts


@dataclass
class Request:
    rid: str
    tokens: list[int]
    prompt_len: int
    max_new: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0

    @property
    def done(self) -> bool:
        return len(self.tokens) - self.prompt_len >= self.max_new


class Engine:
    """The scheduler; :meth:`execute` runs one step's forward and its capture bookkeeping."""

    def __init__(self, rng: random.Random, num_blocks: int, budget: int, graph_pad: int, preempt_p: float):
        self.rng, self.budget, self.graph_pad, self.preempt_p = rng, budget, graph_pad, preempt_p
        self.free = list(range(num_blocks))  # LRU order: reuse the oldest freed block first
        self.ref = [0] * num_blocks
        self.cache: dict[tuple[int, ...], int] = {}  # full-block prefix -> block
        self.block_key: dict[int, tuple[int, ...]] = {}
        self.num_slots = num_blocks * BLOCK
        self.recorder = RoutingRecorder(SPEC, max_tokens=budget + graph_pad, num_slots=self.num_slots, block_size=BLOCK)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.just_finished: list[str] = []

    def _take_block(self) -> int | None:
        if not self.free:
            return None
        b = self.free.pop(0)
        if b in self.block_key:  # evict the cached prefix this free block still held
            del self.cache[self.block_key.pop(b)]
        self.ref[b] = 1
        return b

    def _release(self, req: Request) -> None:
        for b in req.blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
        req.blocks = []

    def _admit(self, req: Request) -> bool:
        # Prefix-cache hits: full prompt blocks computed before, leaving at least one token to compute.
        hits = []
        for i in range((req.prompt_len - 1) // BLOCK):
            b = self.cache.get(tuple(req.tokens[: (i + 1) * BLOCK]))
            if b is None:
                break
            hits.append(b)
        for b in hits:
            if self.ref[b] == 0:
                self.free.remove(b)
            self.ref[b] += 1
        req.blocks, req.computed = hits, len(hits) * BLOCK
        return True

    def _ensure_blocks(self, req: Request, upto: int) -> bool:
        while len(req.blocks) * BLOCK < upto:
            b = self._take_block()
            if b is None:
                return False
            req.blocks.append(b)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.computed = 0
        self.waiting.insert(0, req)

    def step(self) -> bool:
        while self.waiting and len(self.running) < 6:
            req = self.waiting.pop(0)
            self._admit(req)
            self.running.append(req)
        if self.running and self.rng.random() < self.preempt_p:
            self._preempt(self.rng.choice(self.running))
        scheduled, budget = [], self.budget
        for req in list(self.running):
            if budget == 0:
                break
            todo = len(req.tokens) - req.computed
            n = min(todo, budget, self.rng.randint(1, todo))  # random chunking of prefill
            if not self._ensure_blocks(req, req.computed + n):
                self._preempt(req)
                continue
            scheduled.append((req, n))
            budget -= n
        if not scheduled:
            return bool(self.waiting or self.running)
        tokens, positions, slots = [], [], []
        for req, n in scheduled:
            for p in range(req.computed, req.computed + n):
                tokens.append(req.tokens[p])
                positions.append(p)
                slots.append(req.blocks[p // BLOCK] * BLOCK + p % BLOCK)
        finished, self.just_finished = self.just_finished, []
        self.execute(scheduled, tokens, positions, slots, finished)
        for req, n in scheduled:
            req.computed += n
        for req, _ in scheduled:
            for i in range(req.computed // BLOCK):  # register completed blocks for prefix caching
                key = tuple(req.tokens[: (i + 1) * BLOCK])
                b = req.blocks[i]
                if key not in self.cache and b not in self.block_key:
                    self.cache[key], self.block_key[b] = b, key
            if req.computed == len(req.tokens):  # everything fed: sample the next token
                if req.done:
                    self.running.remove(req)
                    self._release(req)
                    self.finished.append(req)
                    self.just_finished.append(req.rid)
                else:
                    req.tokens.append(self.rng.randint(0, 50))
        return True

    def execute(
        self,
        scheduled: list[tuple[Request, int]],
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        finished: list[str],
    ) -> None:
        """The recorder driven directly: every layer's oracle ids written, padding rows with garbage."""
        self.recorder.begin_step(finished)
        real = len(tokens)
        padded = -(-real // self.graph_pad) * self.graph_pad
        tok = torch.tensor(tokens + [0] * (padded - real))
        pos = torch.tensor(positions + [0] * (padded - real))
        for layer in range(SPEC.num_moe_layers):
            ids = oracle(tok, pos, layer)
            ids[real:] = torch.randint(0, SPEC.num_experts, (padded - real, SPEC.topk))  # garbage in padding rows
            self.recorder.capture(layer, ids.to(torch.int32))
        slot_mapping = torch.tensor(slots + [-1] * (padded - real))
        computed = {req.rid: (req.blocks, req.computed + n) for req, n in scheduled}
        self.recorder.end_step(real, slot_mapping, computed)  # fmt: skip


def add_requests(engine: Engine, rng: random.Random) -> None:
    """1-4 prompts sharing a random prefix (prefix-cache hits), 1-3 samples each with vLLM-style child ids."""
    shared_prefix = [rng.randint(0, 50) for _ in range(rng.randint(0, 9))]
    for parent in range(rng.randint(1, 4)):
        prompt = shared_prefix + [rng.randint(0, 50) for _ in range(rng.randint(1, 12))]
        for child in range(rng.randint(1, 3)):
            engine.waiting.append(Request(f"{child}_{parent}", list(prompt), len(prompt), rng.randint(1, 8)))


def run_to_completion(engine: Engine) -> None:
    for _ in range(2000):
        if not engine.step():
            break
    assert not engine.running and not engine.waiting, "simulation did not finish"


def check_traces(engine: Engine, recorder: RoutingRecorder) -> None:
    """Every finished request's trace equals the oracle's routing of its tokens, row for row, nothing missing."""
    recorder.finish_all()
    assert engine.finished
    for req in engine.finished:
        trace = recorder.pop_trace(req.rid, num_tokens=len(req.tokens), prompt_len=req.prompt_len)
        assert trace.rows == len(req.tokens) - 1
        assert not trace.missing().any()
        tok = torch.tensor(req.tokens[:-1])
        pos = torch.arange(len(req.tokens) - 1)
        for layer in range(SPEC.num_moe_layers):
            assert torch.equal(trace.ids[:, layer].long(), oracle(tok, pos, layer)), (req.rid, layer)
