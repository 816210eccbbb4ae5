"""peft LoRA on megatron-core parallel linears, for the CPU tests and demo (peft 0.7.1 .. 0.21.2).

MindSpeed-LLM pins peft 0.7.1, which wraps Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` unmodified.
Later releases broke that path in the four ways below; :func:`apply` repairs it without changing what LoRA
computes:

(a) peft >= 0.19 no longer passes ``fan_in_fan_out`` to ``dispatch_megatron``, which reads it: the dispatcher is
    wrapped to fill it in from the ``LoraConfig``.
(b) peft >= 0.14 ``LoraParallelLinear.update_layer`` never sets ``lora_bias[adapter]``, which
    ``reset_lora_parameters`` reads: preset it to ``False`` (the layer rejects LoRA bias anyway); also in
    ``reset_lora_parameters`` itself, for subclasses with their own ``update_layer`` (MindSpeed-LLM's MoE LoRA).
(c) peft >= 0.14 stopped unwrapping the ``(output, bias)`` tuples Megatron's parallel lora_A / lora_B return: a
    forward hook on those two sub-layers returns the output alone.
(d) peft 0.13 - 0.17 read ``model.config`` as a dict: :func:`add_config_to_dict` gives the model's
    ``TransformerConfig`` an empty ``to_dict``.

Each repair is a no-op where the release does not need it. ``update_layer`` also sets ``params_dtype = float32`` on
the ``megatron_config`` it is given: :func:`megatron_lora_config` passes a copy.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

from mindspeed_rl_r3.patches.patch_set import PatchSet
from mindspeed_rl_r3.patches.targets import PatchTarget

VERSIONS = ("0.7.1", "0.13.2", "0.14", "0.15", "0.16", "0.17", "0.18", "0.19", "0.20", "0.21")
TARGETS = (
    PatchTarget(
        "peft.tuners.lora.model.dispatch_megatron", versions=VERSIONS, parameters=("target", "adapter_name", "config")
    ),
    PatchTarget(
        "peft.tuners.lora.tp_layer.LoraParallelLinear.update_layer",
        versions=VERSIONS,
        parameters=("self", "adapter_name", "r", "lora_alpha"),
    ),
    PatchTarget(
        "peft.tuners.lora.layer.LoraLayer.reset_lora_parameters",
        versions=VERSIONS,
        parameters=("self", "adapter_name", "init_lora_weights"),
    ),
)
_MARK = "__r3_peft_megatron__"
_HOOKED = "_r3_first_output_hook"
PATCHES = PatchSet(_MARK, "peft_megatron")


def _first_output(_module: Any, _inputs: Any, output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def dispatch_megatron_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def dispatch_megatron(target: Any, adapter_name: str, config: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("fan_in_fan_out", getattr(config, "fan_in_fan_out", False))
        return fn(target, adapter_name, config=config, **kwargs)

    setattr(dispatch_megatron, _MARK, True)
    return dispatch_megatron


def _preset_lora_bias(layer: Any, adapter_name: str) -> None:
    """(b): ``lora_bias[adapter]`` as ``False`` where peft left it unset."""
    lora_bias = getattr(layer, "lora_bias", None)
    if isinstance(lora_bias, dict):
        lora_bias.setdefault(adapter_name, False)


def update_layer_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def update_layer(self: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        _preset_lora_bias(self, adapter_name)
        result = fn(self, adapter_name, *args, **kwargs)
        backend = getattr(self, "backend", None)
        parallel = tuple(
            cls
            for cls in (getattr(backend, "RowParallelLinear", None), getattr(backend, "ColumnParallelLinear", None))
            if cls is not None
        )
        for layers in (self.lora_A, self.lora_B):
            if adapter_name not in layers:
                continue
            sub = layers[adapter_name]
            if parallel and isinstance(sub, parallel) and not getattr(sub, _HOOKED, False):
                sub.register_forward_hook(_first_output)
                setattr(sub, _HOOKED, True)
        return result

    setattr(update_layer, _MARK, True)
    return update_layer


def reset_lora_parameters_wrapper(fn: Any) -> Any:
    @functools.wraps(fn)
    def reset_lora_parameters(self: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        _preset_lora_bias(self, adapter_name)
        return fn(self, adapter_name, *args, **kwargs)

    setattr(reset_lora_parameters, _MARK, True)
    return reset_lora_parameters


def apply() -> list[str]:
    """Install (a)-(c) (idempotent; (a) only where peft has ``dispatch_megatron``, 0.13+); returns the patched
    attribute paths."""
    from peft.tuners.lora import layer as lora_layer
    from peft.tuners.lora import model as lora_model
    from peft.tuners.lora import tp_layer

    patched = []
    if getattr(lora_model, "dispatch_megatron", None) is not None:  # peft 0.7.1 dispatches inline, no function
        PATCHES.wrap(lora_model, "dispatch_megatron", dispatch_megatron_wrapper)
        patched.append(TARGETS[0].path)
    PATCHES.wrap(tp_layer.LoraParallelLinear, "update_layer", update_layer_wrapper)
    patched.append(TARGETS[1].path)
    PATCHES.wrap(lora_layer.LoraLayer, "reset_lora_parameters", reset_lora_parameters_wrapper)
    patched.append(TARGETS[2].path)
    return patched


def undo() -> list[str]:
    """Restore what :func:`apply` replaced (layers already built keep their hooks); returns the restored paths."""
    return PATCHES.undo()


def add_config_to_dict(model: Any) -> Any:
    """(d): give ``model.config`` (a megatron ``TransformerConfig``) a ``to_dict`` returning ``{}`` if it has none."""
    config = getattr(model, "config", None)
    if config is not None and not hasattr(config, "to_dict"):
        config.to_dict = dict
    return model


def megatron_lora_config(
    megatron_config: Any,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
) -> Any:
    """The ``LoraConfig`` MindSpeed-LLM builds (dropout 0, no bias), on a shallow copy of ``megatron_config``."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        megatron_config=copy.copy(megatron_config),
        megatron_core="megatron.core",
    )


def check() -> list[dict[str, Any]]:
    try:
        import peft

        version = peft.__version__
    except ImportError:
        version = None
    return [t.check(version) for t in TARGETS]
