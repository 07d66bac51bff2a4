"""The models a benchmark compares: loading each run of a variant, its size and parameters, and its predictions on
the split."""

import gzip
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix
from transformers import DataCollatorWithPadding

from emocompress.compression.distillation import Distiller
from emocompress.data.datamodule import EmotionDataModule
from emocompress.data.sampling import padding_per_text, sort_by_length
from emocompress.data.sources import DataSource, check_label_set
from emocompress.deploy.format import (
    DEFAULT_MAX_LENGTH,
    ONNX_FILE,
    OPENVINO_WEIGHTS_FILE,
    TORCH_WEIGHTS_FILE,
    metadata_file,
    read_metadata,
)
from emocompress.deploy.runtime import precision_hint
from emocompress.models.checkpoints import current_class_paths, label_columns, read_checkpoint, stored_labels
from emocompress.models.classifier import EmotionClassifier, classification_metrics, metrics_report, model_inputs
from emocompress.models.loading import is_distiller_checkpoint, load_folder, trained_max_length

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", ONNX_FILE, OPENVINO_WEIGHTS_FILE, TORCH_WEIGHTS_FILE)


def _weights_file(path: Path) -> Path | None:
    return next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)


def model_path_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a model the benchmark can load (a ``.ckpt`` file, or a folder with a weights file),
    or None if it is one. Checked for every model before the first is measured."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return None if path.is_file() else f"{path}: not a folder or .ckpt file"
    if not path.is_dir():
        return f"{path}: not a folder or .ckpt file"
    if _weights_file(path) is None:
        return f"{path}: no weights file (one of {list(_WEIGHT_FILES)})"
    return None


def load_for_benchmark(path: str | Path, trust_remote_code: bool = False,
                       inference_precision: str | None = "f32") -> tuple[nn.Module, str, Path]:
    """(model in eval mode, where its tokenizer is, its weights file) for an HF export, INT8 folder or .ckpt.
    ``trust_remote_code`` is this run's setting: a checkpoint's own (a hyper-parameter) is never used;
    ``inference_precision``: OpenVINO folders' (``load_artifact``)."""
    problem = model_path_problem(path)
    if problem:
        raise ValueError(f"benchmark model {problem}")
    path = Path(path)
    if path.suffix == ".ckpt":
        # A Distiller's student may be cut from its teacher: only the Distiller can rebuild it.
        hparams = read_checkpoint(str(path)).get("hyper_parameters", {})
        module_class = Distiller if is_distiller_checkpoint(hparams) else EmotionClassifier
        # the class path an earlier version recorded (hparams' _class_path) made current, as --ckpt_path does
        moved = {"_class_path": current_class_paths(hparams["_class_path"])} if "_class_path" in hparams else {}
        module = module_class.load_from_checkpoint(path, map_location="cpu", trust_remote_code=trust_remote_code,
                                                   **moved)
        return module.model.eval(), module.hparams.model_name, path
    return (load_folder(path, trust_remote_code, torch.get_num_threads(), inference_precision), str(path),
            _weights_file(path))


def is_openvino_folder(path: str | Path) -> bool:
    """Whether ``path`` is an OpenVINO artifact folder (``export_openvino``, ``Int8Quantization(backend="openvino")``),
    whose float parts run at the inference precision it is opened with."""
    return metadata_file(path).is_file() and read_metadata(path).backend == "openvino"


def with_precisions(runs: dict[str, list[str]], precisions: list[str]) -> dict[str, tuple[list[str], str]]:
    """Each model's runs and the ``--inference_precision`` choice (``PRECISION_CHOICES``) to open them with: every
    model at the first of ``precisions``, under its own name; an OpenVINO folder also at each other precision, as a
    row of its own named ``"<name>, <precision>"``, so the fastest pick can choose between them.

    >>> with_precisions({"fp32": ["hf_model"]}, ["f32", "auto"])
    {'fp32': (['hf_model'], 'f32')}
    """
    if not precisions or len(set(precisions)) < len(precisions):
        raise ValueError(f"benchmark: openvino_precisions must name one precision or more, each once, got {precisions}")
    for choice in precisions:
        precision_hint(choice)  # refuses an unknown one
    expanded = {}
    for name, paths in runs.items():
        expanded[name] = (paths, precisions[0])
        if is_openvino_folder(paths[0]):
            expanded.update({f"{name}, {choice}": (paths, choice) for choice in precisions[1:]})
    return expanded


