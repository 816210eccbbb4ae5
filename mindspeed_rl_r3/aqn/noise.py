"""AQN noise: channel-wise Gaussian noise on RMSNorm scales, drawn identically on every rank.

For each targeted norm weight ``w`` (shape ``[channels]``) at global step ``s``, ``z ~ N(0, sigma(s)^2)`` is drawn
in fp32 on the CPU from a ``torch.Generator`` seeded by ``(seed, s, layer, norm slot)``; the layer is the global
decoder-layer index read from the parameter name, the slot names the norm independently of the naming convention
(HF/vLLM ``post_attention_layernorm`` and Megatron ``pre_mlp_layernorm`` are the same slot). Every TP/EP/DP/PP rank,
the rollout engine and the Megatron actor therefore draw the same ``z`` for the same norm without communication.

Three places use it:

- :class:`RolloutNoise` perturbs the rollout engine's copy of the weights right after each weight sync:
  ``precision="param_dtype"`` writes ``w + z`` (fp32 math, rounded to the parameter dtype) in place;
  ``precision="fp32"`` leaves the weight alone and a forward hook recomputes the norm output in fp32 with ``w + z``.
  It refuses to apply on top of its own previous noise (the sync must have re-copied the weights) so noise never
  accumulates, and :meth:`RolloutNoise.restore` puts the clean weights back (validation rollouts).
- :class:`ActorNoise` gives the actor's old-log-prob and update forwards the same perturbation through forward hooks
  on the norm modules; parameters, gradients' targets, optimizer state and checkpoints never hold noise. It is
  switched off with :meth:`ActorNoise.disabled` (reference forward, including ``disable_adapter()`` on a shared
  backbone).
- ``router="compensated"``: the router that reads the noisy norm output sees the clean one (rollout: its weight
  columns are rescaled by ``w / (w + z)`` in the synced copy; actor: its input is rescaled by the same factor in a
  forward pre-hook), so expert selection is unchanged while the experts see the noise.

Pure torch: works on any ``nn.Module`` through ``named_parameters()`` and module hooks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mindspeed_rl_r3.aqn.config import AQNConfig, AQNError
from mindspeed_rl_r3.aqn.schedule import aqn_schedule

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_GLOB = re.compile(r"[*?\[]")

# Canonical norm slots, so the rollout (HF/vLLM names) and the actor (Megatron names) draw the same z.
_NORM_SLOTS = {
    "post_attention_layernorm": "mlp_input_norm",
    "pre_mlp_layernorm": "mlp_input_norm",
    "input_layernorm": "attention_input_norm",
    "q_norm": "q_norm",
    "q_layernorm": "q_norm",
    "k_norm": "k_norm",
    "k_layernorm": "k_norm",
    "norm": "final_norm",
    "final_layernorm": "final_norm",
}
MLP_INPUT_NORM = "mlp_input_norm"

# |w + z| below this cannot be compensated in the router (the channel's information is gone): keep w there.
_MIN_PERTURBED = 1e-12


def name_matches(pattern: str, name: str) -> bool:
    """Whether a target pattern selects a parameter or module name.

    A pattern with glob characters (``*?[``) must match the whole name (``fnmatch``). Otherwise its dot-separated
    parts must appear as consecutive parts of the name: ``post_attention_layernorm`` and ``mlp.gate`` match
    ``model.layers.3.post_attention_layernorm.weight`` and ``model.layers.3.mlp.gate.weight`` but not
    ``mlp.gate_proj``.
    """
    if _GLOB.search(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    want = pattern.strip(".").split(".")
    parts = name.split(".")
    return any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def layer_index(name: str, layer_offset: int = 0) -> int:
    """Global decoder-layer index of a parameter name (``...layers.N...`` plus ``layer_offset``), -1 if none."""
    found = _LAYER.findall(name)
    return int(found[-1]) + layer_offset if found else -1


def _global_layer(model: nn.Module, name: str, layer_offset: int | None) -> int:
    # Megatron names restart at 0 on every pipeline stage (decoder.layers.i is local), but each TransformerLayer
    # carries its global 1-based layer_number; vLLM / HF names are global already.
    if layer_offset is not None:
        return layer_index(name, layer_offset)
    found = list(_LAYER.finditer(name))
    if not found:
        return -1
    number = getattr(model.get_submodule(name[: found[-1].end() - 1]), "layer_number", None)
    if isinstance(number, int) and not isinstance(number, bool):
        return number - 1
    return int(found[-1].group(1))


def norm_slot(name: str) -> str:
    """Naming-independent identity of the norm a parameter belongs to (e.g. ``mlp_input_norm``)."""
    parts = name.split(".")
    if len(parts) < 2:
        return name
    module, leaf = parts[-2], parts[-1]
    slot = _NORM_SLOTS.get(module, module)
    return slot if leaf == "weight" else f"{slot}.{leaf}"


def noise_seed(seed: int, step: int, layer: int, slot: str) -> int:
    """63-bit generator seed for one norm at one step: a hash, so neighbouring keys give unrelated streams."""
    key = f"aqn:{seed}:{step}:{layer}:{slot}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def draw_channel_noise(
    seed: int, step: int, layer: int, slot: str, channels: int, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``z ~ N(0, sigma^2)``, fp32 ``[channels]`` on the CPU; the same on every process for the same arguments."""
    gen = generator if generator is not None else torch.Generator()
    gen.manual_seed(noise_seed(seed, step, layer, slot))
    return torch.randn(channels, generator=gen, dtype=torch.float32).mul_(sigma)


@dataclass(frozen=True)
class NoiseTarget:
    """One perturbed norm weight: its parameter name, seeding key and, when compensated, the router it feeds."""

    name: str
    module: str
    layer: int
    slot: str
    channels: int
    router: str | None = None

    @property
    def router_module(self) -> str | None:
        return None if self.router is None else self.router.rsplit(".", 1)[0]


def _module_path(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _find_router(target: str, layer: int, channels: int, routers: list[str], params: dict[str, torch.Tensor]):
    # The router of the same decoder layer: the same name prefix up to "layers.N.".
    match = list(_LAYER.finditer(target))
    if not match:
        return None
    prefix = target[: match[-1].end()]
    found = [name for name in routers if name.startswith(prefix)]
    if len(found) > 1:
        raise AQNError(f"aqn.router_names match several weights in layer {layer}: {found}")
    if not found:
        return None
    weight = params[found[0]]
    if weight.dim() != 2 or weight.shape[1] != channels:
        raise AQNError(
            f"router weight {found[0]} has shape {list(weight.shape)}; expected [num_experts, {channels}] to "
            f"compensate the noise on {target}"
        )
    return found[0]


def select_targets(model: nn.Module, config: AQNConfig, *, layer_offset: int | None = None) -> list[NoiseTarget]:
    """The norm weights of ``model`` that ``config.targets`` selects, with their routers when compensated.

    Each target's layer (part of the noise seed) is the global 0-based decoder-layer index: the enclosing layer
    module's ``layer_number - 1`` where it has one (Megatron, correct on every pipeline stage), else the ``N`` of
    ``layers.N`` in the name; an explicit ``layer_offset`` is added to the name's ``N`` instead.

    Raises :class:`AQNError` when the patterns match nothing, match a parameter that is not a 1-D norm scale, or
    (``router="compensated"``) select a norm whose output does not feed the router directly, or find no router.
    """
    params = dict(model.named_parameters())
    routers = [n for n in params if n.endswith(".weight") and any(name_matches(p, n) for p in config.router_names)]
    targets = []
    for name, param in params.items():
        if not any(name_matches(p, name) for p in config.targets):
            continue
        if param.dim() != 1:
            raise AQNError(
                f"aqn.targets {list(config.targets)} match {name} of shape {list(param.shape)}; AQN perturbs 1-D "
                "norm scales only (noise on linear weights is not AQN)"
            )
        layer = _global_layer(model, name, layer_offset)
        slot = norm_slot(name)
        router = None
        if config.router == "compensated":
            if slot != MLP_INPUT_NORM:
                raise AQNError(
                    f"aqn.router='compensated' needs every target to be the MLP-input norm, whose output is the "
                    f"router's input; {name} reaches the router through attention and the residual stream"
                )
            router = _find_router(name, layer, param.shape[0], routers, params)
        targets.append(NoiseTarget(name, _module_path(name), layer, slot, int(param.shape[0]), router))
    if not targets:
        sample = ", ".join(list(params)[:6])
        raise AQNError(
            f"aqn.targets {list(config.targets)} match no parameter of {type(model).__name__}; "
            f"its parameter names look like: {sample}"
        )
    if config.router == "compensated" and not any(t.router for t in targets):
        raise AQNError(
            f"aqn.router='compensated' but aqn.router_names {list(config.router_names)} match no router weight "
            f"next to the targeted norms of {type(model).__name__}"
        )
    return targets


def draw_noise(targets: list[NoiseTarget], seed: int, step: int, sigma: float) -> dict[str, torch.Tensor]:
    """fp32 CPU noise per target name for one step."""
    gen = torch.Generator()  # reseeded per target: the draw depends on its key only
    return {t.name: draw_channel_noise(seed, step, t.layer, t.slot, t.channels, sigma, gen) for t in targets}


def _to_devices(noise: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move the CPU draws to their parameters' device with one copy when they share one (NPU: one H2D per step)."""
    devices = {params[name].device for name in noise}
    if devices == {torch.device("cpu")}:
        return noise
    if len(devices) > 1:
        return {name: z.to(params[name].device) for name, z in noise.items()}
    flat = torch.cat(list(noise.values())).to(devices.pop())
    return dict(zip(noise, flat.split([z.numel() for z in noise.values()]), strict=True))


def perturbed_weight(clean: torch.Tensor, z: torch.Tensor, precision: str, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 norm scale the perturbed forward computes with.

    ``fp32``: ``w + z``. ``param_dtype``: ``w + z`` computed in fp32 and rounded to ``dtype``, as an in-place write
    leaves it (in bf16 most of a small ``z`` is rounded away). Channels where ``w + z`` is ~0 keep ``w``.
    """
    w = clean.detach().float()
    used = w + z.to(w.device)
    if precision == "param_dtype":
        used = used.to(dtype).float()
    return torch.where(used.abs() < _MIN_PERTURBED, w, used)


def aqn_metrics(stage: int, sigma: float, changed_fraction: float) -> dict[str, float]:
    return {"aqn/sigma": float(sigma), "aqn/stage": float(stage), "aqn/changed_fraction": float(changed_fraction)}


def _norm_eps(module: nn.Module, name: str) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(module, attr):
            return getattr(module, attr)
    raise AQNError(
        f"{name} ({type(module).__name__}) has no eps / variance_epsilon attribute; AQN's fp32 norm hook needs it"
    )


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise AQNError("AQN norm hook: the norm was called without a tensor input")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None, out_dtype: torch.dtype) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # torch.nn.RMSNorm's eps=None rule, on the input dtype
    return F.rms_norm(x.float(), (weight.shape[-1],), weight, eps).to(out_dtype)


def _check_rmsnorm(module: nn.Module, name: str, eps: float | None) -> None:
    """Refuse a module whose output is not ``rms_norm(x) * weight`` (LayerNorm, zero-centred gamma, fused linear)."""
    weight = module.weight
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, weight.shape[0], generator=gen) + 0.5).to(weight.dtype).to(weight.device)
    with torch.no_grad():
        try:
            out = module(x)
        except Exception as exc:  # any failure means the hook cannot stand in for this module
            raise AQNError(f"{name} ({type(module).__name__}) cannot be called as norm(x): {exc}") from exc
        out = out[0] if isinstance(out, tuple | list) else out
        ours = _rms_norm(x, weight.float(), eps, out.dtype)
    tol = 4 * torch.finfo(out.dtype).eps
    if out.shape != ours.shape or not torch.allclose(out.float(), ours.float(), rtol=tol, atol=tol):
        raise AQNError(
            f"{name} ({type(module).__name__}) does not compute rms_norm(x) * weight; AQN's forward hook would change "
            "its output (LayerNorm, zero-centred gamma and norms fused into a linear layer are not supported)"
        )


class _NormHooks:
    """Forward hooks that make targeted norms compute with ``weight + delta`` in fp32, switched by ``on``.

    A norm's output is recomputed as ``rms_norm(x.float(), w.float() + delta)`` cast once to the output dtype, so a
    bf16 model keeps the full perturbation (each token rounds once, from the exact value). A tuple output is
    vLLM's fused add + RMSNorm: ``(norm(x + residual), x + residual)``, recomputed from its second element. With
    ``routers``, a pre-hook rescales each router's input by ``w / (w + delta)``: the router sees the clean output.
    """

    def __init__(self, model: nn.Module, targets: list[NoiseTarget], routers: bool) -> None:
        self.on = False
        self._handles: list[Any] = []
        self.deltas: dict[str, torch.Tensor] = {}
        for t in targets:
            module = model.get_submodule(t.module)
            if getattr(module, "weight", None) is None or module.weight.shape != (t.channels,):
                raise AQNError(f"{t.name}: the module {t.module} does not own it as .weight; cannot hook it")
            eps = _norm_eps(module, t.name)
            _check_rmsnorm(module, t.name, eps)
            # Updated in place each step, so engines that captured the hook's tensors see the new values.
            delta = torch.zeros(t.channels, dtype=torch.float32, device=module.weight.device)
            self.deltas[t.name] = delta
            self._handles.append(module.register_forward_hook(self._norm_hook(delta, eps), with_kwargs=True))
            if routers and t.router_module is not None:
                router = model.get_submodule(t.router_module)
                hook = self._router_hook(module, delta)
                self._handles.append(router.register_forward_pre_hook(hook, with_kwargs=True))

    def _norm_hook(self, delta: torch.Tensor, eps: float | None):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.on:
                return None
            weight = module.weight.float() + delta
            if isinstance(output, tuple | list):
                return (_rms_norm(output[1], weight, eps, output[0].dtype), *output[1:])
            return _rms_norm(_first_tensor(args, kwargs), weight, eps, output.dtype)

        return hook

    def _router_hook(self, norm: nn.Module, delta: torch.Tensor):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if not self.on:
                return None
            w = norm.weight.float()
            scale = w / (w + delta)
            if args:
                return ((args[0].float() * scale).to(args[0].dtype), *args[1:]), kwargs
            key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
            return args, {**kwargs, key: (kwargs[key].float() * scale).to(kwargs[key].dtype)}

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.on = False


class RolloutNoise:
    """AQN on the rollout engine's copy of the weights. Call :meth:`apply` right after every weight sync.

    ``model`` is the rollout model (vLLM's, or any ``nn.Module`` holding the synced weights); ``total_steps`` the
    number of training steps the schedule spans. The sync must re-copy the targeted norm (and, compensated, router)
    weights before each :meth:`apply`: applying on top of the previous step's noise is refused.
    """

    def __init__(
        self, model: nn.Module, config: AQNConfig, total_steps: int, *, layer_offset: int | None = None
    ) -> None:
        aqn_schedule(0, total_steps, config)  # validates total_steps
        self.config = config
        self.total_steps = total_steps
        self.targets = select_targets(model, config, layer_offset=layer_offset)
        params = dict(model.named_parameters())
        self._params = {t.name: params[t.name] for t in self.targets}
        self._params.update({t.router: params[t.router] for t in self.targets if t.router})
        self._hooks = _NormHooks(model, self.targets, routers=False) if config.precision == "fp32" else None
        self._clean: dict[str, torch.Tensor] = {}
        self._written: dict[str, torch.Tensor] = {}
        self._last_step: int | None = None
        self.last_metrics: dict[str, float] = {}

    def _check_resynced(self, step: int) -> None:
        for name, written in self._written.items():
            # Where the noise rounded away entirely, a stale weight is indistinguishable from a fresh one (and clean).
            if torch.equal(self._params[name], written) and not torch.equal(written, self._clean[name]):
                raise AQNError(
                    f"{name} still holds the noise AQN added at step {self._last_step}: the weight sync before step "
                    f"{step} did not re-copy it (noise would accumulate); sync it or call restore() first"
                )

    def apply(self, step: int) -> dict[str, float]:
        """Perturb the freshly synced weights for 0-based global ``step``; returns ``aqn/*`` metrics."""
        self._check_resynced(step)
        stage, sigma = aqn_schedule(step, self.total_steps, self.config)
        self._clean, self._written, self._last_step = {}, {}, step
        if sigma == 0.0:
            if self._hooks is not None:
                self._hooks.on = False
            self.last_metrics = aqn_metrics(stage, 0.0, 0.0)
            return self.last_metrics
        noise = _to_devices(draw_noise(self.targets, self.config.seed, step, sigma), self._params)
        changed = []
        with torch.no_grad():
            for t in self.targets:
                param = self._params[t.name]
                used = perturbed_weight(param, noise[t.name], self.config.precision, param.dtype)
                clean = param.detach().to(torch.float32, copy=True)  # not an alias: param is written below
                moved = used != clean
                changed.append(moved.sum())
                if self._hooks is not None:
                    # The hook adds delta to w: z itself, so it computes exactly the fp32 w + z (0 where guarded).
                    self._hooks.deltas[t.name].copy_(torch.where(moved, noise[t.name], 0.0))
                else:
                    self._clean[t.name] = param.detach().clone()
                    param.copy_(used)
                    self._written[t.name] = param.detach().clone()
                if t.router is not None:
                    self._compensate_router(t.router, clean / used)
            if self._hooks is not None:
                self._hooks.on = True
        channels = sum(t.channels for t in self.targets)
        self.last_metrics = aqn_metrics(stage, sigma, torch.stack(changed).sum().item() / channels)
        return self.last_metrics

    def _compensate_router(self, name: str, scale: torch.Tensor) -> None:
        router = self._params[name]
        self._clean[name] = router.detach().clone()
        router.copy_(router.float() * scale.to(router.device))
        self._written[name] = router.detach().clone()

    def restore(self) -> None:
        """Put back the clean weights of the last :meth:`apply` and stop the hooks (e.g. before a validation
        rollout that has no fresh sync). Apply again only after restoring or syncing."""
        with torch.no_grad():
            for name, clean in self._clean.items():
                self._params[name].copy_(clean)
        self._clean, self._written = {}, {}
        if self._hooks is not None:
            self._hooks.on = False

    def remove(self) -> None:
        """Restore and detach the hooks; the model is as it was built."""
        self.restore()
        if self._hooks is not None:
            self._hooks.remove()


def actor_stage_uses_noise(config: AQNConfig, stage: str) -> bool:
    """Whether one MindSpeed-RL training stage (``old_log_prob``, ``update``, ``reference``) runs with actor noise."""
    if stage not in ("old_log_prob", "update", "reference"):
        raise AQNError(f"unknown stage {stage!r}; expected old_log_prob, update or reference")
    return config.enabled and config.actor and stage != "reference"


class ActorNoise:
    """The rollout's noise in the actor's forwards, through forward hooks on the targeted norm modules.

    :meth:`set_step` draws the step's ``z`` (the same as :class:`RolloutNoise` for the same norm); the norms then
    compute with the weight the rollout used: ``w + z`` (``fp32``) or, for ``param_dtype``, the rollout's rounded
    ``w + z`` in ``rollout_dtype`` (default: the parameter's dtype), only on the channels the rounding changed.
    Nothing is written to a parameter. ``router="compensated"`` rescales each router's input back to the clean norm
    output. Hooks are live while :attr:`enabled`; switch them off for the reference forward with :meth:`disabled`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AQNConfig,
        total_steps: int,
        *,
        layer_offset: int | None = None,
        rollout_dtype: torch.dtype | None = None,
    ) -> None:
        if not config.actor:
            raise AQNError(f"aqn.apply_to is {config.apply_to!r}: the actor forward gets no noise")
        aqn_schedule(0, total_steps, config)
        self.config = config
        self.total_steps = total_steps
        self.rollout_dtype = rollout_dtype
        self.targets = select_targets(model, config, layer_offset=layer_offset)
        params = dict(model.named_parameters())
        self._weights = {t.name: params[t.name] for t in self.targets}
        self._hooks = _NormHooks(model, self.targets, routers=config.router == "compensated")
        self._enabled = True
        self._sigma = 0.0
        self.last_metrics: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self._hooks.on = self._enabled and self._sigma > 0.0

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """No actor noise inside (the reference forward); the previous state comes back after."""
        previous = self._enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def set_step(self, step: int) -> dict[str, float]:
        """Draw the noise of 0-based global ``step`` for the coming old-log-prob and update forwards."""
        stage, sigma = aqn_schedule(step, self.total_steps, self.config)
        changed = []
        noise = _to_devices(draw_noise(self.targets, self.config.seed, step, sigma), self._weights) if sigma else {}
        with torch.no_grad():
            for t in self.targets:
                delta = self._hooks.deltas[t.name]
                if not noise:
                    delta.zero_()
                    continue
                weight = self._weights[t.name]
                dtype = self.rollout_dtype or weight.dtype
                # The rollout's weight is the synced one, w in its dtype; mirror exactly what it computes with.
                clean = weight.detach().to(dtype) if self.config.precision == "param_dtype" else weight.detach()
                used = perturbed_weight(clean, noise[t.name], self.config.precision, dtype)
                moved = used != clean.float()
                # fp32: w + z like the rollout's hook; param_dtype: w + (rollout's weight - w) is that weight exactly.
                shift = noise[t.name] if self.config.precision == "fp32" else used - weight.float()
                delta.copy_(torch.where(moved, shift, 0.0))
                changed.append(moved.sum())
        self._sigma = sigma
        self.enabled = self._enabled
        channels = sum(t.channels for t in self.targets)
        fraction = torch.stack(changed).sum().item() / channels if changed else 0.0
        self.last_metrics = aqn_metrics(stage, sigma, fraction)
        return self.last_metrics

    def remove(self) -> None:
        """Detach every hook."""
        self._hooks.remove()
