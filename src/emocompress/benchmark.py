"""Side-by-side comparison of model variants: size on disk, CPU latency, imbalance metrics, with intervals.

    emocompress benchmark --models '{"teacher": "logs/teacher/version_0/hf_model", "int8": "logs/int8/version_0/int8"}' \\
        --baseline teacher --out_dir reports/benchmark

Each model is an ``hf_model`` export, an INT8 folder (``Int8Quantization``) or a Lightning checkpoint, or a
list of them: runs of one recipe with different seeds. How things are measured (also written into the report):
  * size: bytes of the weights file as shipped (``model.safetensors``, ``model.onnx``,
    ``int8_state_dict.pt`` or the ``.ckpt``) / 1e6, and of the same bytes gzip-compressed (level 6);
    gzip is where unstructured zeros pay off, dense formats store them.
  * latency: one text at a time (batch 1) over the first ``latency_samples`` texts of the split, after
    ``warmup`` untimed calls, tokenization excluded; in ``rounds`` interleaved rounds (every model once per
    round, one process, same threads). Median over rounds of each round's median, the least and greatest
    round median, and the 90th percentile of all timed calls.
  * throughput: batches of ``batch_size`` consecutive texts (padded to their longest), texts per second of
    model time; median over the same interleaved rounds, and its least and greatest.
  * metrics: the whole split, with the same torchmetrics code as training, each model's classes matched by name to
    the data's labels (the sorted train labels; a model trained on another label set is refused); mean over runs,
    std over runs, and 95% paired-bootstrap intervals; macro-F1 difference to the baseline with its interval and
    p-value, and an exact McNemar test (``emocompress.significance``).
"""

import csv
import fnmatch
import gzip
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding

from emocompress import pretrained
from emocompress.artifact_format import DEFAULT_MAX_LENGTH, META_FILE, ONNX_FILE, TORCH_WEIGHTS_FILE
from emocompress.artifacts import load_artifact
from emocompress.checkpoints import label_columns, read_checkpoint, stored_labels
from emocompress.classifier import (EmotionClassifier, classification_metrics, confusion_figure, metrics_report,
                                    model_inputs)
from emocompress.data import EmotionDataModule
from emocompress.distillation import Distiller
from emocompress.outputs import atomic_dir, check_not_cwd
from emocompress.sources import DataSource, check_label_set
from emocompress.significance import (SCALARS, bootstrap_indices, mcnemar_exact, paired_difference,
                                      percentile_interval, resampled_metrics)

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", ONNX_FILE, TORCH_WEIGHTS_FILE)
# Every entry a report folder may hold (shell patterns). A non-empty --out_dir with anything else in it is not a
# report of ours and is never replaced: pointed at reports/ or logs/, a replace would erase committed results.
_REPORT_ENTRIES = ("model_comparison.csv", "model_comparison.md", "per_class.csv", "per_class.md", "confusion_*.png",
                   "tradeoff.png", "per_class_f1.png", "environment.json", "reports.json", "predictions.json",
                   "pairs.csv", "pairs.md", "tensorboard",
                   "README.md")  # the study's write-up (reports/<study>/README.md): kept across a re-run
