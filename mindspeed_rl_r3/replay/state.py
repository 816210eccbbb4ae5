"""Replay state for one model: per-layer queues bound by global layer number, and what every router does now.

A *pass* is one ``forward_backward`` over the micro-batches of a step (the old-log-prob forward, or one update
mini-batch). Before each micro-batch's forward, :meth:`RouterReplayState.load` queues its :class:`ReplayBatch`; each
router forward consumes the next entry of its layer's queue through the *forward* cursor. A forward re-run inside
backward (full or MoE-layer activation recompute) consumes the same entries through a separate *backward* cursor, in
the same order, which is valid because 1F1B and interleaved schedules run the backward of a model chunk's
micro-batches in their forward order. :meth:`RouterReplayState.end_pass` checks that every entry was consumed
exactly once per cursor, reads the alignment counters and raises (or warns) on misaligned routing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

import torch

from mindspeed_rl_r3.replay.metrics import AlignmentStats, LayerAlignment, alignment_metrics, default_alarm_overlap
from mindspeed_rl_r3.replay.modes import ReplayConfig, ReplayMode
from mindspeed_rl_r3.replay.router import replay_select
from mindspeed_rl_r3.routing.layout import ReplayBatch
from mindspeed_rl_r3.routing.trace import RoutingError


class RouterAction(Enum):
    NATIVE = "native"
    RECORD = "record"
    REPLAY = "replay"
    OBSERVE = "observe"  # route natively, but consume the loaded ids and measure agreement with them


def action_for(config: ReplayConfig, stage: str) -> RouterAction:
    """What the routers do in one MindSpeed-RL stage: ``old_log_prob``, ``update`` or ``reference``.

    R3 replays the rollout's routing in the old-log-prob forward and every update; R2 records the old-log-prob
    forward's own routing and replays it in every update (it removes drift between mini-steps, not the
    train/inference gap). The reference forward replays only with ``replay_reference`` under R3: R2 has nothing
    recorded yet when MindSpeed-RL computes reference log-probs. ``observe`` routes natively and measures the
    rollout's routing against the live router's in the old-log-prob forward and every update.
    """
    if stage not in ("old_log_prob", "update", "reference"):
        raise RoutingError(f"unknown stage {stage!r}; expected old_log_prob, update or reference")
    if config.mode is ReplayMode.DISABLED:
        return RouterAction.NATIVE
    if config.mode is ReplayMode.OBSERVE:
        return RouterAction.NATIVE if stage == "reference" else RouterAction.OBSERVE
    if stage == "reference":
        if config.replay_reference and config.mode is ReplayMode.R2:
            raise RoutingError("r3.replay_reference needs mode R3: R2 records routing after the reference forward")
        return RouterAction.REPLAY if config.replay_reference else RouterAction.NATIVE
    if stage == "old_log_prob" and config.mode is ReplayMode.R2:
        return RouterAction.RECORD
    return RouterAction.REPLAY


class MisalignedRoutingError(RoutingError):
    """Replayed routing agrees with the live router no better than chance: it belongs to other tokens."""


def _in_autograd_backward() -> bool:
    """True while the autograd engine runs a backward: a router forward there is an activation recompute."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Entry:
    batch: ReplayBatch
    column: int
    micro_batch: int


@dataclass
class _LayerQueue:
    entries: list[_Entry] = field(default_factory=list)
    forward: int = 0
    backward: int = 0


