"""Figures of evaluation results: confusion matrices, and the benchmark's figures of differences to the baseline (the
trade-off against latency and size, the per-class heatmap); matplotlib, drawn off-screen."""

import itertools
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


# significant worse / better / not significant / no interval saved: one glance tells which differences are real
_WORSE, _BETTER, _SAME = "#c0392b", "#2166ac", "#7f7f7f"


def _points(value) -> float:
    """A difference of a 0-1 metric in points (x 100); None (an absent class, an old report) is NaN."""
    return np.nan if value is None else 100 * float(value)


def _significance(low, high) -> int | None:
    """-1 / +1 where the interval lies below / above 0, 0 where it holds 0, None where there is no interval."""
    if low is None or high is None or np.isnan(low) or np.isnan(high):
        return None
    return -1 if high < 0 else 1 if low > 0 else 0


def difference_rows(rows: list[dict], baseline: str | None = None) -> list[dict]:
    """Each row's macro-F1 difference to the baseline in points (``diff``, ``low``, ``high``; NaN where the row has
    no paired interval, as in reports written before intervals existed) and ``sig`` (``_significance``).
    ``baseline``: the row that is 0; default the first."""
    baseline = baseline or rows[0]["model"]
    base_f1 = next(r for r in rows if r["model"] == baseline)["macro_f1"]
    out = []
    for row in rows:
        is_base = row["model"] == baseline
        diff = row.get("macro_f1_diff")
        low, high = (None, None) if is_base else (row.get("macro_f1_diff_low"), row.get("macro_f1_diff_high"))
        out.append({"model": row["model"], "baseline": is_base,
                    "diff": _points(row["macro_f1"] - base_f1 if diff is None else diff),
                    "low": _points(low), "high": _points(high), "sig": None if is_base else _significance(low, high)})
    return out


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal x and higher or equal y, one strictly), by x.

    >>> pareto_front([1, 2, 3, 4], [0.5, 0.4, 0.9, 0.9])
    [0, 2]
    """
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], -np.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


def place_labels(ax, xy: list[tuple[float, float]], labels: list[str], renderer) -> list:
    """Write each label beside its point where its box overlaps no label placed before, no other point's marker
    and stays inside the axes: the first free spot on rings of growing radius around the point, with a leader
    line once it is away from it. Returns the text artists (gid ``point-label``)."""
    markers = [ax.transData.transform(p) for p in xy]
    marker_boxes = [_bbox(x - 4, y - 4, x + 4, y + 4) for x, y in markers]
    inside, placed, texts = ax.get_window_extent(renderer), [], []
    spots = list(itertools.product((7, 12, 18, 26, 36, 48, 62, 80), np.deg2rad([45, 135, -45, -135, 0, 180, 90, -90])))
    for i, (point, label) in enumerate(zip(xy, labels, strict=True)):
        others = marker_boxes[:i] + marker_boxes[i + 1:]
        text = None
        for radius, angle in spots:  # where no spot is free, the last one tried stays
            dx, dy = radius * np.cos(angle), radius * np.sin(angle)
            if text is not None:
                text.remove()
            text = ax.annotate(label, point, xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                               fontweight="bold", ha="left" if dx > 1 else "right" if dx < -1 else "center",
                               va="bottom" if dy > 1 else "top" if dy < -1 else "center", gid="point-label",
                               arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if radius > 12 else None)
            box = text.get_window_extent(renderer).expanded(1.1, 1.15)  # a little air around each number
            inside_axes = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if inside_axes and not _overlaps(box, placed) and not _overlaps(box, others):
                break
        placed.append(box)
        texts.append(text)
    return texts


def _bbox(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def _log_axis(ax) -> None:
    """A log x axis labelled 1, 2, 5, 10, 20, ... in plain numbers (matplotlib's 2x10^1 labels collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def tradeoff_figure(rows: list[dict], baseline: str | None = None, latency_budget_ms: float | None = None,
                    size_budget_mb: float | None = None, title: str = ""):
    """Macro-F1 difference to the baseline (points, bar: its 95% paired-bootstrap interval) against latency and
    against size, both on log axes: each model a numbered marker, coloured by whether its interval excludes 0,
    the Pareto front (faster or smaller and no worse) as a dashed staircase, a budget as a vertical line, and a key
    of numbers, names and differences on the right."""
    plt = pyplot()
    diffs = difference_rows(rows, baseline)
    n = len(rows)
    fig = plt.figure(figsize=(14, max(4.8, 0.24 * n + 1.6)))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.7])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    key_ax = fig.add_subplot(grid[0, 2])
    panels = (("latency_ms_median", "latency per text, batch 1 (ms, log; bar: rounds min-max)", latency_budget_ms),
              ("size_mb", "size on disk (MB, log)", size_budget_mb))
    colours = [{-1: _WORSE, 1: _BETTER, 0: _SAME, None: _SAME}[d["sig"]] for d in diffs]
    for ax, (key, xlabel, budget) in zip(axes, panels, strict=True):
        xs = [float(r[key]) for r in rows]
        ys = [d["diff"] for d in diffs]
        ax.axhline(0, color="black", lw=0.8)
        for x, d, row, colour in zip(xs, diffs, rows, colours, strict=True):
            yerr = None if np.isnan(d["low"]) else [[d["diff"] - d["low"]], [d["high"] - d["diff"]]]
            xerr = ([[x - row["latency_ms_min"]], [row["latency_ms_max"] - x]]
                    if key == "latency_ms_median" and row.get("latency_ms_min") is not None else None)
            ax.errorbar(x, d["diff"], yerr=yerr, xerr=xerr, fmt="*" if d["baseline"] else "o", color=colour,
                        ms=11 if d["baseline"] else 6, mfc=colour if d["sig"] is not None or d["baseline"] else "white",
                        ecolor=colour, elinewidth=1, capsize=2, zorder=3)
        front = pareto_front(xs, ys)
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", ls="--", color="#2ca02c", lw=1.2,
                label="Pareto front", zorder=2)
        if budget is not None:
            unit = "ms" if key == "latency_ms_median" else "MB"
            ax.axvline(budget, color="#ff7f0e", lw=1.2, label=f"budget {budget:g} {unit}")
        _log_axis(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Δ macro F1 vs baseline (points; bar: 95% paired interval)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
        ax.margins(x=0.15, y=0.15)
        ax.set_xlim(ax.get_xlim())  # frozen: the labels are placed in display space around the final limits
        ax.set_ylim(ax.get_ylim())
    key_ax.axis("off")
    lines = [f"{i + 1:>2}  {d['model']}" + ("  (baseline)" if d["baseline"] else f"  {d['diff']:+.2f}" + (
        "" if np.isnan(d["low"]) else f" [{d['low']:+.2f}, {d['high']:+.2f}]" + ("*" if d["sig"] else "")))
        for i, d in enumerate(diffs)]
    for i, (line, colour) in enumerate(zip(lines, colours, strict=True)):
        key_ax.text(0, 1 - i / max(n, 18), line, transform=key_ax.transAxes, fontsize=7.5, family="monospace",
                    va="top", color=colour if not diffs[i]["baseline"] else "black")
    key_ax.text(0, -0.02, "Δ in points, [95% paired bootstrap interval]; * / filled: interval excludes 0\n"
                "red: worse, blue: better, grey: not significant; hollow: no interval saved",
                transform=key_ax.transAxes, fontsize=7, va="top", color="0.3")
    fig.suptitle(title or "Difference to the baseline against cost", fontsize=11)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    for ax, (key, _, _) in zip(axes, panels, strict=True):
        place_labels(ax, [(float(r[key]), d["diff"]) for r, d in zip(rows, diffs, strict=True)],
                     [str(i + 1) for i in range(n)], renderer)
    return fig


def tradeoff_plot(rows: list[dict], out: Path, baseline: str | None = None, latency_budget_ms: float | None = None,
                  size_budget_mb: float | None = None, title: str = "") -> None:
    """``tradeoff_figure`` saved to ``out`` (PNG)."""
    fig = tradeoff_figure(rows, baseline, latency_budget_ms, size_budget_mb, title)
    fig.savefig(out, dpi=100, bbox_inches="tight")  # tight: a long name in the key stays in the picture
    close_figure(fig)


def class_difference_figure(per_class: list[dict], baseline: str | None = None, title: str = ""):
    """Models x classes heatmap of each model's per-class F1 change to the baseline (points), written in each cell,
    on a diverging colour map centred on 0 (red: worse, blue: better); a cell whose paired 95% interval
    (``f1_change_low``/``_high``) excludes 0 is framed and starred. The baseline's own row (all 0) is left out."""
    from matplotlib.colors import CenteredNorm
    from matplotlib.patches import Rectangle

    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in per_class))
    baseline = baseline or models[0]
    models = [m for m in models if m != baseline] or models
    labels = list(dict.fromkeys(r["class"] for r in per_class))
    cell = {(r["model"], r["class"]): r for r in per_class}
    values = np.array([[_points(cell[m, c]["f1_change"]) for c in labels] for m in models])
    sig = [[_significance(cell[m, c].get("f1_change_low"), cell[m, c].get("f1_change_high")) for c in labels]
           for m in models]
    half = max(0.5, float(np.nanmax(np.abs(values))) if not np.isnan(values).all() else 0.5)
    name_width = max(len(m) for m in models) * 0.065
    fig, ax = plt.subplots(figsize=(name_width + 0.95 * len(labels) + 2.2, 0.34 * len(models) + 2.0))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=plt.get_cmap("RdBu").with_extremes(bad="0.85"),
                      norm=CenteredNorm(vcenter=0, halfrange=half), aspect="auto")
    for i in range(len(models)):
        for j in range(len(labels)):
            if np.isnan(values[i, j]):
                ax.text(j, i, "absent", ha="center", va="center", fontsize=7, color="0.4")
                continue
            marked = bool(sig[i][j])
            ax.text(j, i, f"{values[i, j]:+.1f}" + ("*" if marked else ""), ha="center", va="center", fontsize=8,
                    fontweight="bold" if marked else "normal",
                    color="white" if abs(values[i, j]) > 0.6 * half else "black")
            if marked:
                ax.add_patch(Rectangle((j - 0.48, i - 0.46), 0.96, 0.92, fill=False, lw=1.4, ec="black",
                                       gid="significant"))
    support = {r["class"]: r.get("support") for r in per_class}
    ax.set_xticks(range(len(labels)), [f"{c}\n(n={support[c]})" if support[c] is not None else c for c in labels],
                  fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_xticks(np.arange(len(labels) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(models) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="Δ F1 vs baseline (points)")
    has_intervals = any(s is not None for row in sig for s in row)
    note = ("*, framed: the 95% paired bootstrap interval excludes 0" if has_intervals else
            "no per-class paired intervals saved with this report: significance not marked")
    ax.set_xlabel(f"per-class F1 change vs {baseline}, in points; {note}", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_class_plot(per_class: list[dict], out: Path, baseline: str | None = None, title: str = "") -> None:
    """``class_difference_figure`` saved to ``out`` (PNG)."""
    fig = class_difference_figure(per_class, baseline, title)
    fig.savefig(out, dpi=100)
    close_figure(fig)
