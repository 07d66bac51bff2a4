"""Figures of evaluation results: confusion matrices, the benchmark's trade-off and per-class plots (matplotlib, drawn
off-screen)."""

from pathlib import Path

import numpy as np
import torch


def confusion_figure(confusion: torch.Tensor, labels: list[str], title: str = ""):
    """A matplotlib figure of a (C, C) confusion matrix: colour by row percentage, each cell showing
    its count and row percentage (rows: true class, columns: predicted class)."""
    import matplotlib

    matplotlib.use("Agg")  # render off-screen; training machines have no display
    import matplotlib.pyplot as plt

    counts = confusion.double()
    percent = 100 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(percent.numpy(), cmap="Blues", vmin=0, vmax=100)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(counts[i, j])}\n{percent[i, j]:.1f}%", ha="center", va="center", fontsize=8,
                    color="white" if percent[i, j] > 50 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def close_figure(fig) -> None:
    import matplotlib.pyplot as plt  # imported once a figure exists, after the off-screen backend is chosen

    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # off-screen
    import matplotlib.pyplot as plt

    return plt


def tradeoff_plot(rows: list[dict], out: Path) -> None:
    """Macro F1 (bar: 95% interval) against latency (bar: least to greatest round median) and size."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "latency_ms_median", "latency per text, batch 1 (ms; bar: rounds min-max)"),
                           (axes[1], "size_mb", "size on disk (MB)")):
        for row in rows:
            yerr = [[row["macro_f1"] - row["macro_f1_low"]], [row["macro_f1_high"] - row["macro_f1"]]]
            xerr = ([[row[key] - row["latency_ms_min"]], [row["latency_ms_max"] - row[key]]]
                    if key == "latency_ms_median" else None)
            ax.errorbar(row[key], row["macro_f1"], yerr=yerr, xerr=xerr, fmt="o", capsize=3)
            ax.annotate(row["model"], (row[key], row["macro_f1"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel("macro F1 (bar: 95% bootstrap interval)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    close_figure(fig)


def per_class_plot(per_class: list[dict], out: Path) -> None:
    """Per-class F1 of every model side by side, each bar with its 95% bootstrap interval."""
    models = list(dict.fromkeys(r["model"] for r in per_class))
    labels = list(dict.fromkeys(r["class"] for r in per_class))
    fig, ax = pyplot().subplots(figsize=(max(6.0, 1.2 * len(labels) * max(1, len(models) / 3)), 4.5))
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        rows = [r for r in per_class if r["model"] == model]
        # an absent class (None) is NaN: no bar
        f1, low, high = (np.array([r[key] for r in rows], dtype=float) for key in ("f1", "f1_low", "f1_high"))
        errors = [f1 - low, high - f1]
        ax.bar(np.arange(len(labels)) + (m - (len(models) - 1) / 2) * width, f1, width, yerr=errors, capsize=2,
               label=model)
    absent = {r["class"] for r in per_class if not r["support"]}
    ax.set_xticks(range(len(labels)), [f"{label}\n(absent)" if label in absent else label for label in labels])
    ax.set_ylabel("F1 (bar: 95% bootstrap interval)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    close_figure(fig)
