"""Step metrics in MindSpeed-RL's metric dict, reduced correctly across ranks and micro-batches.

Workers send metrics to the TransferDock as ``{name: [value]}`` lists, and ``metrics_post_processing`` averages
every list. A mean of per-rank means is not the token-weighted mean, and a mean of maxima is not the maximum, so
each metric travels as encoded partial values (``name@sum`` / ``name@count``, ``name@max``, ``name@min``) that
:func:`reduce_entries` (run on the trainer before MindSpeed-RL's own post-processing) turns back into ``name``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mindspeed_rl_r3.replay.metrics import LayerAlignment, logprob_mismatch

SUM, COUNT, MAX, MIN = "@sum", "@count", "@max", "@min"
_SUFFIXES = (SUM, COUNT, MAX, MIN)


def mean_entry(name: str, mean: float, weight: float) -> dict[str, list[float]]:
    """A weighted mean as its two partial sums (weight 0 contributes nothing)."""
    return {f"{name}{SUM}": [float(mean) * float(weight) if weight else 0.0], f"{name}{COUNT}": [float(weight)]}


def max_entry(name: str, value: float) -> dict[str, list[float]]:
    return {f"{name}{MAX}": [float(value)]}


def min_entry(name: str, value: float) -> dict[str, list[float]]:
    return {f"{name}{MIN}": [float(value)]}


def merge_entries(into: dict[str, list[float]], *others: Mapping[str, Iterable[float]]) -> dict[str, list[float]]:
    for other in others:
        for key, values in other.items():
            into.setdefault(key, []).extend(values)
    return into


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f == f:  # drop NaN: a rank that saw no tokens
            out.append(f)
    return out


def reduce_entries(metric: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """``(reduced, untouched)``: encoded entries resolved to their names; everything else passed through."""
    reduced: dict[str, float] = {}
    rest: dict[str, Any] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for key, value in metric.items():
        base, suffix = (key.rsplit("@", 1)[0], "@" + key.rsplit("@", 1)[1]) if "@" in key else (key, "")
        if suffix not in _SUFFIXES:
            rest[key] = value
            continue
        values = _finite(value if isinstance(value, list | tuple) else [value])
        if suffix == SUM:
            sums[base] = sums.get(base, 0.0) + sum(values)
        elif suffix == COUNT:
            counts[base] = counts.get(base, 0.0) + sum(values)
        elif values:
            pick = max if suffix == MAX else min
            reduced[base] = pick([*values, reduced[base]] if base in reduced else values)
    for base, total in sums.items():
        n = counts.get(base, 0.0)
        reduced[base] = total / n if n else float("nan")
    return reduced, rest


def mismatch_entries(
    stage: str, train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, list[float]]:
    """Train / rollout log-prob mismatch of one micro-batch as encoded entries under ``mismatch/<stage>/``."""
    tokens = int(mask.sum())
    if tokens == 0:
        return {}
    m = logprob_mismatch(train_logp, rollout_logp, mask)
    prefix = f"mismatch/{stage}"
    return merge_entries(
        mean_entry(f"{prefix}/k3_kl", m["k3_kl"], tokens),
        mean_entry(f"{prefix}/extreme_token_frac", m["extreme_frac"], tokens),
        mean_entry(f"{prefix}/mean_abs_dlogp", m["mean_abs"], tokens),
        max_entry(f"{prefix}/max_abs_dlogp", m["max_abs"]),
    )


def alignment_entries(stage: str, layers: list[LayerAlignment]) -> dict[str, list[float]]:
    """Replay agreement of one pass (all layers of this rank) as encoded entries under ``r3/<stage>/``."""
    entries: dict[str, list[float]] = {}
    for x in layers:
        prefix = f"r3/{stage}"
        merge_entries(
            entries,
            mean_entry(f"{prefix}/set_agreement", x.set_agreement, x.replayed_rows),
            mean_entry(f"{prefix}/mean_overlap", x.mean_overlap, x.replayed_rows),
            mean_entry(f"{prefix}/fallback_fraction", x.fallback_fraction, x.rows),
        )
        if x.replayed_rows:
            merge_entries(entries, min_entry(f"{prefix}/min_layer_overlap", x.mean_overlap))
        if x.dispatched_rows:
            merge_entries(entries, mean_entry(f"{prefix}/routing_mismatch", x.routing_mismatch, x.dispatched_rows))
    return entries


def aqn_entries(metrics: Mapping[str, float]) -> dict[str, list[float]]:
    """AQN metrics of a rollout (the same on every rank) as encoded means."""
    return merge_entries({}, *(mean_entry(key, value, 1) for key, value in metrics.items()))