_COLUMNS = ["model", "runs", "params", "nonzero_params", "sparsity", "size_mb", "gzip_mb",
            "latency_ms_median", "latency_ms_min", "latency_ms_max", "latency_ms_p90",
            "throughput_per_s", "throughput_min_per_s", "throughput_max_per_s",
            *(f"{key}{suffix}" for key in SCALARS for suffix in ("", "_std", "_low", "_high")),
            "macro_f1_diff", "macro_f1_diff_low", "macro_f1_diff_high", "macro_f1_diff_p",
            "mcnemar_only_model_correct", "mcnemar_only_base_correct", "mcnemar_p",
            "speedup", "compression", "gzip_compression"]


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` that a report may not replace: a file, a non-empty folder holding anything a
    report does not write (``_REPORT_ENTRIES``), or the current directory or a folder above it.

    Raises:
        ValueError: naming the folder, a few foreign entries and the fix.
    """
    try:
        check_not_cwd(out_dir)
    except ValueError as err:
        raise ValueError(f"benchmark: --out_dir {err}") from err
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


def load_for_benchmark(path: str | Path, trust_remote_code: bool = False) -> tuple[nn.Module, str, Path]:
    """(model in eval mode, where its tokenizer is, its weights file) for an HF export, INT8 folder or .ckpt.
    ``trust_remote_code`` is this run's setting: a checkpoint's own (a hyper-parameter) is never used."""
    problem = model_path_problem(path)
    if problem:
        raise ValueError(f"benchmark model {problem}")
    path = Path(path)
    if path.suffix == ".ckpt":
        # A Distiller's student may be cut from its teacher: only the Distiller can rebuild it.
        module_class = Distiller if "teacher" in read_checkpoint(str(path)).get("hyper_parameters", {}) \
            else EmotionClassifier
        module = module_class.load_from_checkpoint(path, map_location="cpu", trust_remote_code=trust_remote_code)
        return module.model.eval(), module.hparams.model_name, path
    weights = _weights_file(path)
    if (path / META_FILE).is_file():
        return load_artifact(path, num_threads=torch.get_num_threads()), str(path), weights
    return pretrained.load_model(str(path), trust_remote_code=trust_remote_code).eval(), str(path), weights


def _labels_file(path: str | Path) -> Path:
    """The file that stores the labels of a benchmark model: the ``.ckpt``, an artifact folder's metadata, or an
    export's ``config.json``."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return path
    return path / META_FILE if (path / META_FILE).is_file() else path / "config.json"


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


def interleaved_times(fns: dict[str, Callable], inputs: list, rounds: int, warmup: int) -> dict[str, list[list[float]]]:
    """Time several models on the same inputs in interleaved rounds, in this process and thread setting.

    First every ``fn`` makes ``warmup`` untimed calls (on ``inputs[:warmup]``). Then, ``rounds`` times, every
    ``fn`` is called once on each of ``inputs`` in turn (``time_calls``), variants one after the other; round
    ``r`` starts with the ``r``-th variant, so none is always first or always after the same one. Slow drift of
    a shared machine (other jobs, clock throttling) then hits every variant alike instead of whichever ran
    during the busy minutes.

    Args:
        fns: name -> callable of one input.
        inputs: what each callable gets, in order.
        rounds: rounds of timing, at least 1.
        warmup: untimed calls per callable before the first round.

    Returns:
        name -> one list per round of per-call wall times in ms, ``(rounds, len(inputs))``.
    """
    names = list(fns)
    for name in names:
        for x in inputs[:warmup]:
            fns[name](x)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_calls(fns[name], inputs, warmup=0))
    return times


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
    batches: list[dict]  # the whole split in batches of ``batch_size``
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
            max_samples: int | None, labels: list[str] | None = None, trust_remote_code: bool = False) -> Variant:
    """Load every run of one variant and predict the whole split with each (untimed); the first run stays
    loaded, with its tokenized inputs, for the interleaved timing.

    Each model's classes are the labels stored with it, matched by name to ``labels`` (default: ``data_labels``;
    without a train split, the model's own), whose order the predictions and reports follow.

    Raises:
        ValueError: a model was trained on another set of labels than the data's (naming its file).
    """
    variant = None
    labels = labels or data_labels(data)
    for path in paths:
        model, tokenizer_path, weights = load_for_benchmark(path, trust_remote_code)
        trained_on = stored_labels(model.config.id2label)
        labels = labels or trained_on
        columns = label_columns(trained_on, labels, str(_labels_file(path)))
        columns = None if columns == sorted(columns) else torch.tensor(columns)
        id2label = dict(enumerate(labels))
        datamodule = EmotionDataModule(data, model_name=tokenizer_path, max_samples=max_samples, labels=labels,
                                       trust_remote_code=trust_remote_code)
        datamodule.setup("test" if split == "test" else "validate")
        dataset = datamodule.splits[split].remove_columns("length")
        collate = DataCollatorWithPadding(datamodule.tokenizer)
        batches = [collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
                   for i in range(0, len(dataset), batch_size)]
        target, preds, report = _predict(model, batches, id2label, columns)
        if variant is None:
            singles = [collate([dataset[i]]) for i in range(min(latency_samples, len(dataset)))]
            total, nonzero = count_parameters(model)
            size_mb, gzip_mb = file_sizes_mb(weights)
            static = {"params": total, "nonzero_params": nonzero, "sparsity": 1 - nonzero / total,
                      "size_mb": size_mb, "gzip_mb": gzip_mb}
            variant = Variant(name, list(paths), model, static, id2label, singles, batches, target, columns)
        elif id2label != variant.id2label or not np.array_equal(target, variant.target):
            raise ValueError(f"benchmark model {name!r}: run {path} has labels {id2label} or test texts unlike its "
                             f"first run {paths[0]} ({variant.id2label}); list only runs of one recipe together")
        variant.preds.append(preds)
        variant.reports.append({"path": str(path), **report})
    return variant


def time_variants(variants: list[Variant], rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Latency (batch 1) and throughput (batches) of each variant's first run, in interleaved rounds.

    Returns:
        name -> ``latency_ms_median`` (median over rounds of each round's median), ``latency_ms_min``/``_max``
        (the least and greatest round median), ``latency_ms_p90`` (over all timed calls), ``throughput_per_s``
        (median over rounds of texts / total model time of a pass over the split) and its ``_min``/``_max``.
    """
    singles = {v.name: (lambda i, v=v: v.forward(v.singles[i])) for v in variants}
    n_singles = min(len(v.singles) for v in variants)
    latency = interleaved_times(singles, list(range(n_singles)), rounds, warmup)
    batched = {v.name: (lambda i, v=v: v.forward(v.batches[i])) for v in variants}
    # every variant's batches hold the same texts; warm-up here is one batch, the singles already warmed up
    throughput = interleaved_times(batched, list(range(len(variants[0].batches))), rounds, warmup=1)
    timing = {}
    for v in variants:
        medians = [percentile(r, 50) for r in latency[v.name]]
        per_s = [len(v.target) / (sum(r) / 1e3) for r in throughput[v.name]]
        timing[v.name] = {"latency_ms_median": percentile(medians, 50), "latency_ms_min": min(medians),
                          "latency_ms_max": max(medians),
                          "latency_ms_p90": percentile([t for r in latency[v.name] for t in r], 90),
                          "throughput_per_s": percentile(per_s, 50), "throughput_min_per_s": min(per_s),
                          "throughput_max_per_s": max(per_s)}
    return timing


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
    return rows, _per_class_rows(reports, baseline), reports, pair_rows


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


_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _cpu() -> dict:
    """CPU vendor, model and the instruction sets INT8/BF16 kernels depend on, from /proc/cpuinfo."""
    info = {"cpu": platform.processor(), "cpu_vendor": None, "cpu_flags": []}
    if Path("/proc/cpuinfo").is_file():
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info = {"cpu": fields.get("model name", info["cpu"]), "cpu_vendor": fields.get("vendor_id"),
                "cpu_flags": [f for f in _CPU_FLAGS if f in flags]}
    return info


def _environment(num_threads: int, settings: dict) -> dict:
    import transformers

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {**_cpu(), "cores": os.cpu_count(), "threads": num_threads, "torch": torch.__version__,
            "onnxruntime": ort_version, "transformers": transformers.__version__,
            "python": platform.python_version(), **settings,
            "sequence_length": f"each text tokenized to at most {DEFAULT_MAX_LENGTH} tokens; batch 1 unpadded, "
                               "batches padded to their longest text"}


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


def _per_class_rows(reports: dict[str, dict], baseline: str) -> list[dict]:
    rows = []
    for name, report in reports.items():
        for label, values in report["per_class"].items():
            base = reports[baseline]["per_class"][label]
            present = values["support"] > 0  # an absent class has no F1 or accuracy, hence no change
            rows.append({"model": name, "class": label, "support": values["support"], "f1": values["f1"],
                         "f1_std": values["f1_std"], "f1_low": values["f1_low"], "f1_high": values["f1_high"],
                         "accuracy": values["accuracy"], "accuracy_std": values["accuracy_std"],
                         "f1_change": values["f1"] - base["f1"] if present else None,
                         "accuracy_change": values["accuracy"] - base["accuracy"] if present else None})
    return rows


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(rows: list[dict], columns: list[str]) -> str:
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
            **{key: _estimate(row, key) for key in SCALARS},
            f"macro F1 - {baseline} [95% CI]": "" if row["model"] == baseline else _difference_cell(row),
            "p (bootstrap)": "" if row["model"] == baseline else f"{row['macro_f1_diff_p']:.3f}",
            "McNemar p (only model / only base right)": "" if row["model"] == baseline else
            f"{row['mcnemar_p']:.3f} ({row['mcnemar_only_model_correct']}/{row['mcnemar_only_base_correct']})",
            "speedup": f"{row['speedup']:.2f}", "compression (gzip)": f"{row['compression']:.2f} "
                                                                      f"({row['gzip_compression']:.2f})"})
    note = (f"\nMetrics: mean over runs (± std over runs when there are several) [95% paired-bootstrap interval]. "
            f"`*`: the 95% interval of the macro-F1 difference to {baseline} excludes 0.\n")
    return _markdown(table, list(table[0])) + note


def _pairs_markdown(pair_rows: list[dict]) -> str:
    """``pairs.md``: each (model, reference) pair's macro-F1 difference; ``*`` where its 95% interval excludes 0."""
    table = [{"model": row["model"], "reference": row["reference"],
              "macro F1 difference [95% CI]": _difference_cell(row),
              "p (bootstrap)": f"{row['macro_f1_diff_p']:.3f}",
              "McNemar p (only model / only reference right)":
                  f"{row['mcnemar_p']:.3f} ({row['mcnemar_only_model_correct']}/{row['mcnemar_only_base_correct']})"}
             for row in pair_rows]
    return _markdown(table, list(table[0])) + ("\nDifference of the seed means, paired over the same bootstrap "
                                               "resamples; McNemar on the first runs. `*`: the 95% interval excludes 0.\n")


def _close(fig) -> None:
    import matplotlib.pyplot as plt  # imported once a figure exists, after the off-screen backend is chosen

    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # off-screen
    import matplotlib.pyplot as plt

    return plt


def _tradeoff_plot(rows: list[dict], out: Path) -> None:
    """Macro F1 (bar: 95% interval) against latency (bar: least to greatest round median) and size."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.5))
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
    _close(fig)


def _per_class_plot(per_class: list[dict], out: Path) -> None:
    """Per-class F1 of every model side by side, each bar with its 95% bootstrap interval."""
    models = list(dict.fromkeys(r["model"] for r in per_class))
    labels = list(dict.fromkeys(r["class"] for r in per_class))
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 1.2 * len(labels) * max(1, len(models) / 3)), 4.5))
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
    _close(fig)


def benchmark(models: dict[str, str | list[str]], data: str = "../shared/data/emotion",
              split: Literal["test", "val"] = "test", baseline: str | None = None, out_dir: str = "reports/benchmark",
              num_threads: int | None = None, latency_samples: int = 300, warmup: int = 30, batch_size: int = 32,
              max_samples: int | None = None, tensorboard: bool = False, rounds: int = 5, bootstrap: int = 1000,
              seed: int = 0, pairs: list[tuple[str, str]] | None = None, trust_remote_code: bool = False) -> list[dict]:
    """Compare model variants on one data split and write a report folder.

    Args:
        models: display name -> model (``hf_model`` export, INT8 folder or Lightning ``.ckpt``), in row order; or
            display name -> list of such models: runs of one recipe with different seeds, reported as their mean
            ± std with an interval over all of them (timing and size from the first).
        data: the dataset (as ``data.data`` of the datamodule).
        split: ``test`` or ``val``.
        baseline: the row that ratios, differences and per-class changes compare against; default: the first model.
        out_dir: report folder: ``model_comparison.csv``/``.md``, ``per_class.csv``/``.md``,
            ``confusion_<model>.png`` per model (name made file-safe), ``tradeoff.png``, ``per_class_f1.png``,
            ``environment.json``, ``reports.json``, ``predictions.json``. An existing folder is replaced only if it
            holds nothing but such files (an earlier report); otherwise the run stops before measuring.
        num_threads: CPU threads for torch and ONNX Runtime; default: torch's default (all cores).
        latency_samples: texts timed one at a time in each round.
        warmup: untimed calls per model before timing.
        batch_size: batch size of the throughput measurement.
        max_samples: use only the first N texts of the split (quick runs).
        tensorboard: also log the figures to TensorBoard under ``out_dir``.
        rounds: timing rounds, at least 1; in each, every model is timed once, one after the other, so slow drift
            of a shared machine hits all alike. Reported: the median over rounds and the least and greatest.
        bootstrap: resamples of the split's texts for the 95% intervals and paired tests, at least 1,000.
        seed: seed of the bootstrap resampling.
        pairs: more comparisons than each row against the baseline: (model, reference) pairs of display names,
            e.g. a distilled student against its control; written to ``pairs.csv``/``pairs.md`` with the same
            paired interval, p-value and McNemar test.
        trust_remote_code: let model folders run their own Python code (``auto_map``); only for code you trust.
            Only this setting counts: a checkpoint's own ``trust_remote_code`` is ignored.

    Returns:
        The rows of ``model_comparison.csv``.
    """
    runs = {name: [paths] if isinstance(paths, str | Path) else list(paths) for name, paths in models.items()}
    baseline = baseline or next(iter(runs), None)
    pairs = [tuple(pair) for pair in pairs or []]
    _check_arguments(runs, split, baseline, rounds, bootstrap, out_dir, pairs)
    _check_counts(latency_samples=latency_samples, batch_size=batch_size, num_threads=num_threads,
                  max_samples=max_samples, warmup=warmup)
    if num_threads:
        torch.set_num_threads(num_threads)
    num_threads = torch.get_num_threads()
    labels = data_labels(data)  # one label order for every row, whatever order each model stores
    variants = [measure(name, paths, data, split, latency_samples, batch_size, max_samples, labels, trust_remote_code)
                for name, paths in tqdm(runs.items(), desc="benchmark: predict", unit="model")]
    timing = time_variants(variants, rounds, warmup)
    rows, per_class, reports, pair_rows = compare(variants, timing, baseline, bootstrap, seed, pairs)
    predictions = {"labels": reports[baseline]["labels"], "target": variants[0].target.tolist(),
                   "predictions": {v.name: [p.tolist() for p in v.preds] for v in variants},
                   "paths": {v.name: v.paths for v in variants}}
    settings = {"rounds": rounds, "latency_samples": latency_samples, "warmup": warmup, "batch_size": batch_size,
                "bootstrap": bootstrap, "bootstrap_seed": seed, "split": split, "baseline": baseline}
    check_out_dir(out_dir)  # again: something may have been written there while we measured
    with atomic_dir(out_dir) as out:  # moved into place when complete: never a half-written report
        write_report(out, rows, per_class, reports, predictions, split, baseline,
                     _environment(num_threads, settings), tensorboard, pair_rows)
        # the write-up is the study's, not the report's: a re-run keeps it (its numbers then need a look)
        if (Path(out_dir) / "README.md").is_file():
            shutil.copy2(Path(out_dir) / "README.md", out / "README.md")
    log.info("benchmark report written to %s\n%s", out_dir,
             _markdown(rows, ["model", "size_mb", "latency_ms_median", "macro_f1", "macro_f1_low", "macro_f1_high",
                              "speedup", "compression"]))
    return rows


def _check_arguments(runs: dict[str, list], split: str, baseline: str | None, rounds: int, bootstrap: int,
                     out_dir: str, pairs: list[tuple[str, ...]] = ()) -> None:
    """Refuse bad settings, an ``out_dir`` that is not an earlier report, and every missing model, before
    measuring: refusing after an hour of timing would waste it."""
    if not runs:
        raise ValueError("benchmark: give at least one model in --models")
    if empty := [name for name, paths in runs.items() if not paths]:
        raise ValueError(f"benchmark: models {empty} have an empty list of runs; give at least one path each")
    if split not in ("test", "val"):
        raise ValueError(f"benchmark: split must be 'test' or 'val', got {split!r}")
    if baseline not in runs:
        raise ValueError(f"benchmark: baseline {baseline!r} is not one of the models {list(runs)}")
    for pair in pairs:
        if len(pair) != 2 or any(name not in runs for name in pair):
            raise ValueError(f"benchmark: pairs entry {list(pair)} must be [model, reference], two of the models "
                             f"{list(runs)}")
    if rounds < 1:
        raise ValueError(f"benchmark: rounds must be at least 1, got {rounds}")
    if bootstrap < 1000:
        raise ValueError(f"benchmark: bootstrap must be at least 1000 resamples (fewer make 95% intervals noisy), "
                         f"got {bootstrap}")
    check_out_dir(out_dir)
    problems = [p for paths in runs.values() for p in map(model_path_problem, paths) if p]
    if problems:
        raise ValueError("benchmark: cannot load these models (fix the paths in --models):\n  " + "\n  ".join(problems))


def _check_counts(warmup: int, **counts: int | None) -> None:
    """Refuse counts below 1 (``warmup`` below 0; None is "the default") before predicting: a 0 would
    otherwise be measured and crash on an empty list of timings, or mean "all threads" silently."""
    for key, value in {**counts, "warmup": warmup}.items():
        least = 0 if key == "warmup" else 1  # no untimed calls is a valid choice
        if value is not None and value < least:
            raise ValueError(f"benchmark: {key} must be at least {least}, got {value}")


def write_report(out: Path, rows: list[dict], per_class: list[dict], reports: dict[str, dict], predictions: dict,
                 split: str, baseline: str, environment: dict, tensorboard: bool, pair_rows: list[dict] = ()) -> None:
    """Write the report's files (see ``benchmark``'s ``out_dir``) into the folder ``out``."""
    tables = [("model_comparison", rows, _COLUMNS), ("per_class", per_class, list(per_class[0]))]
    if pair_rows:
        tables.append(("pairs", pair_rows, list(pair_rows[0])))
        (out / "pairs.md").write_text(_pairs_markdown(pair_rows))
    for stem, table, columns in tables:
        with (out / f"{stem}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)
    (out / "model_comparison.md").write_text(_comparison_markdown(rows, baseline))
    absent = next(iter(reports.values()))["absent_classes"]  # the split's: the same for every variant
    note = (f"\nAbsent from the {split} split (support 0, so no F1 or accuracy; empty cells): "
            f"{', '.join(absent)}. Macro F1 averages the classes in the split or predicted.\n" if absent else "")
    (out / "per_class.md").write_text(_markdown(per_class, list(per_class[0])) + note)
    stems = _file_stems(list(reports))
    for name, report in reports.items():
        runs = len(report["runs"])
        title = f"{name} ({split}{f', {runs} runs summed' if runs > 1 else ''})"
        fig = confusion_figure(torch.tensor(report["confusion_matrix"]), report["labels"], title)
        report["confusion_figure"] = f"confusion_{stems[name]}.png"  # in reports.json: which figure is whose
        fig.savefig(out / report["confusion_figure"], dpi=120)
        _close(fig)
    _tradeoff_plot(rows, out / "tradeoff.png")
    _per_class_plot(per_class, out / "per_class_f1.png")
    (out / "environment.json").write_text(json.dumps(environment, indent=2))
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    (out / "predictions.json").write_text(json.dumps(predictions))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(out / "tensorboard") as writer:
            for step, row in enumerate(rows):
                for key in ("macro_f1", "latency_ms_median", "size_mb"):
                    writer.add_scalar(f"bench/{key}", row[key], step)
