"""Every rule that decides whether a config can run with the package, in one torch-free place.

``plan`` (on plain hydra data), the ``train`` driver (before Ray starts) and every actor worker's ``initialize`` (the
last line of defence for drivers that are not ours) all call :func:`check`, so a config ``plan`` accepts is one the
run accepts, with the same words. The three MindSpeed-RL sections come in as MindSpeed-RL's own ``RLConfig`` /
``MegatronConfig`` / ``GenerateConfig`` or anything with the same attributes (``plan`` passes
:class:`ConfigView` s); a missing attribute counts as MindSpeed-RL's default.

Each rule is one small function from :class:`RunConfigs` to a list of :class:`Finding`. Errors refuse the run,
warnings are reported. Rule sources: MindSpeed-LLM ``LoraFeature.validate_args`` and ``training/arguments.py``
(a2c0733; later releases, checked at c77308a, also reject LoRA with ``moe_tp_extend_ep``), MindSpeed-RL
``MegatronStyleVllmWeightContainer._validate_parallel_config`` and ``get_infer_params``, and what the package's own
capture, replay and transport support.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mindspeed_rl_r3.config import SECTIONS, ConfigError, IntegrationConfig, load_sections
from mindspeed_rl_r3.pins import MINDSPEED_LLM, MINDSPEED_RL
from mindspeed_rl_r3.replay.modes import ReplayMode

Severity = Literal["error", "warning"]
LATER_MINDSPEED_LLM = "c77308a"  # the first MindSpeed-LLM checked that rejects LoRA with moe_tp_extend_ep


@dataclass(frozen=True)
class Finding:
    """One broken (``error``) or doubtful (``warning``) rule: the config key it is about and why."""

    severity: Severity
    key: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "key": self.key, "message": self.message}


def error(key: str, message: str) -> Finding:
    return Finding("error", key, message)


def warning(key: str, message: str) -> Finding:
    return Finding("warning", key, message)


class ConfigView:
    """Attribute access over plain mappings, later ones winning (MindSpeed-RL's ``BaseConfig.update`` order).

    A key absent from all of them raises AttributeError, so the rules fall back to MindSpeed-RL's defaults.
    """

    def __init__(self, *mappings: Mapping[str, Any] | None) -> None:
        merged: dict[str, Any] = {}
        for mapping in mappings:
            merged.update(mapping or {})
        self._values = merged

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class RunConfigs:
    """What the rules read: MindSpeed-RL's three config objects and the package's sections (None: no sections,
    plain MindSpeed-RL, so only the model and parallel-plan rules apply)."""

    rl: Any
    megatron: Any
    generate: Any
    sections: IntegrationConfig | None

    def meg(self, name: str, default: Any = None) -> Any:
        value = getattr(self.megatron, name, None)
        return default if value is None else value

    def gen(self, name: str, default: Any = None) -> Any:
        value = getattr(self.generate, name, None)
        return default if value is None else value

    @property
    def num_experts(self) -> int:
        return int(self.meg("num_experts", 0))

    @property
    def lora(self) -> bool:
        return bool(self.meg("lora_target_modules"))

    @property
    def extend(self) -> bool:
        return bool(self.meg("moe_tp_extend_ep", False))


Rule = Callable[[RunConfigs], list[Finding]]

# ---------------------------------------------------------------------------------------------- model and layout


def router_topk_within_experts(c: RunConfigs) -> list[Finding]:
    topk = int(c.meg("moe_router_topk", 2))
    if c.num_experts and not 1 <= topk <= c.num_experts:
        return [error("moe_router_topk", f"moe_router_topk {topk} must be in [1, num_experts {c.num_experts}]")]
    return []


def lora_moe_dispatcher(c: RunConfigs) -> list[Finding]:
    dispatcher = c.meg("moe_token_dispatcher_type")
    if c.num_experts and c.lora and dispatcher != "alltoall_seq":
        return [
            error(
                "megatron_training.moe_token_dispatcher_type",
                f"megatron_training.moe_token_dispatcher_type={dispatcher!r}: LoRA on an MoE model requires "
                "moe_token_dispatcher_type: alltoall_seq (MindSpeed-LLM LoraFeature.validate_args)",
            )
        ]
    return []


def lora_with_tp_extend_ep(c: RunConfigs) -> list[Finding]:
    if c.num_experts and c.lora and c.extend:
        return [
            warning(
                "actor_config.moe_tp_extend_ep",
                f"actor_config.moe_tp_extend_ep=true with LoRA: valid on the pinned MindSpeed-LLM {MINDSPEED_LLM[:7]}; "
                f"later MindSpeed-LLM ({LATER_MINDSPEED_LLM}) rejects LoRA with moe_tp_extend_ep ('Lora is not "
                f"supported with moe-tp-extend-ep'). MindSpeed-RL {MINDSPEED_RL} needs it for training EP and for "
                "syncing experts to an EP rollout, so the two cannot be combined on the newer MindSpeed-LLM",
            )
        ]
    return []


def lora_moe_without_grouped_gemm(c: RunConfigs) -> list[Finding]:
    if c.num_experts and c.lora and not c.meg("moe_grouped_gemm", False):
        return [
            warning(
                "megatron_training.moe_grouped_gemm",
                "LoRA on MoE without moe_grouped_gemm: MindSpeed-LLM's expert LoRA (LoraParallelGroupedMLP) is "
                "installed only for grouped GEMM; sequential experts get LoRA only through linear_fc1/linear_fc2",
            )
        ]
    return []


def alltoall_overlap(c: RunConfigs) -> list[Finding]:
    """MindSpeed-LLM's argument checks for ``moe_alltoall_overlap_comm``."""
    if not (c.num_experts and c.meg("moe_alltoall_overlap_comm", False)):
        return []
    key, found = "megatron_training.moe_alltoall_overlap_comm", []
    if c.meg("moe_token_dispatcher_type") != "alltoall_seq":
        found.append(
            error(key, "moe_alltoall_overlap_comm needs moe_token_dispatcher_type: alltoall_seq (MindSpeed-LLM)")
        )
    if not (c.meg("moe_permutation_async_comm", False) and c.meg("moe_grouped_gemm", False)):
        found.append(error(key, "moe_alltoall_overlap_comm needs moe_permutation_async_comm and moe_grouped_gemm"))
    tp = int(c.meg("tensor_model_parallel_size", 1))
    if tp > 1 and not c.extend:
        found.append(
            error(
                key,
                f"{key}: with TP {tp} > 1 MindSpeed-LLM allows the all-to-all overlap only with moe_tp_extend_ep; set "
                "moe_alltoall_overlap_comm: false",
            )
        )
    return found


def training_ep_needs_tp_extend_ep(c: RunConfigs) -> list[Finding]:
    ep = int(c.meg("expert_model_parallel_size", 1))
    if c.num_experts and ep > 1 and not c.extend:
        return [
            error(
                "actor_config.expert_model_parallel_size",
                f"actor_config.expert_model_parallel_size={ep} without moe_tp_extend_ep: MindSpeed-RL's weight "
                "resharding (MegatronStyleVllmWeightContainer._validate_parallel_config) accepts training EP > 1 only "
                "with moe_tp_extend_ep; set moe_tp_extend_ep: true or EP 1",
            )
        ]
    return []


def _expert_groups(c: RunConfigs) -> tuple[int, int]:
    """(training expert group as MindSpeed-RL's resharding sees it, vLLM expert group = infer TP * infer EP)."""
    tp, ep = int(c.meg("tensor_model_parallel_size", 1)), int(c.meg("expert_model_parallel_size", 1))
    itp, iep = int(c.gen("infer_tensor_parallel_size", 8)), int(c.gen("infer_expert_parallel_size", 1))
    return ep * tp if c.extend else ep, itp * iep


def infer_expert_group_multiple(c: RunConfigs) -> list[Finding]:
    train_group, infer_group = _expert_groups(c)
    if c.num_experts and infer_group % train_group:
        return [
            error(
                "generate_config.infer_expert_parallel_size",
                f"infer TP * infer EP = {infer_group} is not a multiple of the training expert group "
                f"{'TP * EP' if c.extend else 'EP'} = {train_group} (MindSpeed-RL resharding, "
                "_validate_parallel_config)",
            )
        ]
    return []


def ep_rollout_needs_tp_extend_ep(c: RunConfigs) -> list[Finding]:
    """Not checked upstream: without it the rollout silently keeps its dummy expert weights."""
    _, infer_group = _expert_groups(c)
    if c.num_experts and infer_group > 1 and not c.extend:
        return [
            error(
                "actor_config.moe_tp_extend_ep",
                f"infer TP * infer EP = {infer_group} > 1 without moe_tp_extend_ep: MindSpeed-RL's get_infer_params "
                "skips expert weights in the non-expert update and writes them only in its EP update, which runs only "
                "with moe_tp_extend_ep, so it never writes the expert weights and the rollout would keep dummy "
                "experts; set moe_tp_extend_ep: true",
            )
        ]
    return []


# ----------------------------------------------------------------------------------------- the package's sections


def lora_router_trainable(c: RunConfigs) -> list[Finding]:
    if c.sections is None or not c.sections.lora_extras.lora_router_trainable:
        return []
    key, found = "lora_extras.lora_router_trainable", []
    if not c.lora:
        found.append(error(key, "lora_router_trainable needs LoRA (lora_target_modules is empty)"))
    if c.meg("lora_ckpt_filter", False):
        found.append(
            error(
                key,
                "lora_router_trainable with lora_ckpt_filter: it saves only names containing 'lora' (MindSpeed-LLM "
                "filter_lora_keys), so the trained router would be lost at every checkpoint",
            )
        )
    return found


def grpo_stage_only(c: RunConfigs) -> list[Finding]:
    stage = getattr(c.megatron, "stage", None)
    if c.sections is not None and stage != "ray_grpo":
        return [
            error(
                "megatron_training.stage",
                f"megatron_training.stage {stage!r} (the integration extends the GRPO trainer)",
            )
        ]
    return []


def text_only(c: RunConfigs) -> list[Finding]:
    if c.sections is not None and getattr(c.rl, "is_multimodal", False):
        return [error("rl_config.is_multimodal", "rl_config.is_multimodal (text-only models)")]
    return []


def synchronous_single_turn_rollout(c: RunConfigs) -> list[Finding]:
    """Every integrated rollout puts rollout_log_probs (and with R3 routed_experts), which the training stages wait
    for in the TransferDock: a rollout path the package does not wrap would leave them waiting forever."""
    if c.sections is None:
        return []
    found = []
    if getattr(c.rl, "async_engine", False):
        found.append(
            error(
                "rl_config.async_engine", "rl_config.async_engine (the package wraps the synchronous rollout path only)"
            )
        )
    if getattr(c.rl, "multi_turn_enable", False):
        found.append(
            error(
                "rl_config.multi_turn_enable",
                "rl_config.multi_turn_enable (the package wraps the single-turn rollout path only)",
            )
        )
    return found


R2_UNSUPPORTED = (
    "r3.mode R2 is not supported through MindSpeed-RL: its update dispatch regroups samples after the old-log-prob "
    "forward that R2 records; use mode R3 (or R2 in the CPU demo)"
)


def r2_not_through_mindspeed_rl(c: RunConfigs) -> list[Finding]:
    if c.sections is not None and c.sections.r3.replay.mode is ReplayMode.R2:
        return [error("r3.mode", R2_UNSUPPORTED)]
    return []


def replay_needs_moe(c: RunConfigs) -> list[Finding]:
    if c.sections is not None and c.sections.r3.enabled and not c.num_experts:
        mode = c.sections.r3.replay.mode.value
        return [error("r3.mode", f"r3.mode={mode!r} on a dense model: routing replay needs MoE layers")]
    return []


def capture_without_torchair(c: RunConfigs) -> list[Finding]:
    if c.sections is not None and c.sections.r3.capture and c.gen("torchair_graph", False):
        return [
            error(
                "generate_config.torchair_graph",
                "generate_config.torchair_graph (capture runs in vllm-ascend's eager / ACL graph MoE): R3 capture does "
                "not support torchair graph mode; set false",
            )
        ]
    return []


def capture_without_virtual_pipeline(c: RunConfigs) -> list[Finding]:
    if c.sections is not None and c.sections.r3.capture and c.meg("num_layers_per_virtual_pipeline_stage"):
        return [
            error(
                "actor_config.num_layers_per_virtual_pipeline_stage",
                "actor_config.num_layers_per_virtual_pipeline_stage (replay serves one chunk per rank)",
            )
        ]
    return []


# Consumers of the routing column whose dispatch must hand out whole GRPO groups for group dedupe to decode.
GROUP_DISPATCHES = ("actor_logprob_dispatch_size", "actor_update_dispatch_size", "ref_dispatch_size")


def group_dedupe_whole_groups(c: RunConfigs) -> list[Finding]:
    """A follower's payload decodes only next to its group's leader, so every dispatch must carry whole groups."""
    if c.sections is None or not (c.sections.r3.capture and c.sections.r3.group_dedupe):
        return []
    fix = "or r3.group_dedupe: false"
    if not getattr(c.rl, "guarantee_order", False):
        return [
            error(
                "rl_config.guarantee_order",
                "r3.group_dedupe with rl_config.guarantee_order: false (MindSpeed-RL's default samples single rows at "
                "random, splitting GRPO groups from the leader that carries their shared prompt routing): set "
                f"rl_config.guarantee_order: true {fix}",
            )
        ]
    n = int(getattr(c.rl, "n_samples_per_prompt", 1) or 1)
    return [
        error(
            f"rl_config.{name}",
            f"r3.group_dedupe with rl_config.{name}: {size}, not a multiple of n_samples_per_prompt {n} (a dispatch "
            f"would split a GRPO group): use a multiple of {n} {fix}",
        )
        for name in GROUP_DISPATCHES
        if (size := getattr(c.rl, name, None)) and int(size) % n
    ]


RULES: tuple[Rule, ...] = (
    router_topk_within_experts,
    lora_moe_dispatcher,
    lora_with_tp_extend_ep,
    lora_moe_without_grouped_gemm,
    alltoall_overlap,
    training_ep_needs_tp_extend_ep,
    infer_expert_group_multiple,
    ep_rollout_needs_tp_extend_ep,
    lora_router_trainable,
    grpo_stage_only,
    text_only,
    synchronous_single_turn_rollout,
    r2_not_through_mindspeed_rl,
    replay_needs_moe,
    capture_without_torchair,
    capture_without_virtual_pipeline,
    group_dedupe_whole_groups,
)


# ------------------------------------------------------------------------------------------------- entry points

_SECTION_KEY = re.compile(rf"\b({'|'.join(SECTIONS)})(\.\w+)?")


def section_findings(sections: Mapping[str, Any] | None) -> tuple[IntegrationConfig | None, list[Finding]]:
    """``(validated sections, [])``, or ``(None, [the error])``; no sections at all: ``(None, [])``."""
    present = {k: v for k, v in (sections or {}).items() if k in SECTIONS and v is not None}
    if not present:
        return None, []
    try:
        return load_sections(present), []
    except ConfigError as err:
        match = _SECTION_KEY.search(str(err))
        return None, [error(match.group(0) if match else "r3", str(err))]


def findings(rl: Any, megatron: Any, generate: Any, sections: IntegrationConfig | None) -> list[Finding]:
    """Every finding of :data:`RULES` for MindSpeed-RL's three configs and the (validated) sections."""
    configs = RunConfigs(rl, megatron, generate, sections)
    return [finding for rule in RULES for finding in rule(configs)]


def refusals(rl: Any, megatron: Any, generate: Any, sections: IntegrationConfig | None) -> list[str]:
    """Why these configs cannot run (``[]``: they can): the messages of the error findings."""
    return [f.message for f in findings(rl, megatron, generate, sections) if f.severity == "error"]


def check(rl: Any, megatron: Any, generate: Any, sections: Mapping[str, Any] | None) -> list[Finding]:
    """The sections validated, then every rule: what ``plan`` reports and the ``train`` driver refuses on."""
    config, found = section_findings(sections)
    if found:
        return found  # the rules need valid sections
    return findings(rl, megatron, generate, config)


def refusal_message(problems: list[str]) -> str:
    return "mindspeed_rl_r3 cannot run with: " + "; ".join(problems)