def _labels_file(path: str | Path) -> Path:
    """The file that stores the labels of a benchmark model: the ``.ckpt``, an artifact folder's metadata, or an
    export's ``config.json``."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return path
    return metadata_file(path) if metadata_file(path).is_file() else path / "config.json"


def data_labels(data: str) -> list[str] | None:
    """The data's labels, in the order a datamodule without ``data.labels`` gives them: the sorted labels of the
    train split (rare ones kept: the benchmark judges models, not data); None without a train split."""
    source = DataSource(data)
    if not source.has_split("train"):
        return None
    return check_label_set(source.read("train"), source.locate("train")[1], min_count=1)


def file_sizes_mb(path: Path) -> tuple[float, float]:
    """(size, gzip-compressed size) of a file in MB of 10^6 bytes."""
    data = path.read_bytes()
    return len(data) / 1e6, len(gzip.compress(data, compresslevel=6)) / 1e6


def weights_sizes_mb(model: nn.Module, weights: Path) -> tuple[float, float]:
    """``file_sizes_mb`` of the weights as shipped: a folder's weights file; for a ``.ckpt``, which also holds the
    optimizer's state (twice the weights with Adam) and a Distiller's teacher, the ``model.safetensors`` that
    ``HFExport`` would write of its model."""
    if weights.suffix != ".ckpt":
        return file_sizes_mb(weights)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return file_sizes_mb(Path(tmp) / "model.safetensors")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) weights of a model: float parameters, INT8 packed weights, or ONNX initializers or OpenVINO
    constants (all of a graph's constant tensors, which includes quantization scales: a few hundred values)."""
    if str(getattr(model, "path", "")).endswith(".xml"):
        import openvino as ov

        arrays = [op.get_data() for op in ov.Core().read_model(model.path).get_ops() if op.get_type_name() == "Constant"]
        return sum(a.size for a in arrays), sum(int((a != 0).sum()) for a in arrays)
    session = getattr(model, "session", None)
    if session is not None:
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(model.path).graph
        arrays = [numpy_helper.to_array(t) for t in graph.initializer]
        return sum(a.size for a in arrays), sum(int((a != 0).sum()) for a in arrays)
    tensors = list(model.parameters())
    for module in model.modules():
        # quantized modules keep their packed weight and bias behind methods
        for attr in ("weight", "bias"):
            value = getattr(module, attr, None)
            value = value() if callable(value) else None
            if value is not None:
                tensors.append(value.dequantize() if value.is_quantized else value)
    return sum(t.numel() for t in tensors), sum(int((t != 0).sum()) for t in tensors)


@dataclass
class Variant:
    """One row of the comparison: every run (seed) of a recipe, measured on the same split.

    Latency, throughput, size and parameter counts come from the first run (the runs share an architecture);
    metrics from all of them.
    """

    name: str
    paths: list[str]
    model: nn.Module  # the first run's
    static: dict  # the first run's params, nonzero_params, sparsity, size_mb, gzip_mb
    id2label: dict[int, str]
    singles: list[dict]  # the first ``latency_samples`` texts, each a batch of one
    batches: list[dict]  # the whole split in batches of ``batch_size``, of texts of similar length (``sort_by_length``)
    target: np.ndarray  # (N,) true class ids
    columns: torch.Tensor | None = None  # (C,) the model's class id of each of the data's labels; None: the same
    preds: list[np.ndarray] = field(default_factory=list)  # (N,) predicted class ids, one per run
    reports: list[dict] = field(default_factory=list)  # ``metrics_report`` of each run

    def forward(self, batch: dict) -> torch.Tensor:
        return _logits(self.model, batch, self.columns)


