"""The actors of the CPU pipeline: a bf16 rollout (transformers here; the real vLLM engine in ``vllm_rollout``) and
a Megatron trainer in fp32.

Both use the package's own code paths, the ones the NPU integration uses: capture -> ``encode_group`` (the wire
format the TransferDock carries) -> ``decode_group`` -> ``validate_trace`` -> ``layout_micro_batch`` -> replay in
the Megatron routers; ``RolloutNoise`` after every weight sync; LoRA merged by ``merged_state_dict`` and converted
Megatron -> transformers for the sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mindspeed_rl_r3.aqn import AQNConfig, RolloutNoise
from mindspeed_rl_r3.demo.grpo import group_advantages, grpo_loss, token_log_probs
from mindspeed_rl_r3.demo.model import DemoModelSettings, hf_model, megatron_model
from mindspeed_rl_r3.demo.tokenizer import ByteTokenizer
from mindspeed_rl_r3.demo.warm_start import WarmStartSettings
from mindspeed_rl_r3.replay.metrics import LayerAlignment, logprob_mismatch
from mindspeed_rl_r3.replay.state import ReplayConfig, RouterAction, RouterReplayState, action_for
from mindspeed_rl_r3.routing import RoutingTrace, decode_group, encode_group, validate_trace
from mindspeed_rl_r3.routing.layout import RouterTokenLayout, layout_micro_batch


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on. The arms of ``--compare`` share one instance and differ only in ``r3``
    (and, for the quantization evaluation's extra arm, ``aqn.enabled``).

    ``warm_start``: the supervised warm start that lets the model earn reward (None: the calibrated random init,
    reward near 0). ``train_prompts``: the fixed pool of training problems, cycled in the same order in every arm.
    ``eval_prompts``: held-out problems for the greedy evaluation before the first and after the last step, and for
    the fake-quantization evaluation (0 skips both). ``replay_reference``: with R3, the reference (KL) forward replays
    the rollout's routing, as ``r3.replay_reference`` does on the cluster.
    """

    model: DemoModelSettings = field(default_factory=DemoModelSettings)
    steps: int = 12
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 40
    micro_batch_size: int = 16
    lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 16
    clip: float = 0.2
    kl_coef: float = 0.01
    seed: int = 0
    aqn: AQNConfig = field(
        default_factory=lambda: AQNConfig(enabled=True, sigma_start=0.01, sigma_end=0.001, num_stages=4, seed=1234)
    )
    warm_start: WarmStartSettings | None = field(default_factory=WarmStartSettings)
    cache_dir: str | None = None
    train_prompts: int = 8
    eval_prompts: int = 64
    replay_reference: bool = True
    threads_per_actor: int = 1
    rollout: str = "vllm"  # "vllm": the real vLLM engine (demo.vllm_rollout); "hf": transformers' generate
    rollout_dtype: str = "bfloat16"


ROLLOUT_ENGINES = ("vllm", "hf")


def group_payloads(traces: list[RoutingTrace], prompts: list[list[int]], n: int) -> list[torch.Tensor]:
    """One wire payload per sample (``encode_group``: each GRPO group's shared prompt rows stored once)."""
    payloads = []
    for g, prompt in enumerate(prompts):
        payloads += encode_group(traces[g * n : (g + 1) * n], prompt_len=len(prompt))
    return payloads


def rollout_worker_class(settings: DemoSettings) -> type:
    """The rollout actor for ``settings.rollout``."""
    if settings.rollout == "hf":
        return RolloutWorker
    if settings.rollout == "vllm":
        from mindspeed_rl_r3.demo.vllm_rollout import VllmRolloutWorker

        return VllmRolloutWorker
    raise ValueError(f"rollout engine must be one of {ROLLOUT_ENGINES}, got {settings.rollout!r}")


