"""The one list of patch modules: what each changes upstream, why, and when it can go.

Everything else derives from :data:`RECORDS`: ``PATCH_MODULES`` and ``doctor``'s required targets, the MindSpeed-RL
modules :mod:`mindspeed_rl_r3.autopatch` hooks, :func:`mindspeed_rl_r3.patches.undo_all` and the generated inventory
(``patches/README.md``, ``python -m mindspeed_rl_r3.patches.inventory --write``). A record names its patch module;
the module itself declares ``TARGETS`` (path, upstream versions, leading parameters), ``apply`` and ``undo``.

Cheap by design: importing this module imports no patch module (the import hook reads it at interpreter start).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mindspeed_rl_r3 import pins

PACKAGE = "mindspeed_rl_r3.patches"
PROFILES = ("npu", "cpu")  # doctor's job profiles: the MindSpeed-RL job, the CPU reference pipeline

_RL = f"MindSpeed-RL {pins.MINDSPEED_RL}"
_RL_MODULES = "mindspeed_rl.workers"


@dataclass(frozen=True)
class PatchRecord:
    """One patch module. ``required_for``: doctor profiles that fail when a target is missing. ``hooks``: MindSpeed-RL
    modules whose import applies it in every process. ``upstream_fix``: for a genuine upstream bug, the fix upstream
    would need. ``reversible``: ``undo()`` restores everything ``apply()`` changed. ``kind``: ``patch`` (wraps upstream
    attributes), ``capture`` (hooks on model instances), ``import`` (uses upstream, changes nothing) or ``stand-in``
    (CPU-only replacements of device code)."""

    name: str
    upstream: str
    changes: str
    why: str
    remove_when: str
    required_for: frozenset[str] = frozenset()
    hooks: tuple[str, ...] = ()
    upstream_fix: str = ""
    reversible: bool = True
    kind: str = "patch"

    @property
    def module_name(self) -> str:
        return f"{PACKAGE}.{self.name}"

    def load(self) -> ModuleType:
        """The patch module (imports its dependencies, torch included)."""
        return importlib.import_module(self.module_name)

    def targets(self) -> tuple[Any, ...]:
        """The module's declared :class:`~mindspeed_rl_r3.patches.targets.PatchTarget` s."""
        return tuple(getattr(self.load(), "TARGETS", ()))


