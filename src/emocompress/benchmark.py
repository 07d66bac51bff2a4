"""Side-by-side comparison of model variants: size on disk, CPU latency, imbalance metrics.

    emocompress benchmark --models '{"teacher": "logs/teacher/version_0/hf_model", "int8": "logs/int8/version_0/int8"}' \\
        --baseline teacher --out_dir reports/benchmark

Each model is an ``hf_model`` export, an INT8 folder (``Int8Quantization``) or a Lightning checkpoint. How
things are measured (also written into the report):
  * size: bytes of the weights file as shipped (``model.safetensors``, ``model.onnx``,
    ``int8_state_dict.pt`` or the ``.ckpt``) / 1e6, and of the same bytes gzip-compressed (level 6);
    gzip is where unstructured zeros pay off, dense formats store them.
  * latency: one text at a time (batch 1) over the first ``latency_samples`` texts of the split, after
    ``warmup`` untimed calls; median and 90th percentile of the per-call wall time, tokenization excluded.
  * throughput: batches of ``batch_size`` consecutive texts (padded to their longest), texts per second.
  * metrics: the whole split, with the same torchmetrics code as training.
"""

import csv
import fnmatch
import gzip
import json
import logging
import os
import platform
import re
import time
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from emocompress.checkpoints import read_checkpoint
from emocompress.classifier import (EmotionClassifier, classification_metrics, confusion_figure, metrics_report,
                                    model_inputs)
from emocompress.data import EmotionDataModule
from emocompress.distillation import Distiller
from emocompress.outputs import atomic_dir

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.onnx", "int8_state_dict.pt")
# Every entry a report folder may hold (shell patterns). A non-empty --out_dir with anything else in it is not a
# report of ours and is never replaced: pointed at reports/ or logs/, a replace would erase committed results.
_REPORT_ENTRIES = ("model_comparison.csv", "model_comparison.md", "per_class.csv", "per_class.md", "confusion_*.png",
                   "tradeoff.png", "environment.json", "reports.json", "tensorboard")