class RolloutWorker:
    """bf16 transformers Qwen3-MoE that samples with routing capture; AQN on its norm weights after each sync."""

    def __init__(self, settings: DemoSettings) -> None:
        torch.set_num_threads(settings.threads_per_actor)
        self.settings = settings
        self.tok = ByteTokenizer(settings.model.vocab)
        self.model = hf_model(settings.model, dtype=getattr(torch, settings.rollout_dtype))
        self.noise = RolloutNoise(self.model, settings.aqn, settings.steps) if settings.aqn.enabled else None

    def engine(self) -> str:
        import transformers

        return f"transformers {transformers.__version__} generate ({self.settings.rollout_dtype})"

    def sync(self, hf_state: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Re-copy every weight from the trainer (as MindSpeed-RL's sync does), then add this step's AQN."""
        params = dict(self.model.named_parameters())
        missing = set(params) - set(hf_state)
        if missing:
            raise KeyError(f"weight sync lacks {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(hf_state[name])
        return self.noise.apply(step) if self.noise is not None else {}

    def generate(self, prompts: list[list[int]], seed: int) -> dict:
        """``group_size`` samples per prompt; responses, rollout log-probs and one routing payload per sample."""
        from mindspeed_rl_r3.patches.hf_qwen3_moe import attach_capture

        n, new = self.settings.group_size, self.settings.max_new_tokens
        rows = [p for p in prompts for _ in range(n)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with attach_capture(self.model, self.settings.model.spec, max_batch=len(rows), max_len=width + new) as cap:
            torch.manual_seed(seed)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=self.tok.pad_id,
                    eos_token_id=self.tok.eos_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            cap.recorder.finish_all()
            logits = torch.stack(out.logits, dim=1).float()  # [rows, generated, vocab]
            responses, rollout_logp, traces = [], [], []
            for b, prompt in enumerate(rows):
                generated = out.sequences[b, width:].tolist()
                stop = generated.index(self.tok.eos_id) + 1 if self.tok.eos_id in generated else len(generated)
                response = generated[:stop]
                logp = torch.log_softmax(logits[b, :stop], dim=-1).gather(1, torch.tensor(response).unsqueeze(1))
                trace = cap.trace(b, num_tokens=len(prompt) + len(response), prompt_len=len(prompt))
                traces.append(
                    RoutingTrace.from_ids(
                        trace.ids,
                        trace.num_experts,
                        prompt_len=len(prompt),
                        token_ids=prompt + response,
                        layout=trace.layout,
                    )
                )
                responses.append(response)
                rollout_logp.append(logp.squeeze(1))
        payloads = group_payloads(traces, prompts, n)
        return {"prompts": rows, "responses": responses, "rollout_logp": rollout_logp, "payloads": payloads}


class TrainerWorker:
    """fp32 Megatron GPTModel with peft LoRA, routing replay (R3) or observation (R3 off), GRPO updates."""

    def __init__(self, settings: DemoSettings, r3: bool, initial_hf_state: dict[str, torch.Tensor]) -> None:
        torch.set_num_threads(settings.threads_per_actor)
        from peft import get_peft_model

        from mindspeed_rl_r3.lora.convert import hf_to_megatron
        from mindspeed_rl_r3.patches import megatron_router, peft_megatron
        from mindspeed_rl_r3.patches.megatron_cpu import megatron_cpu_session

        self.settings, self.r3 = settings, r3
        self.spec = settings.model.spec
        self._session = megatron_cpu_session(seed=settings.seed)
        self._session.__enter__()
        megatron_router.apply()
        base = megatron_model(settings.model)
        state = hf_to_megatron(initial_hf_state, settings.model.shape)
        params = dict(base.named_parameters())
        if set(params) != set(state):
            raise KeyError(f"converted weights do not match the Megatron model: {sorted(set(params) ^ set(state))[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
        peft_megatron.apply()
        peft_megatron.add_config_to_dict(base)
        lora = peft_megatron.megatron_lora_config(
            base.config, settings.lora_r, settings.lora_alpha, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
        )
        self.model = get_peft_model(base, lora)
        self.replay = ReplayConfig(
            mode="R3" if r3 else "disabled", replay_reference=r3 and settings.replay_reference, alarm_min_rows=64
        )
        self.state = RouterReplayState(self.replay)
        self.layers = megatron_router.bind_replay(self.model, self.state)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=settings.lr)

    def rollout_weights(self) -> dict[str, torch.Tensor]:
        """What the rollout must run: LoRA merged into every adapted weight, in transformers naming."""
        from mindspeed_rl_r3.lora.convert import merged_hf_state_dict

        return merged_hf_state_dict(self.model, self.settings.model.shape)

    def _batch(self, rollout: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RoutingTrace]]:
        tok_pad = ByteTokenizer(self.settings.model.vocab).pad_id
        seqs = [p + r for p, r in zip(rollout["prompts"], rollout["responses"], strict=True)]
        lens = torch.tensor([len(s) for s in seqs])
        tokens = torch.full((len(seqs), int(lens.max())), tok_pad, dtype=torch.long)
        response_mask = torch.zeros(len(seqs), int(lens.max()) - 1, dtype=torch.bool)
        traces = decode_group(rollout["payloads"], spec=self.spec)
        for i, (seq, prompt) in enumerate(zip(seqs, rollout["prompts"], strict=True)):
            tokens[i, : len(seq)] = torch.tensor(seq)
            response_mask[i, len(prompt) - 1 : len(seq) - 1] = True
            validate_trace(
                traces[i],
                self.spec,
                sample_index=i,
                prompt_len=len(prompt),
                response_len=len(seq) - len(prompt),
                token_ids=seq,
            )
        return tokens, lens, response_mask, traces

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
        return token_log_probs(self.model(tokens, positions, mask), tokens)

    def _micro_batches(self, n: int) -> list[slice]:
        mbs = self.settings.micro_batch_size
        return [slice(i, min(i + mbs, n)) for i in range(0, n, mbs)]

    def _pass(self, action: RouterAction, tokens, lens, traces, *, grad_fn=None) -> tuple[list, list[LayerAlignment]]:
        """One forward pass over the micro-batches with replay/observation loaded per micro-batch; returns the
        log-probs and the pass's per-layer alignment (with the routing mismatch of what each router dispatched)."""
        logps = []
        self.state.begin_pass(action)
        for mb in self._micro_batches(tokens.shape[0]):
            s = int(lens[mb].max())
            replay = None
            if action is not RouterAction.NATIVE:
                replay = layout_micro_batch(traces[mb], lens[mb], RouterTokenLayout(), padded_len=s)
                self.state.load(replay)
            if grad_fn is None:
                with torch.no_grad():
                    logps.append(self._forward(tokens[mb, :s]))
            else:
                grad_fn(mb, self._forward(tokens[mb, :s]))
        return logps, self.state.end_pass()

    def step(self, rollout: dict, rewards: list[float], step: int) -> dict:
        tokens, lens, response_mask, traces = self._batch(rollout)
        self.model.eval()
        action = RouterAction.REPLAY if self.r3 else RouterAction.OBSERVE
        old, layers = self._pass(action, tokens, lens, traces)
        width = tokens.shape[1] - 1
        old_logp = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in old])
        rollout_logp = torch.zeros_like(old_logp)
        for i, lp in enumerate(rollout["rollout_logp"]):
            start = len(rollout["prompts"][i]) - 1
            rollout_logp[i, start : start + lp.numel()] = lp
        mismatch = logprob_mismatch(old_logp, rollout_logp, response_mask)
        ref_logp, ref_kl = self._reference(tokens, lens, traces, old_logp, response_mask)

        advantages = group_advantages(torch.tensor(rewards), self.settings.group_size)
        stats: dict[str, float] = {}
        self.model.train()
        self.optimizer.zero_grad()
        total = response_mask.sum().clamp(min=1)

        def backward(mb: slice, logp: torch.Tensor) -> None:
            s = logp.shape[1]
            loss, st = grpo_loss(
                logp,
                old_logp[mb, :s],
                advantages[mb],
                response_mask[mb, :s],
                clip=self.settings.clip,
                ref_logp=None if ref_logp is None else ref_logp[mb, :s],
                kl_coef=self.settings.kl_coef,
            )
            (loss * response_mask[mb, :s].sum() / total).backward()  # token mean over the whole batch
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v * float(response_mask[mb, :s].sum() / total)

        self._pass(action_for(self.replay, "update"), tokens, lens, traces, grad_fn=backward)
        self.optimizer.step()
        self.model.eval()
        # the old-log-prob pass's routers, as dispatched, against the rollout (replay.metrics' routing mismatch)
        rows = sum(x.dispatched_rows for x in layers)
        differing = sum(x.routing_mismatch * x.dispatched_rows for x in layers if x.dispatched_rows)
        routing_mismatch = differing / max(rows, 1)
        return {
            "step": step,
            **mismatch,
            "routing_mismatch": routing_mismatch,
            "routing_mismatch_per_layer": [x.routing_mismatch if x.dispatched_rows else 0.0 for x in layers],
            "layer_agreement": {str(x.layer_number): x.set_agreement for x in layers},
            "replay_agreement": 1.0 - routing_mismatch,
            "fallback_fraction": self.state.metrics().get("r3/fallback_fraction", float("nan")),
            "response_tokens": int(response_mask.sum()),
            **ref_kl,
            **stats,
        }

    def _reference(self, tokens, lens, traces, policy_logp, response_mask) -> tuple[torch.Tensor | None, dict]:
        """The reference log-probs the loss uses (adapters off; routing per ``action_for(..., "reference")``) and the
        k3 KL of the policy (before this step's update) to the reference forward with either routing.

        With R3 both are measured, so the report shows how much of the KL is a routing difference rather than the
        weights' change: ``kl_ref_native`` routes the reference natively, ``kl_ref_replayed`` replays the rollout's
        routing in it. Without R3 the policy routes natively too, and only ``kl_ref_native`` exists.
        """
        from mindspeed_rl_r3.lora.reference import adapters_disabled

        width = tokens.shape[1] - 1
        actions = {"kl_ref_native": RouterAction.NATIVE}
        if self.r3:
            actions["kl_ref_replayed"] = RouterAction.REPLAY
        used = action_for(self.replay, "reference")
        ref_logp, kls = None, {}
        m = response_mask.float()
        for key, action in actions.items():
            with adapters_disabled(self.model):
                ref, _ = self._pass(action, tokens, lens, traces)
            logp = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in ref])
            d = logp - policy_logp
            kls[key] = float(((torch.exp(d) - 1 - d) * m).sum() / m.sum().clamp(min=1))
            if action is used:
                ref_logp = logp
        return (ref_logp if self.settings.kl_coef > 0 else None), kls
