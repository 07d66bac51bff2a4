"""One trial of the search: an ordinary ``emocompress fit`` of the existing recipes, in a run folder of its own, then
its model measured on val.

The trial's fit is the stack ``-c <base> ... -c <each option's configs> <its args> ... -c <run>/search.yaml <args>``:
the options in dimension order (so an option's ``--trainer.callbacks.init_args.*`` reaches the callback its own
config added), then ``search.yaml``, written into the run folder, with what every trial shares (teacher, data, the
shared teacher-logits cache, the run folder, the early-stopping callback), then the search's ``args``. The exact
command is saved as ``command.txt``: any trial can be re-run (or resumed with ``--ckpt_path last``) alone.

A trial that differs from a fitted one only in ``after_fit`` dimensions (INT8) is not fitted again: it is the
stack ``test -c <test_base> ... -c <its post-training options' configs> <their args>`` on that trial's
``hf_model``, in its own run folder (``test_args``).
"""

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from emocompress.benchmark.timing import interleaved_times, median_of_rounds, percentile, time_calls
from emocompress.benchmark.variants import Variant, measure
from emocompress.search.space import Dimension
from emocompress.search.stopping import STOPPED_FILE

log = logging.getLogger(__name__)
SEARCH_OVERLAY = "search.yaml"
COMMAND_FILE = "command.txt"


@dataclass(frozen=True)
class Shared:
    """What every trial of one search shares: the teacher (and the student's default ``model_name``), the data,
    the search folder, its base configs and trailing arguments, the seed, and the base configs of a post-training
    trial's test: the trainer, logger and callbacks, and the plain classifier (the fitted model loads from its
    ``hf_model`` as any export does)."""
    teacher: str
    model_name: str
    data: str
    out_dir: Path
    base: tuple[str, ...]
    args: tuple[str, ...] = ()
    seed: int = 42
    test_base: tuple[str, ...] = ()

    @property
    def logits_cache(self) -> Path:
        return self.out_dir / "teacher_logits"


def run_folder(shared: Shared, number: int) -> Path:
    return shared.out_dir / "trials" / f"trial_{number:04d}"


def fit_args(dimensions: list[Dimension], settings: dict[str, str], shared: Shared, number: int,
             min_macro_f1: float, after_epoch: int) -> list[str]:
    """Write the trial's ``search.yaml`` into its run folder and return its ``emocompress`` arguments (from ``fit``).
    ``settings`` has the dimensions that apply; the others add nothing."""
    folder = run_folder(shared, number)
    folder.mkdir(parents=True, exist_ok=True)
    options = _chosen(dimensions, settings)
    model_name = next((o.model_name for o in reversed(options) if o.model_name), shared.model_name)
    overlay = {
        "seed_everything": shared.seed,
        "trainer": {
            "logger": {"init_args": {"save_dir": str(shared.out_dir), "name": "trials",
                                     "version": folder.name}},
            "callbacks+": [{"class_path": "emocompress.search.stopping.HopelessTrialStop",
                            "init_args": {"min_value": round(min_macro_f1, 6), "after_epoch": after_epoch}}],
        },
        "data": {"data": shared.data},
        "model": {"init_args": {"teacher": shared.teacher, "model_name": model_name,
                                "logits_cache": str(shared.logits_cache)}},
    }
    (folder / SEARCH_OVERLAY).write_text(
        f"# trial {number} of the search in {shared.out_dir}: {settings}\n" + yaml.safe_dump(overlay, sort_keys=False))
    args = ["fit", *(a for file in shared.base for a in ("-c", file))]
    for option in options:
        args += [*(a for file in option.configs for a in ("-c", file)), *option.args]
    args += ["-c", str(folder / SEARCH_OVERLAY), *shared.args]
    return _saved(folder, args)


def test_args(dimensions: list[Dimension], settings: dict[str, str], shared: Shared, number: int,
              fitted: Path) -> list[str]:
    """The ``emocompress`` arguments (from ``test``) of a trial whose model is the fit in the run folder ``fitted``:
    that fit's ``hf_model`` tested with this trial's post-training options, logged in the trial's own run folder
    (where an INT8 option writes its artifact). The search's ``args`` are fit arguments and are not passed."""
    folder = run_folder(shared, number)
    folder.mkdir(parents=True, exist_ok=True)
    args = ["test", *(a for file in shared.test_base for a in ("-c", file))]
    for option in _chosen(dimensions, settings, after_fit=True):
        args += [*(a for file in option.configs for a in ("-c", file)), *option.args]
    # on the CPU, as the INT8 overlays are run (configs/overlays/quantize.yaml) and as the model is measured
    args += ["--model.init_args.model_name", str(fitted / "hf_model"), "--data.data", shared.data,
             "--seed_everything", str(shared.seed), "--trainer.accelerator", "cpu",
             "--trainer.logger.init_args.save_dir", str(shared.out_dir), "--trainer.logger.init_args.name", "trials",
             "--trainer.logger.init_args.version", folder.name]
    return _saved(folder, args)


def _chosen(dimensions: list[Dimension], settings: dict[str, str], after_fit: bool | None = None) -> list:
    """The options ``settings`` chooses, in dimension order; only the (not) post-training ones if told."""
    return [d.options[settings[d.name]] for d in dimensions
            if d.name in settings and after_fit in (None, d.after_fit)]


def _saved(folder: Path, args: list[str]) -> list[str]:
    """``args``, once written to the run folder's ``command.txt`` (the trial re-run alone)."""
    (folder / COMMAND_FILE).write_text(f"cd {shlex.quote(os.getcwd())} && emocompress {shlex.join(args)}\n")
    return args


