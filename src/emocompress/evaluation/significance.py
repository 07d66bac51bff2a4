"""Confidence intervals and paired tests for comparing classifiers on one test set.

Numpy/scipy over stored predictions; the metrics of each resample are ``evaluation.metrics``' (torchmetrics, the
definition training reports), computed from its confusion matrix. The bootstrap is *paired*: one
(R, N) matrix of resampled text indices is drawn once and applied to every model's predictions, so a
difference between two models is measured on the same resampled texts each time.

    idx = bootstrap_indices(len(target), resamples=1000, seed=0)           # (R, N), shared by all models
    samples = resampled_metrics(target, preds, num_classes, idx)           # name -> (R,) or (R, C)
    low, high = percentile_interval(samples["macro_f1"])
    diff = paired_difference(samples["macro_f1"], base_samples["macro_f1"])
"""

import warnings

import numpy as np
import torch
from scipy.stats import binomtest

from emocompress.evaluation.metrics import metrics_from_confusion

SCALARS = ("macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy")


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` rows of ``n`` indices drawn uniformly with replacement from ``range(n)``: (R, N) int.

    >>> bootstrap_indices(4, resamples=2, seed=0).shape
    (2, 4)
    """
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def confusion_matrices(target: np.ndarray, preds: np.ndarray, num_classes: int,
                       idx: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrices (rows: true class, columns: predicted) of each resample.

    Args:
        target: (N,) int class ids.
        preds: (N,) int class ids.
        num_classes: C.
        idx: (R, N) int indices into ``target``/``preds``; None: the sample itself (R = 1).

    Returns:
        (R, C, C) int64 counts.

    >>> confusion_matrices(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)[0].tolist()
    [[1, 0], [1, 1]]
    """
    idx = np.arange(len(target))[None] if idx is None else idx
    cells = num_classes * num_classes
    # one bincount over all resamples at once: cell id of resample r = r * C^2 + true * C + predicted
    flat = np.arange(len(idx))[:, None] * cells + target[idx] * num_classes + preds[idx]  # (R, N)
    return np.bincount(flat.ravel(), minlength=len(idx) * cells).reshape(len(idx), num_classes, num_classes)


def resampled_metrics(target: np.ndarray, preds: np.ndarray | list[np.ndarray], num_classes: int,
                      idx: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric on each resample of the texts; for several runs (seeds) of one model, the mean over runs of
    each run's metric on the same resampled texts.

    Args:
        target: (N,) int.
        preds: (N,) int, or a list of (N,) int, one per run.
        num_classes: C.
        idx: (R, N) from ``bootstrap_indices``.

    Returns:
        As ``metrics.metrics_from_confusion``, as numpy arrays: name -> (R,) or (R, C) float64.
    """
    runs = [preds] if isinstance(preds, np.ndarray) else preds
    per_run = [metrics_from_confusion(torch.from_numpy(confusion_matrices(target, p, num_classes, idx)))
               for p in runs]
    return {k: np.mean([m[k].numpy() for m in per_run], axis=0) for k in per_run[0]}


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple:
    """The percentile bootstrap interval: the (1 - level)/2 and (1 + level)/2 quantiles of the resampled values
    (along axis 0; NaN resamples ignored; NaN where all are, as for a class absent from the split).

    >>> [round(x, 9) for x in percentile_interval(np.arange(101.0))]
    [2.5, 97.5]
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        low, high = np.nanquantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def paired_difference(samples: np.ndarray, base_samples: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Interval and two-sided p-value of the difference ``model - base`` from paired bootstrap samples.

    The p-value is ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` over the resampled differences ``d``: twice the
    share of resamples on the less common side of 0 (the bootstrap test by interval inversion: p < 0.05 about
    when the 95% interval excludes 0). A difference that is 0 on every resample has p = 1.

    Args:
        samples: (R,) the model's metric on each resample.
        base_samples: (R,) the baseline's metric on the same resamples.

    Returns:
        ``low``, ``high`` (the percentile interval of ``d``) and ``p``; NaN where ``d`` is undefined on every
        resample.

    >>> d = paired_difference(np.array([0.9, 0.8, 0.85]), np.array([0.9, 0.8, 0.85]))
    >>> d["low"], d["high"], d["p"]
    (0.0, 0.0, 1.0)
    >>> paired_difference(np.array([0.9, np.nan, 0.9, 0.9]), np.array([0.8, 0.8, 0.8, 0.8]))["p"]  # NaN: skipped
    0.0
    """
    d = samples - base_samples
    d = d[~np.isnan(d)]  # resamples where the metric is undefined for either (a class without texts) do not count
    if not d.size:
        return {"low": float("nan"), "high": float("nan"), "p": float("nan")}
    low, high = percentile_interval(d, level)
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {"low": low, "high": high, "p": p}


def mcnemar_exact(correct: np.ndarray, base_correct: np.ndarray) -> dict[str, float]:
    """Exact McNemar test of two classifiers' per-text correctness on the same texts.

    Only discordant texts count: ``b`` = texts only the model gets right, ``c`` = texts only the baseline gets
    right. Under equal accuracy ``b ~ Binomial(b + c, 1/2)``; the p-value is the two-sided exact binomial test
    (``scipy.stats.binomtest``), and 1 when there are no discordant texts.

    Args:
        correct: (N,) bool, the model's prediction is right.
        base_correct: (N,) bool, the baseline's is.

    Returns:
        ``only_model_correct`` (b), ``only_base_correct`` (c), ``p``.

    >>> mcnemar_exact(np.array([1, 0, 0, 0, 0, 0, 1], bool), np.array([0, 1, 1, 1, 1, 1, 1], bool))["p"]
    0.21875
    """
    b = int(np.sum(correct & ~base_correct))
    c = int(np.sum(~correct & base_correct))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"only_model_correct": b, "only_base_correct": c, "p": p}


def paired_class_differences(samples: np.ndarray, base_samples: np.ndarray, level: float = 0.95) -> list[dict]:
    """``paired_difference`` of each class's metric: one dict (``low``, ``high``, ``p``) per class, all None for a
    class with no value on any resample (absent from the split).

    Args:
        samples: (R, C) the model's per-class metric on each resample (e.g. ``resampled_metrics``' ``f1_per_class``).
        base_samples: (R, C) the baseline's, on the same resamples.

    >>> same = np.array([[0.5, 0.9], [0.6, 0.8]])
    >>> [d["p"] for d in paired_class_differences(same + [0.1, 0.0], same)]
    [0.0, 1.0]
    """
    d = samples - base_samples
    return [dict.fromkeys(("low", "high", "p")) if np.isnan(d[:, c]).all()
            else paired_difference(samples[~np.isnan(d[:, c]), c], base_samples[~np.isnan(d[:, c]), c], level)
            for c in range(d.shape[1])]


def class_differences_from_predictions(target: np.ndarray, preds: dict[str, list[np.ndarray]], baseline: str,
                                       num_classes: int, resamples: int, seed: int) -> dict[str, list[dict]]:
    """Per-class F1 differences of every model to ``baseline`` with paired-bootstrap intervals, from saved
    per-text predictions (a report's ``predictions.json``): the same resamples (``bootstrap_indices`` with
    ``resamples`` and ``seed``) for every model, each model's F1 the mean over its runs.

    Returns:
        model name -> ``paired_class_differences`` against the baseline (one dict per class).
    """
    idx = bootstrap_indices(len(target), resamples, seed)
    f1 = {name: resampled_metrics(target, runs, num_classes, idx)["f1_per_class"] for name, runs in preds.items()}
    return {name: paired_class_differences(f1[name], f1[baseline]) for name in preds}