_COLUMNS = ["model", "params", "nonzero_params", "sparsity", "size_mb", "gzip_mb", "latency_ms_median",
            "latency_ms_p90", "throughput_per_s", "macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy",
            "speedup", "compression", "gzip_compression"]


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` that a report may not replace: a file, or a non-empty folder holding anything a
    report does not write (``_REPORT_ENTRIES``).

    Raises:
        ValueError: naming the folder, a few foreign entries and the fix.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"benchmark: --out_dir {out_dir} is a file, not a report folder; choose a new --out_dir")
    if not out_dir.is_dir():
        return
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in _REPORT_ENTRIES))
    if foreign:
        raise ValueError(f"benchmark: --out_dir {out_dir} holds files no report writes ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}), so it is not a previous report and will not be "
                         "replaced; choose a new --out_dir (a report replaces only an earlier report)")


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


def load_for_benchmark(path: str | Path) -> tuple[nn.Module, str, Path]:
    """(model in eval mode, where its tokenizer is, its weights file) for an HF export, INT8 folder or .ckpt."""
    problem = model_path_problem(path)
    if problem:
        raise ValueError(f"benchmark model {problem}")
    path = Path(path)
    if path.suffix == ".ckpt":
        # A Distiller's student may be cut from its teacher: only the Distiller can rebuild it.
        module_class = Distiller if "teacher" in read_checkpoint(str(path)).get("hyper_parameters", {}) \
            else EmotionClassifier
        module = module_class.load_from_checkpoint(path, map_location="cpu")
        return module.model.eval(), module.hparams.model_name, path
    weights = _weights_file(path)
    if (path / "int8.json").is_file():
        return _load_int8(path), str(path), weights
    return AutoModelForSequenceClassification.from_pretrained(path).eval(), str(path), weights


def _load_int8(path: Path) -> nn.Module:
    # INT8 artifacts are read by the quantization callback's own loader, the one place that knows the format.
    from emocompress.callbacks.quantization import load_int8

    return load_int8(path, num_threads=torch.get_num_threads())


def file_sizes_mb(path: Path) -> tuple[float, float]:
    """(size, gzip-compressed size) of a file in MB of 10^6 bytes."""
    data = path.read_bytes()
    return len(data) / 1e6, len(gzip.compress(data, compresslevel=6)) / 1e6


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) weights of a model: float parameters, INT8 packed weights, or ONNX initializers
    (all of a graph's constant tensors, which includes quantization scales: a few hundred values)."""
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


@torch.inference_mode()
def time_calls(fn, inputs: list, warmup: int) -> list[float]:
    """Wall time in ms of ``fn(x)`` for each ``x`` of ``inputs``, after ``warmup`` untimed calls."""
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, as numpy's default).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 90)
    (2.5, 3.7)
    """
    return round(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item(), 10)


def measure(name: str, path: str, data: str, split: str, latency_samples: int, warmup: int,
            batch_size: int, max_samples: int | None) -> tuple[dict, dict]:
    """One row of the comparison and the model's full metrics report."""
    model, tokenizer_path, weights = load_for_benchmark(path)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    datamodule = EmotionDataModule(data, model_name=tokenizer_path, labels=[id2label[i] for i in range(len(id2label))],
                                   max_samples=max_samples)
    datamodule.setup("test" if split == "test" else "validate")
    dataset = datamodule.splits[split].remove_columns("length")
    collate = DataCollatorWithPadding(datamodule.tokenizer)

    def forward(batch):
        return model(**model_inputs(batch)).logits

    singles = [collate([dataset[i]]) for i in range(min(latency_samples, len(dataset)))]
    latency = time_calls(forward, singles, warmup)
    batches = [collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
               for i in range(0, len(dataset), batch_size)]
    metrics, confusion = classification_metrics(len(id2label)), MulticlassConfusionMatrix(len(id2label))
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            preds = forward(batch).argmax(-1)
            metrics.update(preds, batch["labels"])
            confusion.update(preds, batch["labels"])
    throughput = len(dataset) / (time.perf_counter() - start)
    report = metrics_report(metrics.compute(), confusion.compute(), id2label)
    total, nonzero = count_parameters(model)
    size_mb, gzip_mb = file_sizes_mb(weights)
    row = {"model": name, "params": total, "nonzero_params": nonzero, "sparsity": 1 - nonzero / total,
           "size_mb": size_mb, "gzip_mb": gzip_mb, "latency_ms_median": percentile(latency, 50),
           "latency_ms_p90": percentile(latency, 90), "throughput_per_s": throughput,
           **{k: report[k] for k in ("macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy")}}
    return row, report


def _environment(num_threads: int) -> dict:
    import transformers

    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": num_threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "sequence_length": "each text tokenized to at most 128 tokens; batch 1 unpadded, "
                               "batches padded to their longest text"}


def _slug(name: str) -> str:
    """A file-name-safe version of a display name.

    >>> _slug("pruned 50% + INT8 (onnxruntime)")
    'pruned_50_INT8_onnxruntime'
    """
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _per_class_rows(reports: dict[str, dict], baseline: str) -> list[dict]:
    rows = []
    for name, report in reports.items():
        for label, values in report["per_class"].items():
            base = reports[baseline]["per_class"][label]
            rows.append({"model": name, "class": label, "support": values["support"], "f1": values["f1"],
                         "accuracy": values["accuracy"], "f1_change": values["f1"] - base["f1"],
                         "accuracy_change": values["accuracy"] - base["accuracy"]})
    return rows


def _close(fig) -> None:
    import matplotlib.pyplot as plt  # imported once a figure exists, after the off-screen backend is chosen

    plt.close(fig)


def _tradeoff_plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # off-screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "latency_ms_median", "latency per text, batch 1 (ms, median)"),
                           (axes[1], "size_mb", "size on disk (MB)")):
        for row in rows:
            ax.scatter(row[key], row["macro_f1"])
            ax.annotate(row["model"], (row[key], row["macro_f1"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel("macro F1")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _close(fig)


def benchmark(models: dict[str, str], data: str = "../shared/data/emotion", split: Literal["test", "val"] = "test",
              baseline: str | None = None, out_dir: str = "reports/benchmark", num_threads: int | None = None,
              latency_samples: int = 300, warmup: int = 30, batch_size: int = 32, max_samples: int | None = None,
              tensorboard: bool = False) -> list[dict]:
    """Compare model variants on one data split and write a report folder.

    Args:
        models: display name -> model (``hf_model`` export, INT8 folder or Lightning ``.ckpt``), in row order.
        data: the dataset (as ``data.data`` of the datamodule).
        split: ``test`` or ``val``.
        baseline: the row that ratios and per-class changes compare against; default: the first model.
        out_dir: report folder: ``model_comparison.csv``/``.md``, ``per_class.csv``/``.md``,
            ``confusion_<model>.png`` per model (name made file-safe), ``tradeoff.png``, ``environment.json``, ``reports.json``.
        num_threads: CPU threads for torch and ONNX Runtime; default: torch's default (all cores).
        latency_samples: texts timed one at a time.
        warmup: untimed calls before timing.
        batch_size: batch size of the throughput measurement.
        max_samples: use only the first N texts of the split (quick runs).
        tensorboard: also log the figures to TensorBoard under ``out_dir``.

    Returns:
        The rows of ``model_comparison.csv``.
    """
    if not models:
        raise ValueError("benchmark: give at least one model in --models")
    if split not in ("test", "val"):
        raise ValueError(f"benchmark: split must be 'test' or 'val', got {split!r}")
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise ValueError(f"benchmark: baseline {baseline!r} is not one of the models {list(models)}")
    check_out_dir(out_dir)  # before measuring: refusing after an hour of timing would waste it
    problems = [p for p in map(model_path_problem, models.values()) if p]
    if problems:
        raise ValueError("benchmark: cannot load these models (fix the paths in --models):\n  " + "\n  ".join(problems))
    if num_threads:
        torch.set_num_threads(num_threads)
    num_threads = torch.get_num_threads()
    rows, reports = [], {}
    for name, path in tqdm(models.items(), desc="benchmark", unit="model"):
        row, reports[name] = measure(name, path, data, split, latency_samples, warmup, batch_size, max_samples)
        rows.append(row)
    per_class = compare(rows, reports, baseline)
    with atomic_dir(out_dir) as out:  # moved into place when complete: never a half-written report
        write_report(out, rows, per_class, reports, split, num_threads, tensorboard)
    log.info("benchmark report written to %s\n%s", out_dir,
             _markdown(rows, ["model", "size_mb", "latency_ms_median", "macro_f1", "speedup", "compression"]))
    return rows


def compare(rows: list[dict], reports: dict[str, dict], baseline: str) -> list[dict]:
    """Add the ratios against the baseline row to ``rows`` (in place) and return the per-class rows."""
    base = next(r for r in rows if r["model"] == baseline)
    for row in rows:
        row["speedup"] = base["latency_ms_median"] / row["latency_ms_median"]
        row["compression"] = base["size_mb"] / row["size_mb"]
        row["gzip_compression"] = base["gzip_mb"] / row["gzip_mb"]
    return _per_class_rows(reports, baseline)


def write_report(out: Path, rows: list[dict], per_class: list[dict], reports: dict[str, dict], split: str,
                 num_threads: int, tensorboard: bool) -> None:
    """Write the report's files (see ``benchmark``'s ``out_dir``) into the folder ``out``."""
    for stem, table, columns in (("model_comparison", rows, _COLUMNS),
                                 ("per_class", per_class, list(per_class[0]))):
        with (out / f"{stem}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)
        (out / f"{stem}.md").write_text(_markdown(table, columns))
    for name, report in reports.items():
        fig = confusion_figure(torch.tensor(report["confusion_matrix"]), report["labels"], f"{name} ({split})")
        fig.savefig(out / f"confusion_{_slug(name)}.png", dpi=120)
        _close(fig)
    _tradeoff_plot(rows, out / "tradeoff.png")
    (out / "environment.json").write_text(json.dumps(_environment(num_threads), indent=2))
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(out / "tensorboard") as writer:
            for step, row in enumerate(rows):
                for key in ("macro_f1", "latency_ms_median", "size_mb"):
                    writer.add_scalar(f"bench/{key}", row[key], step)
