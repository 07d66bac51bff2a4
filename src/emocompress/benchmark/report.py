"""Writing a benchmark report folder: CSV and Markdown tables, figures, the environment, predictions."""

import csv
import fnmatch
import hashlib
import os
import platform
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

import torch

from emocompress.benchmark.compare import fastest
from emocompress.benchmark.html import write_html_report
from emocompress.deploy.format import DEFAULT_MAX_LENGTH
from emocompress.evaluation.plots import close_figure, confusion_figure, per_class_plot, tradeoff_plot
from emocompress.evaluation.significance import SCALARS
from emocompress.hardware import cpu_info
from emocompress.io import check_can_create, check_not_cwd, json_text

# Every entry a report folder may hold (shell patterns). A non-empty --out_dir with anything else in it is not a
# report of ours and is never replaced: pointed at reports/ or logs/, a replace would erase committed results.
_REPORT_ENTRIES = ("model_comparison.csv", "model_comparison.md", "per_class.csv", "per_class.md", "confusion_*.png",
                   "tradeoff.png", "per_class_f1.png", "environment.json", "reports.json", "predictions.json",
                   "pairs.csv", "pairs.md", "tensorboard", "report.html", "fastest.json",
                   "README.md")  # the study's write-up (reports/<study>/README.md): kept across a re-run