RECORDS: tuple[PatchRecord, ...] = (
    PatchRecord(
        "megatron_router",
        f"megatron-core {pins.MEGATRON_CORE} (and 0.16+)",
        "wraps TopKRouter.routing and the topk_softmax_with_capacity binding of router.py so an active replay hook "
        "chooses the expert ids while gate weights come from the live logits; on core 0.16+ binds the native "
        "router_replay hook by global layer number instead",
        "core 0.12 has no replay hook: top-k selection is a closure inside topk_softmax_with_capacity",
        "MindSpeed-RL moves to megatron-core 0.16+ (native router_replay); only bind_replay stays",
        frozenset(PROFILES),
    ),
    PatchRecord(
        "mindspeed_llm_router",
        f"MindSpeed {pins.MINDSPEED}, MindSpeed-LLM {pins.MINDSPEED_LLM}",
        "registers the megatron_router wrappers with MindSpeed's patch manager so they stack over MindSpeed-LLM's "
        "topk_router_routing (SP gather, moe_tp_extend_ep split) instead of replacing it",
        "MindSpeed-LLM replaces TopKRouter.routing; a direct wrap would be overwritten or drop its behaviour",
        "as megatron_router, once MindSpeed-LLM's router calls megatron's replay hook",
        frozenset({"npu"}),
        reversible=False,  # MindSpeed's manager applies every registered patch at once; ours cannot be taken out
    ),
    PatchRecord(
        "vllm_ascend_capture",
        f"vllm-ascend {pins.VLLM_ASCEND} ({pins.VLLM_ASCEND_LINE})",
        "wraps AscendFusedMoE.forward_impl (records the top-k ids of the step's own rows before any dispatch) and "
        "NPUModelRunner.execute_model (step boundaries, rows keyed by KV slot)",
        "vllm-ascend 0.11 does not report which experts each token was routed to",
        "vllm-ascend returns routed experts per request itself and MindSpeed-RL passes them on",
        frozenset({"npu"}),
        upstream_fix="record the selected (logical) expert ids per token in the MoE layer and return them with each "
        "request's output, as later vLLM does with CompletionOutput.routed_experts",
    ),
    PatchRecord(
        "vllm_capture",
        f"vLLM {pins.VLLM} (CPU platform; 0.27 oracle line)",
        "the same capture wrappers on vLLM's own FusedMoE.forward_impl and GPUModelRunner.execute_model, routing "
        "with vLLM's CPU selector",
        "the CPU rollout and CI run MindSpeed-RL's pinned vLLM, which records no routing",
        "the CPU rollout moves to a vLLM that returns routed experts itself",
    ),
    PatchRecord(
        "hf_qwen3_moe",
        "transformers 4.57 / 5",
        "forward hooks on each Qwen3-MoE gate of one model instance (attach_capture); no class is changed",
        "the CPU reference pipeline rolls out through transformers, which records no routing",
        "never: it is the CPU pipeline's rollout recorder",
        frozenset({"cpu"}),
        kind="capture",
    ),
    PatchRecord(
        "mindspeed_rl_lora",
        f"{_RL}; peft 0.7.1 - 0.21",
        "Qwen3(-MoE) weight adaptors map LoRA names through .base_layer; the Qwen3-MoE adaptor merges grouped-expert "
        "LoRA into weight1/weight2 before the sync; the reference forward runs with every adapter off (and the "
        "router's initial weight); peft.get_peft_model keeps grouped-expert LoRA (and optionally the router) "
        "trainable",
        "on Qwen3-MoE upstream LoRA syncs a KeyError or the base experts to vLLM, its reference keeps expert LoRA on, "
        "and peft 0.21 freezes expert LoRA (docs/lora.md)",
        "MindSpeed-RL fixes the Qwen3 adaptors, merges expert LoRA and disables every adapter for the reference",
        frozenset({"npu"}),
        hooks=(f"{_RL_MODULES}.integrated_worker",),
        upstream_fix="Qwen3MoeMVWeightAdaptor / Qwen3MvWeightAdaptor.replace_name_i2t must insert .base_layer for "
        "peft-wrapped modules as the base adaptor does; the weight container must merge weight1/weight2 LoRA (or "
        "sync the merged experts) in both update paths; compute_ref_log_prob must also switch off "
        "LoraParallelGroupedMLP; MindSpeed-LLM must mark grouped-expert LoRA trainable itself (peft >= 0.21)",
    ),
    PatchRecord(
        "peft_megatron",
        "peft 0.7.1 - 0.21",
        "dispatch_megatron gets fan_in_fan_out back, LoraParallelLinear.update_layer presets lora_bias and hooks "
        "lora_A/lora_B to return only the output of Megatron's (output, bias) tuples",
        "peft >= 0.14 broke LoRA on megatron-core parallel linears, which MindSpeed-LLM pins at peft 0.7.1",
        "peft's Megatron path works again on the releases the CPU pipeline uses",
        frozenset({"cpu"}),
        upstream_fix="peft must pass fan_in_fan_out to dispatch_megatron, set lora_bias in "
        "LoraParallelLinear.update_layer and unwrap the (output, bias) tuples of Megatron's parallel lora_A/lora_B",
    ),
    PatchRecord(
        "mindspeed_rl_trainer",
        _RL,
        "RayGRPOTrainer.transfer_dock_init adds the routed_experts and rollout_log_probs columns; "
        "put_prompts_experience fills placeholders for partial rollout; metrics_post_processing reduces R3 metrics",
        "the TransferDock rejects columns it was not built with",
        "MindSpeed-RL lets a job declare extra TransferDock columns and metric reductions",
        frozenset({"npu"}),
        hooks=("mindspeed_rl.trainer.grpo_trainer_hybrid",),
    ),
    PatchRecord(
        "mindspeed_rl_worker",
        _RL,
        "dispatch/collect of the stage columns, the rollout put of routing and log-probs, and the actor worker's "
        "lifecycle (refusals, AQN attach, metrics)",
        "the worker stages hard-code the columns they read and write",
        "MindSpeed-RL lets a job add columns per stage and hooks into worker setup",
        frozenset({"npu"}),
        hooks=(
            f"{_RL_MODULES}.base_worker",
            f"{_RL_MODULES}.actor_hybrid_worker",
            f"{_RL_MODULES}.reference_worker",
        ),
    ),
    PatchRecord(
        "mindspeed_rl_rollout",
        _RL,
        "VLLMInferEngine.generate_sequences sends prompts as token ids, records routing during actor rollouts and "
        "keeps vLLM's log-probs of the sampled tokens",
        "upstream decodes each prompt to text and vLLM re-tokenizes it, which can change the tokens (chat special "
        "tokens) the rollout routes",
        "MindSpeed-RL sends token ids again (as its 2.3.0 did) and returns routing and rollout log-probs",
        frozenset({"npu"}),
        hooks=("mindspeed_rl.models.rollout.vllm_engine",),
        upstream_fix="VLLMInferEngine.generate_sequences must pass {'prompt_token_ids': ids} (a TokensPrompt) "
        "instead of decode(p, skip_special_tokens=True), so rollout and training see the same tokens",
    ),
    PatchRecord(
        "mindspeed_rl_aqn",
        _RL,
        "MegatronShardingManager.enter_infer_mode applies AQN noise to the rollout weights right after each sync",
        "the rollout weights are rewritten at every sync; noise has to follow it",
        "MindSpeed-RL offers a post-sync hook",
        frozenset({"npu"}),
        hooks=(f"{_RL_MODULES}.resharding.megatron_sharding_manager",),
    ),
    PatchRecord(
        "mindspeed_rl_replay",
        _RL,
        "the training engine feeds replay per micro-batch, runs the replay passes, logs the log-prob mismatch and "
        "registers the router wrappers in every worker",
        "MindSpeed-RL's training engine has no routing-replay input",
        "MindSpeed-RL adopts megatron-core's router replay and feeds it from the TransferDock",
        frozenset({"npu"}),
        hooks=("mindspeed_rl.models.base.base_training_engine", "mindspeed_rl.models.loss.base_loss_func"),
    ),
    PatchRecord(
        "driver",
        "hydra-core, Ray",
        "hydra.main publishes the config's r3 / aqn / lora_extras sections; ray.init passes them and the setup hook "
        "to every worker through the job's runtime_env",
        "MindSpeed-RL's own cli/train_grpo.py starts the job; the sections must reach every Ray worker",
        "MindSpeed-RL forwards unknown config sections and a worker setup hook to its Ray job",
        hooks=("mindspeed_rl",),
    ),
    PatchRecord(
        "mindspeed_rl_entry",
        _RL,
        "nothing: imports cli/train_grpo.py and the config classes for mindspeed_rl_r3.train",
        "only patches/ imports MindSpeed-RL",
        "never: it is how the train entry reaches MindSpeed-RL",
        kind="import",
    ),
    PatchRecord(
        "cpu_tiny_assets",
        f"{_RL}, transformers",
        "nothing: builds the tiny Qwen3-MoE, its tokenizer and GSM8K-format data of configs/cpu_tiny_grpo.yaml with "
        "MindSpeed-RL's own preprocessing",
        "the CPU run of MindSpeed-RL's own flow needs a model and data without a download",
        "never: CPU trial runs only",
        kind="import",
    ),
    PatchRecord(
        "cpu_backend",
        "torch_npu, torchair, acl (absent on CPU machines)",
        "stand-in modules for torch_npu & co., torch.npu on the CPU, Tensor.npu as identity",
        "tests and the CPU pipeline run the real MindSpeed-RL sources without an NPU",
        "never: refused where a real torch_npu exists",
        kind="stand-in",
    ),
    PatchRecord(
        "megatron_cpu",
        f"megatron-core {pins.MEGATRON_CORE} / 0.16",
        "RNG trackers, current_device and unguarded Transformer-Engine names on the CPU",
        "megatron-core assumes CUDA in a few places",
        "never: CPU tests only, refused where an accelerator exists",
        kind="stand-in",
    ),
)

BY_NAME: dict[str, PatchRecord] = {r.name: r for r in RECORDS}


def checked() -> tuple[PatchRecord, ...]:
    """Records whose targets ``doctor`` checks (stand-ins replace device code and have none)."""
    return tuple(r for r in RECORDS if r.kind != "stand-in")


def hook_modules() -> tuple[str, ...]:
    """MindSpeed-RL modules whose import applies the integration's patches (:mod:`mindspeed_rl_r3.autopatch`); the
    driver's trigger is ``BY_NAME["driver"].hooks``."""
    return tuple(m for r in RECORDS if r.name != "driver" for m in r.hooks)


def required(profile: str) -> frozenset[str]:
    """Patch modules a job of ``profile`` cannot run without."""
    return frozenset(r.name for r in RECORDS if profile in r.required_for)
