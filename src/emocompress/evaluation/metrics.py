"""The one definition of every reported metric: torchmetrics objects for training, validation, test and the benchmark,
their values on many confusion matrices at once for the bootstrap (``metrics_from_confusion``), and the report
they become (``metrics_report``)."""

import copy

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassF1Score,
    MulticlassRecall,
    MulticlassStatScores,
)


def classification_metrics(num_classes: int) -> MetricCollection:
    """The metrics reported for every model, all from torchmetrics.

    Scalars: ``accuracy`` (micro), ``macro_f1``, ``balanced_accuracy`` (macro recall) and
    ``cohen_kappa``. Vectors of shape (C,): ``f1_per_class`` and ``accuracy_per_class`` (per-class
    recall: the share of each class predicted correctly).
    """
    return MetricCollection({
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        "balanced_accuracy": MulticlassRecall(num_classes, average="macro"),
        "cohen_kappa": MulticlassCohenKappa(num_classes),
        "f1_per_class": MulticlassF1Score(num_classes, average=None),
        "accuracy_per_class": MulticlassRecall(num_classes, average=None),
    })


def metrics_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each metric of ``classification_metrics`` on each of R confusion matrices, as the bootstrap needs it.

    Every value comes from the metric's own torchmetrics ``compute`` (its averaging, its handling of absent
    classes), run on states filled from the counts, so it cannot drift from what training and the benchmark
    report. (Passing the resampled texts to torchmetrics' ``multidim_average="samplewise"`` instead would
    one-hot encode (R, N, C) values: far slower than counting once, ``significance.confusion_matrices``.)

    Args:
        confusion: (R, C, C) counts, rows true class.

    Returns:
        float64 values: ``accuracy``, ``macro_f1``, ``balanced_accuracy``, ``cohen_kappa``: (R,);
        ``f1_per_class``, ``accuracy_per_class``: (R, C). Kappa is NaN where it is undefined (observed and
        chance agreement both 1: one class only, all predicted right); so are a class's F1 and accuracy on a
        matrix without a text of that class, as ``metrics_report`` gives them None (torchmetrics' 0.0 would
        put a class that a rare class's resamples miss at 0 in its interval, even for a perfect model).

    >>> m = metrics_from_confusion(torch.tensor([[[3, 1], [0, 2]]]))
    >>> [round(m[k][0].item(), 4) for k in ("accuracy", "macro_f1", "balanced_accuracy", "cohen_kappa")]
    [0.8333, 0.8286, 0.875, 0.6667]
    """
    # float64 counts: torchmetrics keeps a floating dtype, so the resampled values are double precision
    confusion = confusion.double()
    # the per-class statistics torchmetrics derives from a confusion matrix, (R, C) each
    tp = confusion.diagonal(dim1=1, dim2=2)
    fp, fn = confusion.sum(1) - tp, confusion.sum(2) - tp
    stats = {"tp": tp, "fp": fp, "fn": fn, "tn": confusion.sum((1, 2))[:, None] - tp - fp - fn}
    values = {name: _on_each(metric, confusion, stats)
              for name, metric in classification_metrics(confusion.shape[-1]).items()}
    absent = confusion.sum(2) == 0  # (R, C) no text of the class in that matrix
    for name in values.keys() & {"f1_per_class", "accuracy_per_class"}:
        values[name] = values[name].masked_fill(absent, float("nan"))
    return values


def _on_each(metric: torch.nn.Module, confusion: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``metric``'s value on each of the (R, C, C) ``confusion`` matrices (``stats``: their (R, C) tp, fp, fn,
    tn): its class's ``compute`` (the unwrapped one: the instance's wrapper caches and syncs processes) on a
    copy whose states hold the counts."""
    twin, compute = copy.copy(metric), type(metric).compute
    if isinstance(metric, MulticlassCohenKappa):
        def kappa(counts):  # (C, C): kappa has no per-sample mode, so its compute is vectorised over R
            twin.confmat = counts
            return compute(twin)
        return torch.vmap(kappa)(confusion)
    if not isinstance(metric, MulticlassStatScores):
        raise ValueError(f"metrics.py: no bootstrap for {type(metric).__name__}; derive its states from confusion "
                         f"matrices in _on_each")
    for name, value in stats.items():
        setattr(twin, name, value)
    twin.multidim_average = "samplewise"  # states of shape (R, C): the reductions keep the leading R axis
    return compute(twin)


def metrics_report(values: dict[str, torch.Tensor], confusion: torch.Tensor, id2label: dict[int, str]) -> dict:
    """Computed metrics as plain JSON-ready numbers: scalars, ``per_class`` by label name, the labels absent
    from the split, and the confusion matrix (rows: true class, columns: predicted class).

    A class with no text in the split (support 0) has no recall, hence no F1: its ``f1`` and ``accuracy`` are
    None (JSON null), not torchmetrics' 0.0, and it is listed in ``absent_classes``. ``macro_f1`` stays
    torchmetrics' (as sklearn's ``f1_score(average="macro")`` without ``labels``): the mean over the classes
    that are in the split or predicted, so predicting an absent class still costs macro F1 (a 0 for it).
    """
    report = {name: value.item() for name, value in values.items() if value.ndim == 0}
    support = confusion.sum(dim=1)  # (C,) texts of each true class
    report["per_class"] = {
        label: {"f1": values["f1_per_class"][i].item() if support[i] else None,
                "accuracy": values["accuracy_per_class"][i].item() if support[i] else None,
                "support": int(support[i])}
        for i, label in id2label.items()
    }
    report["absent_classes"] = [label for i, label in id2label.items() if not support[i]]
    if report["absent_classes"]:
        rank_zero_warn(f"classes with no text in the evaluated split, reported without F1 or accuracy "
                       f"(null in the report): {report['absent_classes']}")
    report["labels"] = [id2label[i] for i in range(len(id2label))]
    report["confusion_matrix"] = confusion.long().tolist()
    return report