def _logits(model: nn.Module, batch: dict, columns: torch.Tensor | None) -> torch.Tensor:
    """(B, C) logits of ``model`` in the data's label order: its own columns taken in ``columns`` order."""
    logits = model(**model_inputs(batch)).logits  # (B, T) -> (B, C)
    return logits if columns is None else logits[:, columns]


def _predict(model: nn.Module, batches: list[dict], id2label: dict[int, str],
             columns: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(target, predictions, metrics report) of one model over the whole split; ``columns`` as in ``Variant``."""
    metrics, confusion = classification_metrics(len(id2label)), MulticlassConfusionMatrix(len(id2label))
    preds, target = [], []
    with torch.inference_mode():
        for batch in batches:
            preds.append(_logits(model, batch, columns).argmax(-1))
            target.append(batch["labels"])
            metrics.update(preds[-1], target[-1])
            confusion.update(preds[-1], target[-1])
    report = metrics_report(metrics.compute(), confusion.compute(), id2label)
    return torch.cat(target).numpy(), torch.cat(preds).numpy(), report


def measure(name: str, paths: list[str], data: str, split: str, latency_samples: int, batch_size: int,
            max_samples: int | None, labels: list[str] | None = None, trust_remote_code: bool = False,
            inference_precision: str = "f32") -> Variant:
    """Load every run of one variant and predict the whole split with each (untimed); the first run stays
    loaded, with its tokenized inputs, for the interleaved timing. OpenVINO folders run their float parts at
    ``inference_precision`` (``PRECISION_CHOICES``).

    Each model's classes are the labels stored with it, matched by name to ``labels`` (default: ``data_labels``;
    without a train split, the model's own), whose order the predictions and reports follow.

    Raises:
        ValueError: a model was trained on another set of labels than the data's (naming its file).
    """
    variant = None
    labels = labels or data_labels(data)
    for path in paths:
        model, tokenizer_path, weights = load_for_benchmark(path, trust_remote_code,
                                                            precision_hint(inference_precision))
        trained_on = stored_labels(model.config.id2label)
        labels = labels or trained_on
        columns = label_columns(trained_on, labels, str(_labels_file(path)))
        columns = None if columns == sorted(columns) else torch.tensor(columns)
        id2label = dict(enumerate(labels))
        # texts cut where the model's training and its server cut them, not at this run's default
        max_length = trained_max_length(path) or DEFAULT_MAX_LENGTH
        datamodule = EmotionDataModule(data, tokenizer=tokenizer_path, max_samples=max_samples, labels=labels,
                                       trust_remote_code=trust_remote_code, max_length=max_length)
        datamodule.setup("test" if split == "test" else "validate")
        lengths = datamodule.splits[split]["length"]
        dataset = datamodule.splits[split].remove_columns("length")
        collate = DataCollatorWithPadding(datamodule.tokenizer)
        # texts of similar length batched together (as predict does), predictions put back in the split's order
        order = sort_by_length(lengths)
        batches = [collate([dataset[j] for j in chunk.tolist()]) for chunk in order.split(batch_size)]
        target, preds, report = _predict(model, batches, id2label, columns)
        target[order.numpy()], preds[order.numpy()] = target.copy(), preds.copy()
        if variant is None:
            singles = [collate([dataset[i]]) for i in range(min(latency_samples, len(dataset)))]
            total, nonzero = count_parameters(model)
            size_mb, gzip_mb = weights_sizes_mb(model, weights)
            static = {"params": total, "nonzero_params": nonzero, "sparsity": 1 - nonzero / total,
                      "size_mb": size_mb, "gzip_mb": gzip_mb, "max_length": max_length,
                      "padded_tokens_per_text": padding_per_text(lengths, order, batch_size)}
            variant = Variant(name, list(paths), model, static, id2label, singles, batches, target, columns)
        elif id2label != variant.id2label or not np.array_equal(target, variant.target):
            raise ValueError(f"benchmark model {name!r}: run {path} has labels {id2label} or test texts unlike its "
                             f"first run {paths[0]} ({variant.id2label}); list only runs of one recipe together")
        variant.preds.append(preds)
        variant.reports.append({"path": str(path), **report})
    return variant
