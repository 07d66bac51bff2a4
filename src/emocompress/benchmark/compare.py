"""Comparing variants: metrics with intervals, paired differences to the baseline, McNemar tests, per class."""


import numpy as np

from emocompress.benchmark.variants import Variant
from emocompress.evaluation.significance import (
    SCALARS,
    bootstrap_indices,
    mcnemar_exact,
    paired_class_differences,
    paired_difference,
    percentile_interval,
    resampled_metrics,
)


def _std(values: list[float]) -> float | None:
    """Sample standard deviation over runs; None (an empty cell) for a single run."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def compare(variants: list[Variant], timing: dict[str, dict], baseline: str, bootstrap: int, seed: int,
            pairs: list[tuple[str, str]] = ()) -> tuple[list[dict], list[dict], dict[str, dict], list[dict]]:
    """The comparison rows, the per-class rows, each variant's report (``reports.json``) and the rows of ``pairs``
    (model, reference): the same difference and tests as against the baseline, for other pairs of rows.

    Metrics are the mean over a variant's runs, with their standard deviation over runs (``_std``) and a 95%
    paired-bootstrap interval (``_low``/``_high``): ``bootstrap`` resamples of the split's texts, drawn once
    with ``seed`` and shared by every variant and run; on each resample a variant's value is the mean over its
    runs. Against the baseline row: the macro-F1 difference with its paired interval and bootstrap p-value
    (``significance.paired_difference``), and the exact McNemar test on per-text correctness of the first
    runs (``significance.mcnemar_exact``).
    """
    by_name = {v.name: v for v in variants}
    base = by_name[baseline]
    for v in variants:
        if v.id2label != base.id2label or not np.array_equal(v.target, base.target):
            raise ValueError(f"benchmark: {v.name!r} was tested on other labels or texts than the baseline "
                             f"{baseline!r} ({v.id2label} vs {base.id2label}); paired comparisons need the same")
    num_classes = len(base.id2label)
    idx = bootstrap_indices(len(base.target), bootstrap, seed)  # (R, N), shared: the comparisons are paired
    samples = {v.name: resampled_metrics(v.target, v.preds, num_classes, idx) for v in variants}
    rows, reports = [], {}
    for v in variants:
        row = {"model": v.name, "runs": len(v.paths), **v.static, **timing[v.name]}
        for key in SCALARS:
            values = [r[key] for r in v.reports]
            low, high = percentile_interval(samples[v.name][key])
            row |= {key: float(np.mean(values)), f"{key}_std": _std(values), f"{key}_low": low, f"{key}_high": high}
        rows.append(row | _difference(v, base, samples))
        reports[v.name] = _variant_report(v, row, samples[v.name]["f1_per_class"])
    base_row = next(r for r in rows if r["model"] == baseline)
    for row in rows:
        row["macro_f1_diff"] = row["macro_f1"] - base_row["macro_f1"]
        row["speedup"] = base_row["latency_ms_median"] / row["latency_ms_median"]
        row["compression"] = base_row["size_mb"] / row["size_mb"]
        row["gzip_compression"] = base_row["gzip_mb"] / row["gzip_mb"]
    means = {row["model"]: row["macro_f1"] for row in rows}
    pair_rows = [{"model": name, "reference": ref, "macro_f1_diff": means[name] - means[ref],
                  **_difference(by_name[name], by_name[ref], samples)} for name, ref in pairs]
    class_diffs = {name: paired_class_differences(s["f1_per_class"], samples[baseline]["f1_per_class"])
                   for name, s in samples.items()}
    return rows, _per_class_rows(reports, baseline, class_diffs), reports, pair_rows


def _difference(v: Variant, ref: Variant, samples: dict[str, dict]) -> dict:
    """Macro F1 of ``v`` against ``ref``: the paired-bootstrap interval and p-value of the difference of their
    seed means over the shared resamples, and the exact McNemar test on the first runs' per-text correctness."""
    diff = paired_difference(samples[v.name]["macro_f1"], samples[ref.name]["macro_f1"])
    mcnemar = mcnemar_exact(v.preds[0] == v.target, ref.preds[0] == ref.target)
    return {"macro_f1_diff_low": diff["low"], "macro_f1_diff_high": diff["high"], "macro_f1_diff_p": diff["p"],
            "mcnemar_only_model_correct": mcnemar["only_model_correct"],
            "mcnemar_only_base_correct": mcnemar["only_base_correct"], "mcnemar_p": mcnemar["p"]}


def _variant_report(v: Variant, row: dict, f1_samples: np.ndarray) -> dict:
    """A variant's entry of ``reports.json``: its row's metrics and intervals, per-class means over runs with
    their std and F1 interval (``f1_samples``: (R, C) resampled per-class F1), the confusion matrix summed over
    runs (one run: its own), and each run's own report."""
    f1_low, f1_high = percentile_interval(f1_samples)  # (C,) each
    report = {key: row[key] for key in SCALARS}
    report["intervals"] = {key: [row[f"{key}_low"], row[f"{key}_high"]] for key in SCALARS}
    report["per_class"] = {}
    for i, label in v.id2label.items():
        support = v.reports[0]["per_class"][label]["support"]  # the split's, shared by every run
        if not support:  # absent from the split: no F1 or accuracy (see metrics_report), empty cells
            report["per_class"][label] = dict.fromkeys(("f1", "f1_std", "f1_low", "f1_high", "accuracy",
                                                        "accuracy_std")) | {"support": 0}
            continue
        f1s = [r["per_class"][label]["f1"] for r in v.reports]
        accs = [r["per_class"][label]["accuracy"] for r in v.reports]
        report["per_class"][label] = {"f1": float(np.mean(f1s)), "f1_std": _std(f1s), "f1_low": float(f1_low[i]),
                                      "f1_high": float(f1_high[i]), "accuracy": float(np.mean(accs)),
                                      "accuracy_std": _std(accs), "support": support}
    report["absent_classes"] = v.reports[0]["absent_classes"]
    report["labels"] = v.reports[0]["labels"]
    report["confusion_matrix"] = np.sum([r["confusion_matrix"] for r in v.reports], axis=0).tolist()
    report["runs"] = v.reports
    return report


