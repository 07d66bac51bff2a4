"""The one definition of every reported metric: torchmetrics objects for training, validation, test and the benchmark,
and the report they become (``metrics_report``)."""


import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassF1Score,
    MulticlassRecall,
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
