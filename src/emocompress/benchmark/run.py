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
  * throughput: batches of ``batch_size`` texts of similar length (the split sorted by token length, as
    ``predict`` batches; each batch padded to its longest text, ``padded_tokens_per_text`` reported), texts per
    second of model time; median over the same interleaved rounds, and its least and greatest.
  * metrics: the whole split, with the same torchmetrics code as training, each model's classes matched by name to
    the data's labels (the sorted train labels; a model trained on another label set is refused); mean over runs,
    std over runs, and 95% paired-bootstrap intervals; macro-F1 difference to the baseline with its interval and
    p-value, and an exact McNemar test (``emocompress.evaluation.significance``).
"""

import logging
import shutil
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from emocompress.benchmark.compare import compare
from emocompress.benchmark.report import (
    check_out_dir,
    environment_info,
    fastest_lines,
    invoking_command,
    markdown_table,
    write_report,
)
from emocompress.benchmark.timing import time_variants
from emocompress.benchmark.variants import data_labels, is_openvino_folder, measure, model_path_problem, with_precisions
from emocompress.io import atomic_dir

log = logging.getLogger(__name__)


def benchmark(models: dict[str, str | list[str]], data: str = "../shared/data/emotion",
              split: Literal["test", "val"] = "test", baseline: str | None = None, out_dir: str = "reports/benchmark",
              num_threads: int | None = None, latency_samples: int = 300, warmup: int = 30, batch_size: int = 32,
              max_samples: int | None = None, tensorboard: bool = False, rounds: int = 5, bootstrap: int = 1000,
              seed: int = 0, pairs: list[tuple[str, str]] | None = None, trust_remote_code: bool = False,
              energy: bool = True,
              openvino_precisions: list[Literal["f32", "bf16", "auto"]] | None = None) -> list[dict]:
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
            ``report.html`` (all of it on one page), ``fastest.json`` (the fastest model per batch size whose macro
            F1 is not significantly worse than the baseline's, ``compare.fastest``; also logged last),
            ``environment.json``, ``reports.json``, ``predictions.json``.
            An existing folder is replaced only if it holds nothing but such files (an earlier report); otherwise the
            run stops before measuring.
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
        energy: also measure the energy of each model's timed calls with codecarbon's offline tracker: kWh per 1,000
            texts in the throughput batches and at batch 1, labelled ``measured`` (the CPU's energy counters, RAPL)
            or ``estimated`` (TDP times this process's CPU load, as on VMs without them).
        openvino_precisions: the precisions OpenVINO folders run their float parts at (``emocompress serve
            --inference_precision``): the first for every OpenVINO model's row (default ``f32``: the same answers on
            every CPU), each further one a row of its own, ``"<name>, <precision>"`` (e.g. ``[f32, auto]``: also with
            OpenVINO's choice, bf16 on CPUs that have it), measured and picked from like any other.

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
    jobs = with_precisions(runs, list(openvino_precisions or ["f32"]))
    variants = [measure(name, paths, data, split, latency_samples, batch_size, max_samples, labels, trust_remote_code,
                        precision) for name, (paths, precision) in tqdm(jobs.items(), desc="benchmark: predict",
                                                                        unit="model")]
    timing = time_variants(variants, rounds, warmup, energy)
    rows, per_class, reports, pair_rows = compare(variants, timing, baseline, bootstrap, seed, pairs)
    predictions = {"labels": reports[baseline]["labels"], "target": variants[0].target.tolist(),
                   "predictions": {v.name: [p.tolist() for p in v.preds] for v in variants},
                   "paths": {v.name: v.paths for v in variants}}
    settings = {"rounds": rounds, "latency_samples": latency_samples, "warmup": warmup, "batch_size": batch_size,
                "bootstrap": bootstrap, "bootstrap_seed": seed, "split": split, "baseline": baseline,
                "openvino_precisions": {name: precision for name, (paths, precision) in jobs.items()
                                        if is_openvino_folder(paths[0])},
                "energy": "codecarbon offline tracker, process mode, around each model's timed calls" if energy else None,
                "command": invoking_command()}
    check_out_dir(out_dir)  # again: something may have been written there while we measured
    with atomic_dir(out_dir) as out:  # moved into place when complete: never a half-written report
        picks = write_report(out, rows, per_class, reports, predictions, split, baseline,
                             environment_info(num_threads, settings), tensorboard, pair_rows,
                             page_title=f"Benchmark report: {Path(out_dir).name}")
        # the write-up is the study's, not the report's: a re-run keeps it (its numbers then need a look)
        if (Path(out_dir) / "README.md").is_file():
            shutil.copy2(Path(out_dir) / "README.md", out / "README.md")
    log.info("benchmark report written to %s\n%s", out_dir,
             markdown_table(rows, ["model", "size_mb", "latency_ms_median", "macro_f1", "macro_f1_low", "macro_f1_high",
                              "speedup", "compression"]))
    # the answer to "which backend for this model at my batch size": last, where a terminal shows it
    if picks:
        log.info("fastest, macro F1 not significantly worse than %s:\n%s", baseline, "\n".join(fastest_lines(picks)))
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


