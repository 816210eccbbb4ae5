"""MindSpeed-RL LoRA on Qwen3-MoE: weight sync that merges every adapter, a true reference, a trainable router.

MindSpeed-RL (05a90d77) syncs LoRA training weights to vLLM through ``MegatronStyleVllmWeightContainer`` and a
per-architecture weight adaptor. For Qwen3-MoE (see ``docs/lora.md``):

- ``Qwen3MoeMVWeightAdaptor.replace_name_i2t`` (and dense ``Qwen3MvWeightAdaptor``'s) drops the ``.base_layer``
  step of the base adaptor, so the container looks up ``linear_qkv.weight`` in a peft model that only has
  ``linear_qkv.base_layer.weight`` (``KeyError``), and never reaches its own attention LoRA merge.
  :func:`replace_name_i2t_lora_wrapper` adds ``.base_layer`` for peft-targeted modules.
- Grouped-expert LoRA (``weight1_lora_a/_b``, ``weight2_lora_a/_b``) is never merged: the container's only merge is
  for ``.base_layer.weight`` names, in the non-expert path. Both update paths (non-expert / experts with EP) pass the
  Megatron tensors through ``weight_adaptor.adjust_megatron_param_dict`` before any resharding or EP exchange;
  :func:`adjust_megatron_param_dict_lora_wrapper` replaces ``weight1`` / ``weight2`` there by their merged values
  (new tensors, this rank's local experts, parameters untouched).
- ``IntegratedWorker.compute_ref_log_prob`` disables only peft layers (shared backbone) or nothing (separate
  reference): :func:`compute_ref_log_prob_reference_wrapper` runs it with every adapter off (grouped experts
  included) and, with a shared backbone, a trainable router's initial weight (snapshotted at the first reference
  forward, which precedes the first update; a resumed run must use a separate reference model instead).
- peft >= 0.21 freezes the grouped-expert LoRA tensors (it no longer matches adapters by the ``lora_`` substring);
  :func:`get_peft_model_lora_wrapper` re-enables them right after peft wraps the model (inside MindSpeed-LLM's
  model provider, before DDP and the optimizer) and, with ``lora_router_trainable``, the router weight too.

Patches must be applied inside every Ray worker process (Ray imports the worker class fresh there).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.lora.merge import merge_grouped_in_param_dict
from mindspeed_rl_r3.lora.names import (
    NameMappingError,
    Qwen3MoeShape,
    check_name_mapping,
    megatron_names,
    vllm_names,
)
from mindspeed_rl_r3.lora.reference import adapters_disabled
from mindspeed_rl_r3.lora.router import make_router_trainable, snapshot_router_weights
from mindspeed_rl_r3.lora.trainable import make_grouped_lora_trainable
from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget

ADAPTOR_MODULE = "mindspeed_rl.workers.resharding.weight_adaptor"
CONTAINER = "mindspeed_rl.workers.resharding.vllm_weight_container.MegatronStyleVllmWeightContainer"
WORKER = "mindspeed_rl.workers.integrated_worker.IntegratedWorker"
ADAPTORS = ("Qwen3MoeMVWeightAdaptor", "Qwen3MvWeightAdaptor")
RL_VERSIONS = (pins.MINDSPEED_RL,)

TARGETS = (
    PatchTarget(f"{ADAPTOR_MODULE}.Qwen3MoeMVWeightAdaptor.replace_name_i2t", RL_VERSIONS, ("self", "inference_name")),
    PatchTarget(f"{ADAPTOR_MODULE}.Qwen3MvWeightAdaptor.replace_name_i2t", RL_VERSIONS, ("self", "inference_name")),
    PatchTarget(
        f"{ADAPTOR_MODULE}.Qwen3MoeMVWeightAdaptor.adjust_megatron_param_dict",
        RL_VERSIONS,
        ("self", "param_dict", "train_tp_size"),
    ),
    # Not patched; the merge relies on both update paths calling adjust_megatron_param_dict first.
    PatchTarget(f"{CONTAINER}._update_weight_buffers_intra_pp", RL_VERSIONS, ("self",)),
    PatchTarget(f"{CONTAINER}._update_weight_buffers_ep", RL_VERSIONS, ("self",)),
    # Patched: lora_target_modules from a hydra config is a ListConfig, which it does not take for a list.
    PatchTarget(f"{CONTAINER}._unwrap_megatron_model", RL_VERSIONS, ("self", "model")),
    # A Ray actor class: the method resolves bound (no ``self``); apply() patches ``__ray_actor_class__``.
    PatchTarget(f"{WORKER}.compute_ref_log_prob", RL_VERSIONS, ()),
    PatchTarget("peft.get_peft_model", ("0.7.1", "0.21"), ("model", "peft_config")),
)
_MARK = "__r3_mindspeed_rl_lora__"
PATCHES = PatchSet(_MARK, "mindspeed_rl_lora")


def _targets(model_config: Any) -> list[str]:
    """``lora_target_modules`` as a list (a list, tuple, OmegaConf ListConfig or single name); ``[]`` if unset."""
    targets = getattr(model_config, "lora_target_modules", None)
    if not targets:
        return []
    if isinstance(targets, str):
        return [targets]
    try:
        return [str(t) for t in targets]
    except TypeError:
        return []


def add_base_layer(megatron_name: str, lora_targets: Sequence[str]) -> str:
    """``...linear_qkv.weight`` -> ``...linear_qkv.base_layer.weight`` when ``linear_qkv`` is a peft target (the
    module's own name, as peft matches it); other names and already-renamed ones are returned unchanged."""
    if not megatron_name or ".base_layer." in megatron_name:
        return megatron_name
    module, _, leaf = megatron_name.rpartition(".")
    if leaf in ("weight", "bias") and module.rpartition(".")[2] in lora_targets:
        return f"{module}.base_layer.{leaf}"
    return megatron_name


def replace_name_i2t_lora_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def replace_name_i2t(self: Any, inference_name: str) -> Any:
        return add_base_layer(fn(self, inference_name), _targets(self.model_config))

    setattr(replace_name_i2t, _MARK, True)
    return replace_name_i2t


def adjust_megatron_param_dict_lora_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def adjust_megatron_param_dict(self: Any, param_dict: dict[str, Any], train_tp_size: int) -> dict[str, Any]:
        param_dict = fn(self, param_dict, train_tp_size)
        if any(name.endswith("weight1_lora_a") for name in param_dict):
            rank = getattr(self.model_config, "lora_r", None)
            alpha = getattr(self.model_config, "lora_alpha", None)
            if not rank or alpha is None:
                raise ValueError(
                    "grouped-expert LoRA found but the weight adaptor's model_config has "
                    f"lora_r={rank!r}, lora_alpha={alpha!r} (MindSpeed-RL sets them in _build_rollout)"
                )
            merge_grouped_in_param_dict(param_dict, rank, alpha / rank)
        return param_dict

    setattr(adjust_megatron_param_dict, _MARK, True)
    return adjust_megatron_param_dict


def unwrap_megatron_model_wrapper(fn: Any) -> Any:
    """MindSpeed-RL unwraps the peft model only when ``lora_target_modules`` is a ``list``; from a hydra config it is
    an OmegaConf ``ListConfig``, and the sync then looks up ``base_model.model.``-prefixed names: normalise first."""

    @functools.wraps(fn)
    def _unwrap_megatron_model(self: Any, model: Any) -> Any:
        targets = _targets(self.model_config)
        if targets and not isinstance(self.model_config.lora_target_modules, list):
            self.model_config.lora_target_modules = targets
        return fn(self, model)

    setattr(_unwrap_megatron_model, _MARK, True)
    return _unwrap_megatron_model


def compute_ref_log_prob_reference_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def compute_ref_log_prob(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _targets(getattr(self, "megatron_config", None)):
            return fn(self, *args, **kwargs)
        shared = bool(getattr(getattr(self, "rl_config", None), "share_backbone", False))
        if shared:
            # The first reference forward precedes the first update, after the checkpoint load: the initial router.
            snapshot_router_weights(self.ref_model, trainable_only=True)
        with adapters_disabled(self.ref_model, initial_router=shared):
            return fn(self, *args, **kwargs)

    setattr(compute_ref_log_prob, _MARK, True)
    return compute_ref_log_prob


def get_peft_model_lora_wrapper(fn: Any, router_trainable: bool = False) -> Any:
    """``get_peft_model`` that keeps grouped-expert LoRA trainable (peft >= 0.21 freezes it) and, with
    ``router_trainable``, makes ``mlp.router.weight`` trainable."""

    @functools.wraps(fn)
    def get_peft_model(model: Any, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        peft_model = fn(model, peft_config, *args, **kwargs)
        make_grouped_lora_trainable(peft_model)
        if router_trainable:
            make_router_trainable(peft_model)
        return peft_model

    setattr(get_peft_model, _MARK, True)
    get_peft_model.router_trainable = router_trainable
    return get_peft_model


def apply(worker_cls: Any = None, router_trainable: bool = False) -> list[str]:
    """Install the sync and reference patches and wrap ``peft.get_peft_model`` (grouped LoRA kept trainable; the
    router made trainable with ``router_trainable``). Idempotent; a second call with another ``router_trainable``
    raises. MindSpeed-LLM imports ``get_peft_model`` from ``peft`` inside its model provider, at call time.

    ``worker_cls`` defaults to ``IntegratedWorker.__ray_actor_class__``; pass a subclass defined before applying
    only if it overrides ``compute_ref_log_prob``. Returns the patched attribute paths.
    """
    import importlib

    adaptors = importlib.import_module(ADAPTOR_MODULE)
    patched = []
    for name in ADAPTORS:
        PATCHES.wrap(getattr(adaptors, name), "replace_name_i2t", replace_name_i2t_lora_wrapper)
        patched.append(f"{ADAPTOR_MODULE}.{name}.replace_name_i2t")
    # inherited from MegatronVLLMWeightAdaptor: the override concerns the Qwen3-MoE adaptor only
    PATCHES.wrap(
        adaptors.Qwen3MoeMVWeightAdaptor,
        "adjust_megatron_param_dict",
        adjust_megatron_param_dict_lora_wrapper,
        inherited=True,
    )
    patched.append(f"{ADAPTOR_MODULE}.Qwen3MoeMVWeightAdaptor.adjust_megatron_param_dict")
    container_module, _, container_name = CONTAINER.rpartition(".")
    PATCHES.wrap(
        getattr(importlib.import_module(container_module), container_name),
        "_unwrap_megatron_model",
        unwrap_megatron_model_wrapper,
    )
    patched.append(f"{CONTAINER}._unwrap_megatron_model")
    if worker_cls is None:
        worker_module, _, worker_name = WORKER.rpartition(".")
        worker = getattr(importlib.import_module(worker_module), worker_name)
        worker_cls = getattr(worker, "__ray_actor_class__", worker)
    PATCHES.wrap(worker_cls, "compute_ref_log_prob", compute_ref_log_prob_reference_wrapper)
    patched.append(f"{worker_cls.__module__}.{worker_cls.__qualname__}.compute_ref_log_prob")
    import peft

    current = peft.get_peft_model
    if getattr(current, _MARK, False) and current.router_trainable != router_trainable:
        raise RuntimeError(
            f"peft.get_peft_model is already patched with router_trainable={current.router_trainable}; "
            f"apply() was called again with router_trainable={router_trainable}"
        )
    lora_wrapper = functools.partial(get_peft_model_lora_wrapper, router_trainable=router_trainable)
    PATCHES.wrap(peft, "get_peft_model", lora_wrapper)
    patched.append("peft.get_peft_model")
    return patched


def undo() -> list[str]:
    """Restore every original :func:`apply` replaced, newest first; returns the restored paths."""
    return PATCHES.undo()


def check_adaptor_names(
    adaptor_cls: Any = None,
    shape: Qwen3MoeShape | None = None,
    lora_targets: Sequence[str] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
) -> dict[str, Any]:
    """Run the installed Qwen3-MoE adaptor over every vLLM name and check the result against the LoRA model.

    Every vLLM parameter must map to a distinct parameter of the Megatron model with grouped LoRA experts and peft on
    ``lora_targets`` (PP 1), and the Megatron side must pass :func:`check_name_mapping`. Returns a ``doctor`` row.
    """
    shape = shape or Qwen3MoeShape.qwen3_30b_a3b()
    row: dict[str, Any] = {
        "name": f"{ADAPTOR_MODULE}.Qwen3MoeMVWeightAdaptor names under LoRA (vLLM -> Megatron)",
        "versions": list(RL_VERSIONS),
        "installed": None,
        "found": True,
        "version_known": False,
    }
    if adaptor_cls is None:
        try:
            import importlib

            adaptor_cls = importlib.import_module(ADAPTOR_MODULE).Qwen3MoeMVWeightAdaptor
        except (ImportError, AttributeError) as err:
            return row | {"found": False, "compatible": False, "detail": str(err)}
    config = SimpleNamespace(lora_target_modules=list(lora_targets), lora_r=16, lora_alpha=32)
    adaptor = adaptor_cls(config)
    model_names = megatron_names(shape, "grouped", lora_targets)
    present = set(model_names)
    problems, seen = [], {}
    for name in vllm_names(shape):
        mapped = adaptor.replace_name_i2t(name)
        if mapped not in present:
            problems.append(f"{name} -> {mapped!r} (not a parameter of the LoRA model)")
        elif mapped in seen:
            problems.append(f"{name} and {seen[mapped]} -> {mapped}")
        seen.setdefault(mapped, name)
    try:
        check_name_mapping(model_names, shape, "vllm")
    except NameMappingError as err:
        problems.append(str(err))
    unsynced = sorted(n for n in present - set(seen) if "lora" not in n)
    if unsynced:
        problems.append(f"Megatron weights no vLLM name maps to: {unsynced[:4]} ({len(unsynced)} in all)")
    detail = "; ".join(problems[:4]) + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
    return row | {"compatible": not problems, "detail": detail}


def check() -> list[dict[str, Any]]:
    """PatchTarget rows plus the adaptor name check (skipped when MindSpeed-RL is not importable)."""
    try:
        from importlib.metadata import version

        peft_version: str | None = version("peft")
    except Exception:
        peft_version = None
    rows = [t.check(peft_version if t.path.startswith("peft.") else None) for t in TARGETS]
    adaptor_row = check_adaptor_names()
    if adaptor_row["found"]:
        rows.append(adaptor_row)
    return rows
