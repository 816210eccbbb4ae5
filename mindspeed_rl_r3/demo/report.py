"""Demo results as strict JSON and PNG plots: curves over steps, per-layer routing agreement, the greedy and the
quantization evaluations.

Every arm has one colour in every plot and every run mode (``ARM_COLOURS``); step axes have integer ticks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mindspeed_rl_r3 import strict_json

ARM_COLOURS = {"r3_off": "tab:red", "r3_on": "tab:blue", "r3_on_no_aqn": "tab:green", "r3_on_aqn": "tab:purple"}
ARM_LABELS = {
    "r3_off": "R3 off",
    "r3_on": "R3 on",
    "r3_on_no_aqn": "R3 on, AQN off",
    "r3_on_aqn": "R3 on, AQN on",
}
CURVES = (
    ("reward", "mean sampled reward (training prompts)"),
    ("routing_mismatch", "routing mismatch (token, layer)"),
    ("k3_kl", "k3 KL, training vs rollout log-probs"),
    ("kl_ref", "k3 KL to the reference (dashed: routed natively)"),
    ("extreme_frac", "extreme-token fraction |dlogp| > ln 2"),
)
LOG_SCALE = ("k3_kl", "kl_ref")
QUANT_FORMATS = ("unquantized", "nvfp4", "int4")


def arm_runs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: result[name] for name in ARM_COLOURS if isinstance(result.get(name), dict)}


def save_json(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.json"
    path.write_text(strict_json.dumps(result, indent=2))
    return path


def save_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``mismatch_curves.png`` (per-step curves, every arm on the same axes), ``layer_agreement.png`` and, when the
    result has it, ``quant_eval.png``; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = arm_runs(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.0 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for name, run in runs.items():
            # log-scale panels skip zeros (step 0's KL to the reference before any update)
            points = [
                (s["step"], s[key])
                for s in run["steps"]
                if s.get(key) is not None and (s[key] > 0 or key not in LOG_SCALE)
            ]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                color=ARM_COLOURS[name],
                label=ARM_LABELS[name],
            )
        if key == "kl_ref":  # R3 arms: the same KL against a reference that routes natively instead of replaying
            for name, run in runs.items():
                if run.get("r3"):
                    points = [(s["step"], s["kl_ref_native"]) for s in run["steps"] if s.get("kl_ref_native")]
                    ax.plot([p[0] for p in points], [p[1] for p in points], ls="--", color=ARM_COLOURS[name])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        values = [s.get(key) for run in runs.values() for s in run["steps"] if s.get(key) is not None]
        if key in LOG_SCALE and values and any(v > 0 for v in values):
            ax.set_yscale("log")
        if key == "reward":
            ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "mismatch_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        layers = sorted(run["layer_agreement"], key=int)
        xs = [int(x) + (i - (len(runs) - 1) / 2) * width for x in layers]
        ax.bar(
            xs,
            [run["layer_agreement"][x] for x in layers],
            width=width,
            color=ARM_COLOURS[name],
            label=ARM_LABELS[name],
        )
    values = [v for run in runs.values() for v in run["layer_agreement"].values() if v is not None]
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("native top-k set == rollout's")
    ax.set_ylim(max(0.0, min(values) - 0.05) if values else 0.0, 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("per-layer agreement of the training router's own choice with the rollout", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(out_dir / "layer_agreement.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    quant = result.get("aqn_quant_eval")
    if quant:
        paths.append(_plot_evaluations(runs, quant, out_dir, plt))
    return paths


def _plot_evaluations(runs: dict[str, dict[str, Any]], quant: dict[str, Any], out_dir: Path, plt) -> Path:
    """Greedy reward before / after training per arm; greedy reward per weight format and the log-prob drift of each
    4-bit format, for the AQN-on and AQN-off policies; one bar colour per arm."""
    fig, (greedy, reward, drift) = plt.subplots(1, 3, figsize=(15, 3.6))
    splits = ("greedy_train_before", "greedy_train_after", "greedy_held_out_before", "greedy_held_out_after")
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        offset = (i - (len(runs) - 1) / 2) * width
        values = [run.get(k) or 0.0 for k in splits]
        greedy.bar(
            [x + offset for x in range(len(splits))], values, width, color=ARM_COLOURS[name], label=ARM_LABELS[name]
        )
    greedy.set_xticks(range(len(splits)), ["pool\nbefore", "pool\nafter", "held-out\nbefore", "held-out\nafter"])
    greedy.set_ylim(0, 1.02)
    greedy.set_title("greedy reward (fp32), training pool and held-out", fontsize=10)
    policies = [p for p in ("aqn_on", "aqn_off") if p in quant]
    width = 0.8 / max(len(policies), 1)
    for i, policy in enumerate(policies):
        arm = quant["policies"][policy]
        offset = (i - (len(policies) - 1) / 2) * width
        label = f"AQN {'on' if policy == 'aqn_on' else 'off'} ({ARM_LABELS[arm]})"
        rewards = [quant[policy][f]["reward"] for f in QUANT_FORMATS]
        reward.bar([x + offset for x in range(len(QUANT_FORMATS))], rewards, width, color=ARM_COLOURS[arm], label=label)
        kls = [quant[policy][f]["kl"] for f in QUANT_FORMATS[1:]]
        drift.bar([x + offset for x in range(len(kls))], kls, width, color=ARM_COLOURS[arm], label=label)
    reward.set_xticks(range(len(QUANT_FORMATS)), QUANT_FORMATS)
    reward.set_ylim(0, 1.02)
    reward.set_title(f"greedy reward after fake quantization ({quant['prompts']} held-out)", fontsize=10)
    drift.set_xticks(range(len(QUANT_FORMATS) - 1), QUANT_FORMATS[1:])
    drift.set_title("KL(unquantized || quantized) per token", fontsize=10)
    for ax in (greedy, reward, drift):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "quant_eval.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
