"""A small simulator of vLLM's offline ``LLM`` on top of the vllm-ascend fakes, for MindSpeed-RL engine tests.

It runs a tiny MoE model built from the fake ``AscendFusedMoE`` layers through the fake ``NPUModelRunner`` with a
scheduler that does what the capture must survive: chunked prefill, several requests per step, graph padding, and
finished requests' KV blocks handed to the next request. ``generate`` takes text prompts (tokenized again, as
vLLM does) or ``{"prompt_token_ids": [...]}``; with ``n > 1`` each completion is a child request ``"{k}_{parent}"``
(vLLM v1's ``ParentRequest``), parents numbered by a counter that keeps running across calls. Each completion
carries the log-prob of every sampled token (``SamplingParams.logprobs``). Sampling is a seeded Gumbel draw.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

SPECIAL = {0: "<pad>", 1: "<|im_start|>", 2: "<|im_end|>"}
PAD, IM_START, EOS = 0, 1, 2


class HFTokenizer:
    """Token ``t`` is the word ``w{t}``; special tokens are dropped by ``decode(skip_special_tokens=True)``."""

    pad_token_id = PAD
    eos_token_id = EOS

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(SPECIAL.get(t, f"w{t}") for t in ids if not (skip_special_tokens and t in SPECIAL))

    def encode(self, text: str) -> list[int]:
        reverse = {v: k for k, v in SPECIAL.items()}
        return [reverse[w] if w in reverse else int(w[1:]) for w in text.split()]


class Tokenizer:
    """MindSpeed-RL's ``BaseTokenizer`` surface: ``pad``, ``eod``, ``vocab_size`` and the HF ``tokenizer``."""

    def __init__(self, vocab: int) -> None:
        self.tokenizer = HFTokenizer()
        self.pad = PAD
        self.eod = EOS
        self.vocab_size = vocab


class TinyMoE(torch.nn.Module):
    """Embedding; per layer an MLP-input RMSNorm scale, a router and a residual fake ``AscendFusedMoE``."""

    def __init__(self, layers: int, experts: int, topk: int, hidden: int = 16, vocab: int = 64, seed: int = 0):
        super().__init__()
        from vllm_ascend.ops.common_fused_moe import AscendFusedMoE

        g = torch.Generator().manual_seed(seed)
        self.embed_tokens = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))
        self.layers = torch.nn.ModuleList()
        for i in range(layers):
            layer = torch.nn.Module()
            layer.post_attention_layernorm = torch.nn.RMSNorm(hidden, eps=1e-6)
            with torch.no_grad():
                layer.post_attention_layernorm.weight.copy_(1.0 + 0.1 * torch.randn(hidden, generator=g))
            layer.gate = torch.nn.Parameter(torch.randn(hidden, experts, generator=g))
            layer.experts = AscendFusedMoE(
                num_experts=experts, top_k=topk, hidden_size=hidden, intermediate_size=hidden, renormalize=True,
                prefix=f"model.layers.{i}.mlp.experts",
            )  # fmt: skip
            self.layers.append(layer)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens[ids]
        for layer in self.layers:
            x = layer.post_attention_layernorm(h)
            h = h + layer.experts(x, x @ layer.gate)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embed_tokens.T


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 8
    logprobs: int | None = 1
    temperature: float = 1.0
    seed: int = 0


@dataclass
class _Request:
    rid: str
    parent: str
    index: int
    tokens: list[int]
    prompt_len: int
    blocks: list[int]
    computed: int = 0
    logprobs: list[float] = field(default_factory=list)