_COLUMNS = ["model", "runs", "params", "nonzero_params", "sparsity", "size_mb", "gzip_mb",
            "latency_ms_median", "latency_ms_min", "latency_ms_max", "latency_ms_p90",
            "throughput_per_s", "throughput_min_per_s", "throughput_max_per_s", "padded_tokens_per_text", "max_length",
            "energy_kwh_per_1k", "energy_kwh_per_1k_batch1", "energy_method",
            *(f"{key}{suffix}" for key in SCALARS for suffix in ("", "_std", "_low", "_high")),
            "macro_f1_diff", "macro_f1_diff_low", "macro_f1_diff_high", "macro_f1_diff_p",
            "mcnemar_only_model_correct", "mcnemar_only_base_correct", "mcnemar_p",
            "speedup", "compression", "gzip_compression"]


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` that a report may not replace: a file, a non-empty folder holding anything a
    report does not write (``_REPORT_ENTRIES``), the current directory or a folder above it, or one that cannot be
    made (``check_can_create``).

    Raises:
        ValueError: naming the folder, a few foreign entries and the fix.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"benchmark: --out_dir {out_dir} is a file, not a report folder; choose a new --out_dir")
    try:
        check_not_cwd(out_dir)
        check_can_create(out_dir)  # a file above it: found before measuring, not when the report is written
    except ValueError as err:
        raise ValueError(f"benchmark: --out_dir {err}") from err
    if not out_dir.is_dir():
        return
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in _REPORT_ENTRIES))
    if foreign:
        raise ValueError(f"benchmark: --out_dir {out_dir} holds files no report writes ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}), so it is not a previous report and will not be "
                         "replaced; choose a new --out_dir (a report replaces only an earlier report)")


def environment_info(num_threads: int, settings: dict) -> dict:
    import transformers

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {**cpu_info(), "cores": os.cpu_count(), "threads": num_threads, "torch": torch.__version__,
            "onnxruntime": ort_version, "transformers": transformers.__version__,
            "python": platform.python_version(), **settings,
            "sequence_length": "each text tokenized to at most the max_length its model was trained with (checkpoints, "
                               f"hf_model exports) or is served with (artifact folders), {DEFAULT_MAX_LENGTH} where "
                               "none is recorded (older hf_model exports): the max_length column; batch 1 unpadded, "
                               "batches of texts of similar length (sorted by token count), padded to their longest"}


def invoking_command() -> str:
    """This process's command line, its program shortened to ``emocompress`` when it is the CLI (the console
    script, ``python -m emocompress.cli`` or ``python -m emocompress``), for the report's ``environment.json``."""
    program = Path(sys.argv[0]).name
    program = "emocompress" if program in ("emocompress", "cli.py", "__main__.py") else sys.argv[0]
    return shlex.join([program, *sys.argv[1:]])


def _slug(name: str) -> str:
    """A file-name-safe version of a display name.

    >>> _slug("pruned 50% + INT8 (onnxruntime)")
    'pruned_50_INT8_onnxruntime'
    """
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _file_stems(names: list[str]) -> dict[str, str]:
    """A distinct file-name-safe stem for each display name: its ``_slug``, and where two names share a slug
    (``a/b`` and ``a b``, or ``A`` and ``a`` on a case-insensitive disk) a hash of the name after it, so
    neither figure overwrites the other.

    >>> _file_stems(["a/b", "a b", "fp32", "!"])
    {'a/b': 'a_b-3ec69c85', 'a b': 'a_b-7dbde935', 'fp32': 'fp32', '!': 'model'}
    """
    slugs = {name: _slug(name) or "model" for name in names}
    shared = Counter(slug.casefold() for slug in slugs.values())
    return {name: slug if shared[slug.casefold()] == 1 else f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
            for name, slug in slugs.items()}


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _estimate(row: dict, key: str) -> str:
    """``mean ± std [low, high]`` (``± std`` only for several runs)."""
    std = f" ± {row[f'{key}_std']:.4f}" if row.get(f"{key}_std") is not None else ""
    return f"{row[key]:.4f}{std} [{row[f'{key}_low']:.4f}, {row[f'{key}_high']:.4f}]"


def _difference_cell(row: dict) -> str:
    """``+0.0123 [+0.0010, +0.0240] *``: the macro-F1 difference, its 95% interval, ``*`` if that excludes 0."""
    low, high = row["macro_f1_diff_low"], row["macro_f1_diff_high"]
    return f"{row['macro_f1_diff']:+.4f} [{low:+.4f}, {high:+.4f}]" + (" *" if low > 0 or high < 0 else "")


def _padding_and_energy_cells(row: dict) -> dict:
    """The padding of the throughput batches and the energy (labelled with its kind) of ``model_comparison.md``;
    none where the row has none (a benchmark without energy, rows made elsewhere)."""
    cells = {}
    if row.get("padded_tokens_per_text") is not None:
        cells["padding tokens/text"] = f"{row['padded_tokens_per_text']:.1f}"
    if row.get("energy_kwh_per_1k") is not None:
        cells["kWh / 1,000 texts, batched (batch 1)"] = (f"{row['energy_kwh_per_1k']:.2e} "
                                                         f"({row['energy_kwh_per_1k_batch1']:.2e}) {row['energy_method']}")
    return cells


def _comparison_markdown(rows: list[dict], baseline: str) -> str:
    """``model_comparison.md``: estimates with their intervals in one cell each; ``*`` marks a macro-F1 difference
    whose 95% interval excludes 0."""
    table = []
    for row in rows:
        table.append({
            "model": row["model"], "runs": row["runs"],
            "params (non-zero)": f"{row['params']:,} ({row['nonzero_params']:,})",
            "size MB (gzip)": f"{row['size_mb']:.2f} ({row['gzip_mb']:.2f})",
            "latency ms, median [rounds min, max]": f"{row['latency_ms_median']:.2f} [{row['latency_ms_min']:.2f}, "
                                                    f"{row['latency_ms_max']:.2f}]",
            "p90 ms": f"{row['latency_ms_p90']:.2f}",
            "texts/s [min, max]": f"{row['throughput_per_s']:.1f} [{row['throughput_min_per_s']:.1f}, "
                                  f"{row['throughput_max_per_s']:.1f}]",
            **_padding_and_energy_cells(row),
            **{key: _estimate(row, key) for key in SCALARS},
            f"macro F1 - {baseline} [95% CI]": "" if row["model"] == baseline else _difference_cell(row),
            "p (bootstrap)": "" if row["model"] == baseline else f"{row['macro_f1_diff_p']:.3f}",
            "McNemar p (only model / only base right)": "" if row["model"] == baseline else
            f"{row['mcnemar_p']:.3f} ({row['mcnemar_only_model_correct']}/{row['mcnemar_only_base_correct']})",
            "speedup": f"{row['speedup']:.2f}", "compression (gzip)": f"{row['compression']:.2f} "
                                                                      f"({row['gzip_compression']:.2f})"})
    note = (f"\nMetrics: mean over runs (± std over runs when there are several) [95% paired-bootstrap interval]. "
            f"`*`: the 95% interval of the macro-F1 difference to {baseline} excludes 0.\n")
    return markdown_table(table, list(table[0])) + note


def _pairs_markdown(pair_rows: list[dict]) -> str:
    """``pairs.md``: each (model, reference) pair's macro-F1 difference; ``*`` where its 95% interval excludes 0."""
    table = [{"model": row["model"], "reference": row["reference"],
              "macro F1 difference [95% CI]": _difference_cell(row),
              "p (bootstrap)": f"{row['macro_f1_diff_p']:.3f}",
              "McNemar p (only model / only reference right)":
                  f"{row['mcnemar_p']:.3f} ({row['mcnemar_only_model_correct']}/{row['mcnemar_only_base_correct']})"}
             for row in pair_rows]
    return markdown_table(table, list(table[0])) + ("\nDifference of the seed means, paired over the same bootstrap "
                                               "resamples; McNemar on the first runs. `*`: the 95% interval excludes 0.\n")


def fastest_picks(rows: list[dict], baseline: str, environment: dict) -> dict | None:
    """``compare.fastest`` of a report's rows at its throughput batch size (``environment.json``'s); None for a
    report without a recorded batch size or measured before the paired intervals (no honest pick there)."""
    if not environment.get("batch_size") or any(r.get("macro_f1_diff_high") is None for r in rows):
        return None
    picks = fastest(rows, baseline, environment["batch_size"])
    return picks if picks["by_batch_size"] else None  # rows without timing (hand-made, or a partial old report)


def fastest_lines(picks: dict) -> list[str]:
    """One line per batch size, then the fastest overall: what the run prints and ``model_comparison.md`` lists.

    >>> pick = {"batch_size": 1, "model": "int8", "measure": "latency_ms_median", "value": 2.1, "texts_per_s": 476.2,
    ...         "speedup": 3.4, "macro_f1_diff": -0.002, "macro_f1_diff_low": -0.006, "macro_f1_diff_high": 0.001}
    >>> print(*fastest_lines({"baseline": "fp32", "by_batch_size": [pick], "overall": pick}), sep="\\n")
    batch 1: int8 2.10 ms (3.4x the baseline), macro F1 -0.2 [-0.6, +0.1] points
    fastest overall: int8 at batch 1, 476.2 texts/s
    """
    lines = []
    for p in picks["by_batch_size"]:
        speed = f"{p['value']:.2f} ms" if p["measure"] == "latency_ms_median" else f"{p['value']:.1f} texts/s"
        if p["model"] == picks["baseline"]:
            lines.append(f"batch {p['batch_size']}: {p['model']} {speed} (the baseline)")
        else:
            lines.append(f"batch {p['batch_size']}: {p['model']} {speed} ({p['speedup']:.1f}x the baseline), macro F1 "
                         f"{100 * p['macro_f1_diff']:+.1f} [{100 * p['macro_f1_diff_low']:+.1f}, "
                         f"{100 * p['macro_f1_diff_high']:+.1f}] points")
    if overall := picks["overall"]:
        lines.append(f"fastest overall: {overall['model']} at batch {overall['batch_size']}, "
                     f"{overall['texts_per_s']:.1f} texts/s")
    return lines


def _fastest_note(picks: dict) -> str:
    excluded = f" Left out as significantly worse: {', '.join(picks['excluded'])}." if picks["excluded"] else ""
    return (f"Fastest: at each batch size, the fastest model whose macro F1 is not significantly worse than "
            f"{picks['baseline']}'s (the baseline, or the 95% paired interval of the difference reaches 0); "
            f"differences in points. Speed is model time (tokenization excluded).{excluded}")


def _fastest_markdown(picks: dict) -> str:
    """The "Fastest" section of ``model_comparison.md``."""
    return (f"\n## Fastest\n\n{_fastest_note(picks)}\n\n" + "".join(f"- {line}\n" for line in fastest_lines(picks)))


def _page_fastest_rows(picks: dict) -> list[dict]:
    """The "Fastest" table of ``report.html`` (differences in points, as in the comparison table)."""
    return [{"batch size": p["batch_size"], "model": p["model"],
             "latency ms": p["value"] if p["measure"] == "latency_ms_median" else None, "texts/s": p["texts_per_s"],
             "x baseline": p["speedup"],
             **{f"Δ macro F1 (points){suffix}": 100 * p[f"macro_f1_diff{suffix}"] for suffix in ("", "_low", "_high")}}
            for p in picks["by_batch_size"]]


def _page_rows(rows: list[dict], baseline: str) -> list[dict]:
    """The comparison table of ``report.html``: the CSV's rows renamed for a reader, intervals as ``_low``/``_high``
    companions (``html.py``), differences in points (x 100) as in the figures."""
    page = []
    for r in rows:
        g, base = r.get, r["model"] == baseline
        points = {k: None if base or g(k) is None else 100 * g(k) for k in ("macro_f1_diff", "macro_f1_diff_low",
                                                                             "macro_f1_diff_high")}
        page.append({"model": r["model"], "runs": g("runs"), "size MB": g("size_mb"), "gzip MB": g("gzip_mb"),
                     "latency ms": g("latency_ms_median"), "latency ms_low": g("latency_ms_min"),
                     "latency ms_high": g("latency_ms_max"), "p90 ms": g("latency_ms_p90"),
                     "texts/s": g("throughput_per_s"), "texts/s_low": g("throughput_min_per_s"),
                     "texts/s_high": g("throughput_max_per_s"),
                     **{f"macro F1{suffix}": g(f"macro_f1{suffix}") for suffix in ("", "_std", "_low", "_high")},
                     "Δ macro F1 (points)": points["macro_f1_diff"],
                     "Δ macro F1 (points)_low": points["macro_f1_diff_low"],
                     "Δ macro F1 (points)_high": points["macro_f1_diff_high"],
                     "p (bootstrap)": None if base else g("macro_f1_diff_p"),
                     "McNemar p": None if base else g("mcnemar_p"),
                     "balanced accuracy": g("balanced_accuracy"), "kappa": g("cohen_kappa"), "accuracy": g("accuracy"),
                     "speedup": g("speedup"), "compression": g("compression"), "params": g("params"),
                     "non-zero params": g("nonzero_params")})
    return page


def _page_class_rows(per_class: list[dict]) -> list[dict]:
    """The per-class table of ``report.html`` (changes in points)."""
    def points(value):
        return None if value is None else 100 * value

    return [{"model": r["model"], "class": r["class"], "support": r["support"],
             **{f"F1{suffix}": r.get(f"f1{suffix}") for suffix in ("", "_std", "_low", "_high")},
             **{f"Δ F1 (points){suffix}": points(r.get(f"f1_change{suffix}")) for suffix in ("", "_low", "_high")},
             "p (bootstrap)": r.get("f1_change_p"), "accuracy": r["accuracy"],
             "Δ accuracy (points)": points(r["accuracy_change"])} for r in per_class]


def write_figures_and_page(out: Path, rows: list[dict], per_class: list[dict], reports: dict[str, dict],
                           environment: dict, baseline: str, title: str) -> Path:
    """``tradeoff.png``, ``per_class_f1.png`` and ``report.html`` of a report in ``out``: what ``write_report``
    draws after measuring, and ``regenerate`` redraws from a saved report. Returns the page's path."""
    tradeoff_plot(rows, out / "tradeoff.png", baseline)
    per_class_plot(per_class, out / "per_class_f1.png", baseline)
    figures = [(f"Macro-F1 difference to {baseline} against latency and size (tradeoff.png)", out / "tradeoff.png"),
               (f"Per-class F1 change against {baseline} (per_class_f1.png)", out / "per_class_f1.png")]
    confusions = {name: {"labels": r["labels"], "matrix": r["confusion_matrix"]} for name, r in reports.items()}
    picks = fastest_picks(rows, baseline, environment)
    return write_html_report(out, title, _page_rows(rows, baseline), figures,
                             {k: v for k, v in environment.items() if k != "command"}, environment.get("command", ""),
                             _page_class_rows(per_class), confusions,
                             notes=f"{_fastest_note(picks)} {fastest_lines(picks)[-1]}." if picks else "",
                             tables=[("Fastest", _page_fastest_rows(picks))] if picks else [])


def write_report(out: Path, rows: list[dict], per_class: list[dict], reports: dict[str, dict], predictions: dict,
                 split: str, baseline: str, environment: dict, tensorboard: bool, pair_rows: list[dict] = (),
                 page_title: str = "Benchmark report") -> dict | None:
    """Write the report's files (see ``benchmark``'s ``out_dir``) into the folder ``out``; returns the fastest picks
    (``fastest_picks``, also in ``fastest.json`` and ``model_comparison.md``), None where there are none."""
    tables = [("model_comparison", rows, _COLUMNS), ("per_class", per_class, list(per_class[0]))]
    if pair_rows:
        tables.append(("pairs", pair_rows, list(pair_rows[0])))
        (out / "pairs.md").write_text(_pairs_markdown(pair_rows))
    for stem, table, columns in tables:
        with (out / f"{stem}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)
    picks = fastest_picks(rows, baseline, environment)
    (out / "model_comparison.md").write_text(_comparison_markdown(rows, baseline)
                                             + (_fastest_markdown(picks) if picks else ""))
    if picks:
        (out / "fastest.json").write_text(json_text(picks))
    absent = next(iter(reports.values()))["absent_classes"]  # the split's: the same for every variant
    note = (f"\nAbsent from the {split} split (support 0, so no F1 or accuracy; empty cells): "
            f"{', '.join(absent)}. Macro F1 averages the classes in the split or predicted.\n" if absent else "")
    (out / "per_class.md").write_text(markdown_table(per_class, list(per_class[0])) + note)
    stems = _file_stems(list(reports))
    for name, report in reports.items():
        runs = len(report["runs"])
        title = f"{name} ({split}{f', {runs} runs summed' if runs > 1 else ''})"
        fig = confusion_figure(torch.tensor(report["confusion_matrix"]), report["labels"], title)
        report["confusion_figure"] = f"confusion_{stems[name]}.png"  # in reports.json: which figure is whose
        fig.savefig(out / report["confusion_figure"], dpi=120)
        close_figure(fig)
    write_figures_and_page(out, rows, per_class, reports, environment, baseline, page_title)
    (out / "environment.json").write_text(json_text(environment))
    (out / "reports.json").write_text(json_text(reports))  # NaN -> null
    (out / "predictions.json").write_text(json_text(predictions, indent=None))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(out / "tensorboard") as writer:
            for step, row in enumerate(rows):
                for key in ("macro_f1", "latency_ms_median", "size_mb"):
                    writer.add_scalar(f"bench/{key}", row[key], step)
    return picks