def artifact_name(dimensions: list[Dimension], settings: dict[str, str]) -> str:
    """The run subfolder measured for these settings: the last chosen option's ``artifact``, else ``hf_model``."""
    return next((option.artifact for option in reversed(_chosen(dimensions, settings)) if option.artifact), "hf_model")


def log_file(args: list[str]) -> str:
    """The run folder's log of a trial's command: ``fit.log``, or ``test.log`` for a post-training trial."""
    return f"{args[0]}.log"


def run_fit(args: list[str], folder: Path) -> int:
    """Run ``python -m emocompress.cli <args>`` (a trial's ``fit``, or ``test`` of a post-training trial) with its
    output in ``<folder>/<log_file(args)>``; its exit status."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with (folder / log_file(args)).open("a") as out:
        return subprocess.run([sys.executable, "-m", "emocompress.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env).returncode


def check_fit_args(base: list[str], args: list[str]) -> None:
    """Refuse the search's ``args`` (added to every trial's fit) that the fit refuses, a mistyped key or a bad value,
    once before the search rather than in every trial: parsed on the ``base`` configs by the fit's own parser, in a
    process of its own as the trials are (``--print_config``: parsed, nothing built)."""
    if not args:
        return
    command = [sys.executable, "-m", "emocompress.cli", "fit", *(a for file in base for a in ("-c", file)), *args,
               "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    if result.returncode:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        reason = next((line for line in lines if line.startswith("emocompress: error: ")), lines[-1])
        raise ValueError(f"args {shlex.join(args)}: {reason.removeprefix('emocompress: error: ')}; fix the search's "
                         "args, which every trial's fit gets")


def stopped_early(folder: Path) -> dict | None:
    """What ``HopelessTrialStop`` recorded in the run folder, or None if it did not stop the fit."""
    path = folder / STOPPED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _load_timed(path: str, data: str, labels: list[str] | None, batch_size: int, latency_samples: int,
                split: str, trust_remote_code: bool) -> tuple[Variant, list[dict]]:
    """The model loaded and scored on ``split`` (``benchmark.variants.measure``), and the inputs its latency is
    timed on: single texts at batch 1, else batches of the target size."""
    # predictions in batches of 32 (or the target's), latency on single texts or on batches of the target size
    variant = measure("model", [path], data, split, latency_samples, max(batch_size, 32) if batch_size == 1
                      else batch_size, None, labels, trust_remote_code)
    return variant, variant.singles if batch_size == 1 else variant.batches[:latency_samples]


def measure_model(path: str, data: str, labels: list[str] | None, batch_size: int, latency_samples: int,
                  warmup: int, split: str = "val", trust_remote_code: bool = False) -> dict:
    """Macro F1, per-class F1 and recall on ``split``, size, and the median latency in ms of one call at
    ``batch_size`` (over ``latency_samples`` calls), with the benchmark's own loading, metrics and timer."""
    variant, inputs = _load_timed(path, data, labels, batch_size, latency_samples, split, trust_remote_code)
    report = variant.reports[0]
    times = time_calls(variant.forward, inputs, warmup)
    per_class = report["per_class"]
    return {"macro_f1": report["macro_f1"], "class_f1": {k: v["f1"] for k, v in per_class.items()},
            "class_recall": {k: v["accuracy"] for k, v in per_class.items()},
            "support": {k: v["support"] for k, v in per_class.items()},
            "latency_ms": percentile(times, 50), "size_mb": variant.static["size_mb"],
            "params": variant.static["params"], "path": str(path)}


def retime_latency(paths: dict[str, str], data: str, labels: list[str] | None, batch_size: int,
                   latency_samples: int, warmup: int, rounds: int, split: str = "val",
                   trust_remote_code: bool = False) -> dict[str, float]:
    """Each model's latency at ``batch_size`` timed again, all together: loaded as ``measure_model`` loads them,
    then timed in ``rounds`` interleaved rounds in this process (``benchmark.timing.interleaved_times``), so what
    else the machine does hits every model alike.

    Args:
        paths: name -> model folder (the teacher and the candidates).

    Returns:
        name -> the median over rounds of each round's median ms per call.
    """
    loaded = {name: _load_timed(path, data, labels, batch_size, latency_samples, split, trust_remote_code)
              for name, path in paths.items()}
    calls = {name: (lambda i, v=variant, x=inputs: v.forward(x[i])) for name, (variant, inputs) in loaded.items()}
    # input i is the same text for every model at batch 1 (tokenized by each model's own tokenizer); batches of
    # the target size are taken in each model's length order, as measure_model takes them
    times = interleaved_times(calls, list(range(min(len(x) for _, x in loaded.values()))), rounds, warmup)
    return {name: median_of_rounds(t) for name, t in times.items()}


def budget_gaps(result: dict, teacher: dict, budget) -> dict[str, float]:
    """How far a measured model is past each limit of the budget on val (> 0: over it; <= 0: within it), keyed
    by the limit; a limit the budget does not set is left out."""
    gaps = {"max_macro_f1_drop": teacher["macro_f1"] - result["macro_f1"] - budget.max_macro_f1_drop}
    if budget.max_class_f1_drop is not None:
        drops = [teacher["class_f1"][c] - f1 for c, f1 in result["class_f1"].items()
                 if f1 is not None and teacher["class_f1"].get(c) is not None]
        gaps["max_class_f1_drop"] = max(drops) - budget.max_class_f1_drop
    if budget.min_rare_recall is not None:
        rare = rarest_class(teacher)
        gaps["min_rare_recall"] = budget.min_rare_recall - result["class_recall"][rare]
    return gaps


def rarest_class(measured: dict) -> str:
    """The class with the fewest val texts (of those present)."""
    return min((c for c, n in measured["support"].items() if n), key=lambda c: measured["support"][c])