class FakeLLM:
    def __init__(self, model: TinyMoE, tokenizer: Tokenizer, *, block_size: int = 4, num_blocks: int = 64,
                 chunk: int = 5, max_running: int = 3, max_num_batched_tokens: int = 32) -> None:  # fmt: skip
        from vllm_ascend.worker.model_runner_v1 import NPUModelRunner

        self.model = model
        self.tokenizer = tokenizer
        self.block_size, self.num_blocks = block_size, num_blocks
        self.chunk, self.max_running = chunk, max_running
        self.runner = NPUModelRunner(model, block_size, max_tokens=4 * max_num_batched_tokens)
        self.counter = 0
        self.kv_allocated = False
        cache = SimpleNamespace(num_gpu_blocks=num_blocks, block_size=block_size)
        scheduler = SimpleNamespace(max_num_batched_tokens=max_num_batched_tokens)
        self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache, scheduler_config=scheduler))
        self.prompts_seen: list[list[int]] = []

    @staticmethod
    def default_sampling_params(config: dict[str, Any]) -> SamplingParams:
        return SamplingParams(
            n=config.get("num_completions", 1), max_tokens=config.get("max_tokens", 8),
            logprobs=config.get("logprobs", 1), temperature=config.get("temperature", 1.0), seed=config.get("seed", 0),
        )  # fmt: skip

    def allocate_kv_cache(self) -> None:
        self.kv_allocated = True

    def free_kv_cache(self) -> None:
        self.kv_allocated = False

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, dict):
            return [int(t) for t in prompt["prompt_token_ids"]]
        return self.tokenizer.tokenizer.encode(prompt)

    def _sample(self, hidden: torch.Tensor, req: _Request, params: SamplingParams) -> tuple[int, float]:
        logits = self.model.logits(hidden).float() / max(params.temperature, 1e-6)
        logp = torch.log_softmax(logits, dim=-1)
        g = torch.Generator().manual_seed(
            params.seed * 1_000_003 + zlib.crc32(req.rid.encode()) % 997 * 131 + len(req.tokens)
        )
        gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=g).clamp_min(1e-9)))
        token = int((logp + gumbel).argmax())
        return token, float(logp[token])

    def generate(self, prompts: list[Any], sampling_params: SamplingParams, use_tqdm: bool = False):
        if not self.kv_allocated:
            raise RuntimeError("generate without a KV cache (init_cache_engine was not called)")
        outputs, waiting = [], []
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            self.prompts_seen.append(ids)
            parent = str(self.counter)
            self.counter += 1
            outputs.append(RequestOutput(parent, ids))
            for k in range(sampling_params.n):
                rid = parent if sampling_params.n == 1 else f"{k}_{parent}"
                waiting.append(_Request(rid, parent, k, list(ids), len(ids), []))
        by_parent = {o.request_id: o for o in outputs}
        free = list(range(self.num_blocks))
        running: list[_Request] = []
        finished: set[str] = set()
        while waiting or running:
            new = []
            while waiting and len(running) < self.max_running:
                req = waiting.pop(0)
                need = -(-(req.prompt_len + sampling_params.max_tokens) // self.block_size)
                req.blocks = [free.pop(0) for _ in range(need)]
                running.append(req)
                new.append(SimpleNamespace(req_id=req.rid, prompt_token_ids=req.tokens[: req.prompt_len],
                                           block_ids=req.blocks, num_computed_tokens=0))  # fmt: skip
            sched = {r.rid: min(self.chunk, len(r.tokens) - r.computed) for r in running}
            new_ids = {n.req_id for n in new}
            cached = {r.rid: (r.tokens[r.prompt_len :], r.blocks, r.computed) for r in running if r.rid not in new_ids}
            out = self.runner.execute_model(SimpleNamespace(
                total_num_scheduled_tokens=sum(sched.values()), num_scheduled_tokens=sched, finished_req_ids=finished,
                scheduled_new_reqs=new, scheduled_cached_reqs=cached,
            ))  # fmt: skip
            finished = set()
            offset = 0
            for req in list(running):
                count = sched[req.rid]
                req.computed += count
                offset += count
                if req.computed < len(req.tokens):
                    continue
                token, logp = self._sample(out.hidden[offset - 1], req, sampling_params)
                req.tokens.append(token)
                req.logprobs.append(logp)
                if token == EOS or len(req.tokens) - req.prompt_len >= sampling_params.max_tokens:
                    running.remove(req)
                    finished.add(req.rid)
                    free = req.blocks + free  # reused first by the next request
                    generated = req.tokens[req.prompt_len :]
                    lps = [{t: Logprob(lp)} for t, lp in zip(generated, req.logprobs, strict=True)]
                    by_parent[req.parent].outputs.append(
                        CompletionOutput(req.index, generated, lps if sampling_params.logprobs is not None else None)
                    )
        for o in outputs:
            o.outputs.sort(key=lambda c: c.index)
        return outputs
