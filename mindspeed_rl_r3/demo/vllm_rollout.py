"""The demo's rollout on the real vLLM engine (0.27, CPU platform, engine core in the actor's process).

What MindSpeed-RL's rollout does on NPUs, with vLLM's own scheduler, prefix cache, sampler and kernels: each sync
loads the trainer's merged weights into the engine in place (vLLM's reload path) and AQN then perturbs the engine's
own ``post_attention_layernorm`` weights in place; generation records routing through
:mod:`mindspeed_rl_r3.patches.vllm_capture` and assembles each completion's trace with ``collect_generation``, the
function the MindSpeed-RL integration uses.
"""

from __future__ import annotations

import os
import tempfile

import torch

from mindspeed_rl_r3.aqn import RolloutNoise
from mindspeed_rl_r3.demo.model import checkpoint_weights, hf_model
from mindspeed_rl_r3.demo.tokenizer import ByteTokenizer
from mindspeed_rl_r3.demo.workers import DemoSettings, group_payloads
from mindspeed_rl_r3.routing import RoutingTrace


class VllmRolloutWorker:
    """vLLM ``LLM`` on the demo's Qwen3-MoE in ``settings.rollout_dtype``; capture on, AQN after each sync."""

    def __init__(self, settings: DemoSettings) -> None:
        from mindspeed_rl_r3.patches import vllm_capture

        torch.set_num_threads(settings.threads_per_actor)  # before vLLM's CPU worker disables set_num_threads
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the actor shares the machine with the trainer
        self.settings = settings
        self.tok = ByteTokenizer(settings.model.vocab)
        # The engine starts from a config and random weights on disk; every step's sync replaces all of them.
        vllm_capture.apply()
        with tempfile.TemporaryDirectory(prefix="r3_demo_vllm_") as path:  # read once, while the engine loads
            hf_model(settings.model).save_pretrained(path)
            self.llm = vllm_capture.cpu_llm(
                path,
                dtype=settings.rollout_dtype,
                max_model_len=settings.model.max_len,
                max_num_seqs=settings.prompts_per_step * settings.group_size,
                skip_tokenizer_init=True,
                seed=settings.seed,
            )
        self.model = vllm_capture.engine_model(self.llm)
        self.noise = RolloutNoise(self.model, settings.aqn, settings.steps) if settings.aqn.enabled else None

    def engine(self) -> str:
        from mindspeed_rl_r3.patches import vllm_capture

        return f"{vllm_capture.engine_name()} {self.settings.rollout_dtype}"

    def sync(self, hf_state: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Load every trainer weight into the engine (as MindSpeed-RL's sync does), then add this step's AQN."""
        from mindspeed_rl_r3.patches import vllm_capture

        vllm_capture.reload_weights(self.llm, checkpoint_weights(hf_state))
        return self.noise.apply(step) if self.noise is not None else {}

    def score(self, tokens: list[int]) -> torch.Tensor:
        """The engine's log-probs of ``tokens[1:]`` given their prefixes (float32 ``[len(tokens) - 1]``)."""
        from mindspeed_rl_r3.patches import vllm_capture

        return torch.tensor(vllm_capture.prompt_log_probs(self.llm, tokens), dtype=torch.float32)

    def generate(self, prompts: list[list[int]], seed: int) -> dict:
        """``group_size`` samples per prompt; responses, rollout log-probs and one routing payload per sample."""
        from mindspeed_rl_r3.patches import vllm_capture
        from mindspeed_rl_r3.patches.mindspeed_rl_rollout import collect_generation
        from mindspeed_rl_r3.patches.vllm_ascend_capture import CaptureSession

        n = self.settings.group_size
        recorder = vllm_capture.start(self.llm)
        try:
            outputs = vllm_capture.generate_tokens(
                self.llm,
                prompts,
                n=n,
                max_tokens=self.settings.max_new_tokens,
                ignore_eos=False,
                stop_token_ids=[self.tok.eos_id],
                temperature=1.0,
                top_p=1.0,
                seed=seed,
            )
            generated = collect_generation(outputs, prompts, n, recorder)
        finally:
            CaptureSession.enabled = False  # nothing else this engine runs (scoring) is recorded
        rows, responses, rollout_logp, traces = [], [], [], []
        for k, (sample, output) in enumerate(zip(generated.samples, _completions(outputs), strict=True)):
            prompt, response = prompts[k // n], list(output.token_ids)
            trace = sample.trace
            tokens = prompt + response
            traces.append(
                RoutingTrace.from_ids(
                    trace.ids, trace.num_experts, prompt_len=len(prompt), token_ids=tokens, layout=trace.layout
                )
            )
            rows.append(prompt)
            responses.append(response)
            rollout_logp.append(sample.log_probs)
        payloads = group_payloads(traces, prompts, n)
        return {"prompts": rows, "responses": responses, "rollout_logp": rollout_logp, "payloads": payloads}


def _completions(outputs: list) -> list:
    """Every completion in ``collect_generation``'s order (prompt by prompt)."""
    return [completion for request in outputs for completion in request.outputs]
