"""Redraw saved benchmark reports' figures and page from their files, measuring nothing again:

    python -m emocompress.benchmark.regenerate reports/benchmark_structured_targets [more report folders]

Reads ``model_comparison.csv``, ``per_class.csv``, ``reports.json``, ``environment.json`` and, where it was kept,
``predictions.json`` (per-class paired intervals for reports written before the benchmark saved them); rewrites
``tradeoff.png``, ``per_class_f1.png`` and ``report.html``. The tables, numbers and confusion figures stay as they are.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from emocompress.benchmark.report import write_figures_and_page
from emocompress.evaluation.significance import class_differences_from_predictions

_TEXT_COLUMNS = ("model", "class", "reference")


def read_rows(path: Path) -> list[dict]:
    """A report's CSV as dicts of numbers: empty cells None, ints and floats parsed, names kept as text."""
    def value(key: str, text: str):
        if key in _TEXT_COLUMNS or text == "":
            return text if key in _TEXT_COLUMNS else None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with path.open(newline="") as f:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _add_class_intervals(per_class: list[dict], predictions: dict, baseline: str, environment: dict) -> None:
    """Fill ``f1_change_low``/``_high``/``_p`` of ``per_class`` from saved predictions, on the report's own bootstrap
    settings (same resamples as its other intervals)."""
    labels = predictions["labels"]
    preds = {name: [np.array(run) for run in runs] for name, runs in predictions["predictions"].items()}
    diffs = class_differences_from_predictions(np.array(predictions["target"]), preds, baseline, len(labels),
                                               environment.get("bootstrap", 1000), environment.get("bootstrap_seed", 0))
    for row in per_class:
        diff = diffs[row["model"]][labels.index(row["class"])]
        row |= {f"f1_change_{k}": diff[k] if row["support"] else None for k in ("low", "high", "p")}


def recorded_command(folder: Path, environment: dict) -> str:
    """The command in ``environment.json``; for a report written before it was recorded, the benchmark config whose
    ``out_dir`` is this folder (``configs/benchmark/`` beside ``reports/``), marked as such."""
    if environment.get("command"):
        return environment["command"]
    configs = folder.resolve().parent.parent / "configs" / "benchmark"
    for config in sorted(configs.glob("*.yaml")):
        out_dir = (yaml.safe_load(config.read_text()) or {}).get("out_dir")
        if out_dir and Path(out_dir).name == folder.resolve().name:
            return (f"emocompress benchmark -c configs/benchmark/defaults.yaml -c configs/benchmark/{config.name}"
                    "  # its config (the command itself was not recorded in this report)")
    return ""


def regenerate(folder: str | Path) -> Path:
    """Redraw one report folder (see the module docstring); returns the page's path.

    Raises:
        ValueError: naming a missing file of the folder.
    """
    folder = Path(folder)
    for name in ("model_comparison.csv", "per_class.csv", "reports.json"):
        if not (folder / name).is_file():
            raise ValueError(f"regenerate: {folder / name} is missing; give a folder written by emocompress benchmark")
    rows = read_rows(folder / "model_comparison.csv")
    per_class = read_rows(folder / "per_class.csv")
    reports = json.loads((folder / "reports.json").read_text())
    environment = json.loads(env.read_text()) if (env := folder / "environment.json").is_file() else {}
    baseline = environment.get("baseline") or rows[0]["model"]
    if "f1_change_low" not in per_class[0] and (folder / "predictions.json").is_file():
        _add_class_intervals(per_class, json.loads((folder / "predictions.json").read_text()), baseline, environment)
    environment["command"] = recorded_command(folder, environment)
    return write_figures_and_page(folder, rows, per_class, reports, environment, baseline,
                                  f"Benchmark report: {folder.resolve().name}")


def main(argv: list[str] | None = None) -> int:
    folders = sys.argv[1:] if argv is None else argv
    if not folders:
        print("usage: python -m emocompress.benchmark.regenerate REPORT_FOLDER [...]", file=sys.stderr)
        return 2
    for folder in folders:
        try:
            print(regenerate(folder))
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