def _per_class_rows(reports: dict[str, dict], baseline: str, class_diffs: dict[str, list[dict]]) -> list[dict]:
    """One row per (model, class); ``f1_change_low``/``_high``/``_p``: the paired-bootstrap interval and p-value of
    the F1 change (``class_diffs``: ``significance.paired_class_differences`` of each model against the baseline)."""
    rows = []
    for name, report in reports.items():
        for (label, values), diff in zip(report["per_class"].items(), class_diffs[name], strict=True):
            base = reports[baseline]["per_class"][label]
            present = values["support"] > 0  # an absent class has no F1 or accuracy, hence no change
            rows.append({"model": name, "class": label, "support": values["support"], "f1": values["f1"],
                         "f1_std": values["f1_std"], "f1_low": values["f1_low"], "f1_high": values["f1_high"],
                         "accuracy": values["accuracy"], "accuracy_std": values["accuracy_std"],
                         "f1_change": values["f1"] - base["f1"] if present else None,
                         "accuracy_change": values["accuracy"] - base["accuracy"] if present else None,
                         **{f"f1_change_{key}": diff[key] if present else None for key in ("low", "high", "p")}})
    return rows


def fastest(rows: list[dict], baseline: str, batch_size: int) -> dict:
    """The fastest row at each measured batch size among those whose macro F1 is not significantly worse than the
    baseline's, and the fastest of those picks overall (the most texts per second of model time).

    Eligible: the baseline itself, and every row whose 95% paired interval of the macro-F1 difference to the
    baseline reaches 0 (``macro_f1_diff_high >= 0``); a row without an interval is not. The baseline is always
    eligible, so each batch size has a pick. Batch 1 ranks by ``latency_ms_median`` (lower first), ``batch_size`` (the
    throughput batches) by ``throughput_per_s`` (higher first); equal speeds go to the higher macro F1, then to
    the earlier row. Returns ``{"baseline", "criterion", "by_batch_size": [pick, ...], "overall": pick,
    "excluded": [significantly worse models]}``, each pick with its ``batch_size``, ``model``, ``measure`` (the
    column ranked) and ``value``, ``texts_per_s``, ``speedup`` (x the baseline at that batch size), ``macro_f1`` and
    ``macro_f1_diff`` with ``_low``/``_high``.

    >>> def row(model, ms, per_s, diff, low, high):
    ...     return {"model": model, "latency_ms_median": ms, "throughput_per_s": per_s, "macro_f1": 0.9 + diff,
    ...             "macro_f1_diff": diff, "macro_f1_diff_low": low, "macro_f1_diff_high": high}
    >>> rows = [row("fp32", 10.0, 100.0, 0.0, 0.0, 0.0), row("int8", 2.0, 300.0, -0.01, -0.02, 0.004),
    ...         row("tiny", 1.0, 900.0, -0.2, -0.25, -0.15)]
    >>> picks = fastest(rows, "fp32", 32)
    >>> [(p["batch_size"], p["model"], p["texts_per_s"], p["speedup"]) for p in picks["by_batch_size"]]
    [(1, 'int8', 500.0, 5.0), (32, 'int8', 300.0, 3.0)]
    >>> picks["overall"]["batch_size"], picks["excluded"]
    (1, ['tiny'])
    """
    base = next(r for r in rows if r["model"] == baseline)
    eligible = [r for r in rows if r["model"] == baseline
                or (r.get("macro_f1_diff_high") is not None and r["macro_f1_diff_high"] >= 0)]
    names = {r["model"] for r in eligible}
    picks = []
    for size, key, faster in ((1, "latency_ms_median", -1), (batch_size, "throughput_per_s", 1)):
        timed = [r for r in eligible if r.get(key) is not None]
        if not timed or base.get(key) is None:
            continue
        best = max(timed, key=lambda r: (faster * r[key], r["macro_f1"]))  # max keeps the first of equal keys
        picks.append({"batch_size": size, "model": best["model"], "measure": key, "value": best[key],
                      "texts_per_s": 1000 / best[key] if faster < 0 else best[key],
                      "speedup": base[key] / best[key] if faster < 0 else best[key] / base[key],
                      **{k: best.get(k) for k in ("macro_f1", "macro_f1_diff", "macro_f1_diff_low",
                                                  "macro_f1_diff_high")}})
    return {"baseline": baseline,
            "criterion": "the baseline, or a 95% paired-bootstrap interval of the macro-F1 difference to it that "
                         "reaches 0 (macro_f1_diff_high >= 0): not significantly worse",
            "by_batch_size": picks, "overall": max(picks, key=lambda p: p["texts_per_s"], default=None),
            "excluded": [r["model"] for r in rows if r["model"] not in names]}
