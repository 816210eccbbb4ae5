"""Demo results as JSON and PNG plots: mismatch curves over steps and per-layer routing agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mindspeed_rl_r3 import strict_json

CURVES = (
    ("k3_kl", "k3 KL (train vs rollout)"),
    ("routing_mismatch", "routing mismatch (token, layer)"),
    ("extreme_frac", "extreme-token fraction |dlogp| > ln 2"),
    ("reward", "reward"),
)


def save_json(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.json"
    path.write_text(strict_json.dumps(result, indent=2))
    return path


def save_plots(runs: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG of per-step curves (every run on the same axes) and one of per-layer agreement; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for name, run in runs.items():
            steps = [s["step"] for s in run["steps"]]
            ax.plot(steps, [s[key] for s in run["steps"]], marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if key == "k3_kl" and all(s[key] > 0 for run in runs.values() for s in run["steps"]):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    paths.append(out_dir / "mismatch_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        layers = sorted(run["layer_agreement"], key=int)
        xs = [int(x) + (i - (len(runs) - 1) / 2) * width for x in layers]
        ax.bar(xs, [run["layer_agreement"][x] for x in layers], width=width, label=name)
    values = [v for run in runs.values() for v in run["layer_agreement"].values()]
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("native top-k set == rollout's")
    ax.set_ylim(max(0.0, min(values) - 0.05) if values else 0.0, 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("per-layer agreement of the training router's own choice with the rollout", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(out_dir / "layer_agreement.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
