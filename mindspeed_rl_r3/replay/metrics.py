"""Alignment and mismatch telemetry for routing replay.

Per layer: how often the replayed expert set equals the set the training router would pick natively, their mean
overlap ``|A ∩ B| / k``, the fraction of rows that fell back to native routing, and the routing mismatch: the
fraction of rows whose experts, as the layer really dispatches them (the router's ``routing_map``, after replay and
token dropping), differ from the rollout's. R3 drives it to 0; routing natively (``observe``) shows the gap.
Aligned data agrees far above chance; misaligned data (wrong sample, shifted rows, re-tokenized prompt) collapses
to chance, about ``k / E``. Accumulated on the device and read once per pass, so the router itself never waits on the
host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|A ∩ B|`` per row for id tensors ``[T, k]`` with distinct ids per row (each match counts once)."""
    return (a.unsqueeze(2) == b.unsqueeze(1)).sum(dim=(1, 2))


def chance_overlap(topk: int, num_experts: int) -> float:
    """Expected ``|A ∩ B| / k`` of two independent uniformly random k-subsets of E experts."""
    return topk / num_experts


def default_alarm_overlap(topk: int, num_experts: int) -> float:
    """Mean overlap below which routing counts as misaligned: halfway between chance and perfect agreement.

    An off-by-one row shift (the classic misalignment) keeps some overlap between neighbouring tokens, so the bound
    sits well above chance rather than just above it.
    """
    chance = chance_overlap(topk, num_experts)
    return chance + 0.5 * (1.0 - chance)


@dataclass
class LayerAlignment:
    layer_number: int
    rows: int
    replayed_rows: int
    set_agreement: float
    mean_overlap: float
    fallback_fraction: float
    dispatched_rows: int = 0  # rows with rollout routing whose dispatched experts were measured
    routing_mismatch: float = float("nan")


@dataclass
class AlignmentStats:
    """Per-layer counters: rows (host), and on the device replayed rows, rows with equal sets, summed overlap, rows
    whose dispatch was measured and rows dispatched to other experts than the rollout's."""

    topk: int | None = None
    _rows: dict[int, int] = field(default_factory=dict)
    _counters: dict[int, torch.Tensor] = field(default_factory=dict)
    _dispatch: dict[int, torch.Tensor] = field(default_factory=dict)

    def update(self, layer_number: int, replay_ids: torch.Tensor, native_ids: torch.Tensor, missing: torch.Tensor):
        k = replay_ids.shape[1]
        self.topk = k
        replayed = ~missing
        overlap = set_overlap(replay_ids, native_ids) * replayed  # fallback rows count as no overlap
        row = torch.stack([replayed.sum(), (overlap == k).sum(), overlap.sum()])
        self._rows[layer_number] = self._rows.get(layer_number, 0) + missing.numel()
        current = self._counters.get(layer_number)
        self._counters[layer_number] = row if current is None else current + row

    def update_dispatch(
        self, layer_number: int, routing_map: torch.Tensor, rollout_ids: torch.Tensor, missing: torch.Tensor
    ) -> None:
        """Count rows (with rollout routing) whose dispatched expert set ``routing_map [T, E]`` is not the rollout's."""
        rollout_map = torch.zeros_like(routing_map, dtype=torch.bool).scatter(1, rollout_ids, True)
        measured = ~missing
        differs = (routing_map.bool() != rollout_map).any(dim=1) & measured
        row = torch.stack([measured.sum(), differs.sum()])
        current = self._dispatch.get(layer_number)
        self._dispatch[layer_number] = row if current is None else current + row

    def summary(self) -> list[LayerAlignment]:
        """Read the counters (one host sync) and reset them."""
        if not self._counters:
            return []
        layers = sorted(self._counters)
        zero = torch.zeros(2, dtype=torch.long, device=self._counters[layers[0]].device)
        counters = [torch.cat([self._counters[n], self._dispatch.get(n, zero)]) for n in layers]
        values = torch.stack(counters).cpu().tolist()
        rows_by_layer = dict(self._rows)
        self._counters.clear()
        self._dispatch.clear()
        self._rows.clear()
        out = []
        k = self.topk or 1
        for n, (replayed, equal, overlap_sum, dispatched, differs) in zip(layers, values, strict=True):
            rows, overlap = rows_by_layer[n], overlap_sum / k
            out.append(
                LayerAlignment(
                    layer_number=n,
                    rows=int(rows),
                    replayed_rows=int(replayed),
                    set_agreement=equal / replayed if replayed else float("nan"),
                    mean_overlap=overlap / replayed if replayed else float("nan"),
                    fallback_fraction=1.0 - replayed / rows if rows else float("nan"),
                    dispatched_rows=int(dispatched),
                    routing_mismatch=differs / dispatched if dispatched else float("nan"),
                )
            )
        return out


def alignment_metrics(layers: list[LayerAlignment], prefix: str = "r3") -> dict[str, float]:
    """Flat metric dict (MindSpeed-RL style ``name: float``), summary over layers plus one entry per layer."""
    if not layers:
        return {}
    replayed = sum(x.replayed_rows for x in layers)
    rows = sum(x.rows for x in layers)
    metrics = {
        f"{prefix}/set_agreement": sum(x.set_agreement * x.replayed_rows for x in layers if x.replayed_rows)
        / max(replayed, 1),
        f"{prefix}/mean_overlap": sum(x.mean_overlap * x.replayed_rows for x in layers if x.replayed_rows)
        / max(replayed, 1),
        f"{prefix}/fallback_fraction": 1.0 - replayed / max(rows, 1),
        f"{prefix}/min_layer_overlap": min((x.mean_overlap for x in layers if x.replayed_rows), default=float("nan")),
    }
    dispatched = sum(x.dispatched_rows for x in layers)
    if dispatched:
        mismatched = sum(x.routing_mismatch * x.dispatched_rows for x in layers if x.dispatched_rows)
        metrics[f"{prefix}/routing_mismatch"] = mismatched / dispatched
    for x in layers:
        metrics[f"{prefix}/set_agreement/layer_{x.layer_number}"] = x.set_agreement
    return metrics


def logprob_mismatch(
    train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Train/rollout log-prob mismatch over generated tokens.

    ``k3_kl`` = mean(exp(d) - 1 - d) with d = logp_train - logp_rollout; ``extreme_frac`` = fraction of tokens with
    ``|d| > ln 2`` (probability ratio beyond 2 either way); ``mean_abs`` and ``max_abs`` of ``|d|``.
    """
    d = (train_logp - rollout_logp).float()
    if mask is not None:
        d = d[mask.bool()]
    if d.numel() == 0:
        return {"k3_kl": float("nan"), "extreme_frac": float("nan"), "mean_abs": float("nan"), "max_abs": float("nan")}
    abs_d = d.abs()
    return {
        "k3_kl": float((torch.exp(d) - 1 - d).mean()),
        "extreme_frac": float((abs_d > torch.log(torch.tensor(2.0))).float().mean()),
        "mean_abs": float(abs_d.mean()),
        "max_abs": float(abs_d.max()),
    }