class RouterReplayState:
    """What the routers of one model do, and the replay data they consume. Pass it to the router hooks."""

    def __init__(self, config: ReplayConfig | None = None, device: torch.device | str | None = None) -> None:
        self.config = config or ReplayConfig()
        self.device = device
        self.action = RouterAction.NATIVE
        self.layer_numbers: tuple[int, ...] = ()
        self._queues: dict[int, _LayerQueue] = {}
        self._micro_batches = 0
        self._recorded: dict[int, list[torch.Tensor]] = {}
        self.alignment = AlignmentStats()
        self.last_alignment: list[LayerAlignment] = []
        self._forced_recompute: bool | None = None
        self._pending_dispatch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- binding ---------------------------------------------------------------------------------------------------
    def bind_layers(self, layer_numbers: list[int] | tuple[int, ...]) -> None:
        """The Megatron layer numbers of the routers this state serves (set by the model binding)."""
        if len(set(layer_numbers)) != len(layer_numbers):
            raise RoutingError(f"two routers claim the same layer number: {sorted(layer_numbers)}")
        self.layer_numbers = tuple(sorted(layer_numbers))

    # -- passes ----------------------------------------------------------------------------------------------------
    def begin_pass(self, action: RouterAction) -> None:
        if self._queues or self._micro_batches:
            raise RoutingError("a replay pass is still open: call end_pass() first")
        self.action = RouterAction(action)

    def load(self, batch: ReplayBatch) -> None:
        """Queue one micro-batch's replay ids (right before its forward)."""
        if self.action not in (RouterAction.REPLAY, RouterAction.OBSERVE):
            raise RoutingError(f"replay data loaded while routers are in {self.action.value} mode")
        missing = set(self.layer_numbers) - set(batch.layer_numbers)
        if missing:
            raise RoutingError(
                f"micro-batch {self._micro_batches} has no replay ids for layers {sorted(missing)} on this rank"
            )
        device_batch = batch.to(self.device) if self.device is not None else batch
        for j, n in enumerate(batch.layer_numbers):
            if n in self.layer_numbers:
                self._queues.setdefault(n, _LayerQueue()).entries.append(_Entry(device_batch, j, self._micro_batches))
        self._micro_batches += 1

    def consumption(self) -> dict[int, tuple[int, int, int]]:
        """``layer -> (queued, forward-consumed, recompute-consumed)`` for the open pass."""
        return {n: (len(q.entries), q.forward, q.backward) for n, q in sorted(self._queues.items())}

    def end_pass(self) -> list[LayerAlignment]:
        """Check exactly-once consumption, read alignment, raise on misalignment; back to native routing."""
        try:
            for n, q in sorted(self._queues.items()):
                total = len(q.entries)
                if q.forward != total:
                    raise RoutingError(
                        f"layer {n}: {total - q.forward} of {total} queued micro-batches were never routed "
                        f"(first unused: micro-batch {q.entries[q.forward].micro_batch})"
                    )
                if q.backward not in (0, total):
                    raise RoutingError(
                        f"layer {n}: recompute replayed {q.backward} of {total} micro-batches; "
                        "every recomputed forward must replay exactly once"
                    )
            self.last_alignment = self.alignment.summary()
            self._check_alignment(self.last_alignment)
            return self.last_alignment
        finally:
            self._queues.clear()
            self._pending_dispatch.clear()
            self._micro_batches = 0
            self.action = RouterAction.NATIVE

    def _check_alignment(self, layers: list[LayerAlignment]) -> None:
        if not layers or self.alignment.topk is None:
            return
        bad = []
        for x in layers:
            if x.replayed_rows < self.config.alarm_min_rows:
                continue
            bound = self.config.alarm_overlap
            if bound is None:
                bound = default_alarm_overlap(self.alignment.topk, self._num_experts)
            if x.mean_overlap < bound:
                bad.append(f"layer {x.layer_number}: overlap {x.mean_overlap:.3f} < {bound:.3f}")
        if bad:
            message = (
                "replayed routing does not match what the training router picks, it looks like routing for other "
                "tokens (wrong sample order, shifted rows, re-tokenized prompts): " + "; ".join(bad)
            )
            if self.config.on_misaligned == "raise":
                raise MisalignedRoutingError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def record_dispatch(self, layer_number: int, routing_map: torch.Tensor) -> None:
        """The experts the layer dispatches to after its router call (``routing_map [T, E]``, after replay and token
        dropping), measured against the rollout ids that call consumed. Recomputed forwards are not measured twice."""
        pending = self._pending_dispatch.pop(layer_number, None)
        if pending is None:
            return
        ids, missing = pending
        if routing_map.dim() != 2 or routing_map.shape[0] != ids.shape[0]:
            return  # a router that splits its map across ranks (moe_tp_extend_ep): not measured
        self.alignment.update_dispatch(layer_number, routing_map, ids.to(routing_map.device), missing)

    def metrics(self, prefix: str = "r3") -> dict[str, float]:
        return alignment_metrics(self.last_alignment, prefix)

    # -- R2 recording ----------------------------------------------------------------------------------------------
    def take_recorded(self) -> dict[int, list[torch.Tensor]]:
        """Native top-k ids ``[T, k]`` per layer number, one per micro-batch in forward order; clears them."""
        recorded, self._recorded = self._recorded, {}
        return recorded

    # -- recompute ---------------------------------------------------------------------------------------------------
    @contextmanager
    def recomputing(self, value: bool = True) -> Iterator[None]:
        """Force router calls to count as recompute (True) or first forward (False), for custom schedules."""
        previous, self._forced_recompute = self._forced_recompute, value
        try:
            yield
        finally:
            self._forced_recompute = previous

    def _is_recompute(self) -> bool:
        return _in_autograd_backward() if self._forced_recompute is None else self._forced_recompute

    # -- the router's hook -----------------------------------------------------------------------------------------
    _num_experts: int = 0

    def route(
        self,
        layer_number: int,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None,
        group_topk: int | None,
        compute_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, indices, native_indices)`` for one router call of ``layer_number``."""
        values, native = compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.action is RouterAction.NATIVE:
            return values, native, native
        recompute = self._is_recompute()
        if self.action is RouterAction.RECORD:
            if not recompute:
                self._recorded.setdefault(layer_number, []).append(native.detach().clone())
            return values, native, native
        q = self._queues.get(layer_number)
        cursor = "backward" if recompute else "forward"
        position = getattr(q, cursor) if q is not None else 0
        if q is None or position >= len(q.entries):
            loaded = 0 if q is None else len(q.entries)
            raise RoutingError(
                f"layer {layer_number}: {'recomputed ' if recompute else ''}router call {position} has no replay "
                f"entry ({loaded} micro-batches loaded)"
            )
        entry = q.entries[position]
        setattr(q, cursor, position + 1)
        ids, missing = entry.batch.column(entry.column)
        if ids.shape != native.shape:
            raise RoutingError(
                f"layer {layer_number} micro-batch {entry.micro_batch}: the router sees {native.shape[0]} tokens "
                f"with top-{native.shape[1]}, the replay entry holds {ids.shape[0]} x {ids.shape[1]}; the layout does "
                "not match this rank (sequence parallel / TP gather / CP settings?)"
            )
        ids = ids.to(native.device)
        missing = missing.to(native.device)
        replayed_values, replayed = replay_select(scores, native, ids, missing)
        if not recompute:
            self._num_experts = scores.shape[1]
            self.alignment.update(layer_number, replayed, native, missing)
            self._pending_dispatch[layer_number] = (ids, missing)
        if self.action is RouterAction.OBSERVE:
            return values, native, native
        return replayed_values, replayed, native


class ReplayHook:
    """Bound to one router: the object Megatron 0.16+ calls as ``router_replay`` and our 0.12 adapter calls too."""

    def __init__(self, state: RouterReplayState, layer_number: int) -> None:
        self.state = state
        self.layer_number = layer_number
        self.last_native: torch.Tensor | None = None
        self.selections = 0  # top-k selections seen, to detect routing types that bypass the hook

    @property
    def active(self) -> bool:
        return self.state.action is not RouterAction.NATIVE

    def dispatched(self, routing_map: torch.Tensor) -> None:
        """The router's returned ``routing_map``: what its layer really dispatches (see ``record_dispatch``)."""
        self.state.record_dispatch(self.layer_number, routing_map)

    def select(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        self.selections += 1
        values, indices, native = self.state.route(
            self.layer_number, scores, topk, num_groups, group_topk, default_compute_topk
        )
        self.last_native = native
        return values, indices

    # Megatron core >= 0.16 ``RouterReplay.get_replay_topk`` signature.
    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        return self.select(scores, topk, num_groups, group_topk, default_compute_topk)
