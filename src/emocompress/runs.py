"""Run folders: which run a command belongs to, what a fit recorded there (its config and data fingerprints), what
an interrupted run lacks, the fits refused (zero epochs, overwriting a run, changed data, nothing left to resume),
and the end-of-run summary. Plain functions the hooks of ``emocompress.cli.EmoCLI`` call, and used by it only;
every refusal is a one-line ``ValueError``.
"""

import json
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from emocompress.callbacks.energy import read_energy
from emocompress.callbacks.export import HFExport, OnnxExport
from emocompress.callbacks.metrics import TestMetricsWriter
from emocompress.compression.quantization import Int8Quantization
from emocompress.data.sources import SPLIT_NAMES, split_fingerprint
from emocompress.io import atomic_write_text
from emocompress.models.checkpoints import current_class_paths, read_checkpoint
from emocompress.models.loading import trained_max_length

log = logging.getLogger(__name__)
# Settings that may differ between a run and its resumption.
RESUME_FLAGS = ("ckpt_path", "config", "data_changed_ok")


# The run folder's record of the data a fit trained on (split_fingerprint of each split).
FINGERPRINTS = "data_fingerprint.json"
# Scalars of test_metrics.json in the end-of-run summary.
SUMMARY_METRICS = ("macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy")


def comparable(config: str, keys=None, complete=None) -> dict:
    """A dumped run config without what a resume changes (``ckpt_path``, the logger's ``version``); with ``keys``,
    only those top-level keys, and without ``data.predict_file`` (what predict reads is not part of the run).

    Configs saved by earlier versions compare as today's: moved class paths are read as the current ones
    (``current_class_paths``), 0.1.0's ``data.model_name`` (the network then, and the tokenizer linked from it) as
    ``model.init_args.model_name``, and ``complete`` (the CLI's parser: parse and dump again) fills in settings
    added since with their defaults; a config it cannot parse is compared as it is.
    """
    config = current_class_paths(yaml.safe_load(config) or {})
    data = config.get("data")
    if isinstance(data, dict) and "model_name" in data:
        model = config["model"] = config.get("model") or {}
        model["init_args"] = {**(model.get("init_args") or {}), "model_name": data.pop("model_name")}
    if complete is not None:
        try:
            config = complete(config)
        except Exception:  # noqa: BLE001 (an old or foreign config the parser refuses: compared as saved)
            pass
    for key in RESUME_FLAGS:
        config.pop(key, None)
    logger = (config.get("trainer") or {}).get("logger")
    if isinstance(logger, dict):
        (logger.get("init_args") or {}).pop("version", None)
    if keys is not None:
        config = {key: value for key, value in config.items() if key in keys}
        (config.get("data") or {}).pop("predict_file", None)
    return config


class RunRecord(SaveConfigCallback):
    """Beside ``config.yaml``, a fit's run folder gets ``data_fingerprint.json``: which data it was trained on."""

    def save_config(self, trainer, pl_module, stage: str) -> None:  # rank 0, right after config.yaml
        source = getattr(trainer.datamodule, "source", None)
        if stage == "fit" and source is not None:
            # the logger's folder, as config.yaml's: trainer.log_dir is a collective, and only rank 0 is here
            folder = trainer.logger.log_dir if trainer.logger is not None else None
            atomic_write_text(Path(folder or trainer.default_root_dir) / FINGERPRINTS,
                              json.dumps(fingerprints(source), indent=2))


def fingerprints(source) -> dict:
    """``split_fingerprint`` of each split the source has."""
    return {split: split_fingerprint(source, split) for split in SPLIT_NAMES if source.has_split(split)}


def named_run_folder(config) -> Path | None:
    """The run folder a logger with version folders writes to when its version is named, else None."""
    args = getattr(config.trainer.logger, "init_args", None)
    if args is None or "save_dir" not in args or args.get("version") is None:
        return None
    version = args.version
    return Path(args.save_dir, args.get("name") or "", f"version_{version}" if isinstance(version, int) else str(version))


def find_run(config, current: dict, keys: set | None, fix: str, complete=None) -> Path:
    """The run folder named with ``--trainer.logger.init_args.version``, else the newest one under the logger's
    name whose saved config equals ``current`` (``comparable`` of this command's config; with ``keys``, for
    validate/test/predict, a fit whose settings shared with this command are equal); ``fix`` ends the error,
    ``complete`` as for ``comparable``."""
    folder = named_run_folder(config)
    if folder is not None:
        return folder
    args = config.trainer.logger.init_args
    root = Path(args.save_dir, args.get("name") or "")

    def is_this_run(path: Path) -> bool:
        saved = comparable(path.read_text(), keys, complete)
        if keys is None:
            return saved == current
        # validate/test/predict: a fit (earlier tests' folders have a config too) with the same shared settings
        return (path.parent / "checkpoints" / "last.ckpt").is_file() and all(
            saved[k] == current[k] for k in saved.keys() & keys)

    same = [path.parent for path in root.glob("*/config.yaml") if is_this_run(path)]
    if not same:
        raise ValueError(f"--ckpt_path {config.ckpt_path}: no run under {root} was started with this config, {fix}")
    return max(same, key=lambda run: (run / "config.yaml").stat().st_mtime)


def checkpoint_of_run(folder: Path, keyword: str) -> Path:
    """``--ckpt_path last|best`` of a run: its ``last.ckpt``, or the best checkpoint its first monitored
    ``ModelCheckpoint`` recorded in it."""
    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ValueError(f"--ckpt_path {keyword}: {folder} has no checkpoints/last.ckpt (it stopped before its "
                         "first epoch ended); pass a .ckpt file")
    path = last
    if keyword == "best":
        states = read_checkpoint(str(last)).get("callbacks", {})
        recorded = next((state["best_model_path"] for name, state in states.items() if name.startswith(
            "ModelCheckpoint") and state.get("monitor") and state.get("best_model_path")), None)
        if recorded is None:
            raise ValueError(f"--ckpt_path best: {last} records no best checkpoint (no ModelCheckpoint with a "
                             "monitor); pass the .ckpt file")
        # recorded as the fit saw it: relative to the fit's working directory, or moved with its run folder
        path = Path(recorded) if Path(recorded).is_file() else folder / "checkpoints" / Path(recorded).name
        if not path.is_file():
            raise ValueError(f"--ckpt_path best: {last} names {recorded} as the best checkpoint, which is gone; "
                             "pass a .ckpt file")
    read_checkpoint(str(path))  # a broken file: one line now, not an unpickling traceback later
    return path


def changed_data(folder: Path, source) -> str | None:
    """What changed in the data since the run in ``folder`` was trained on it (the files named), or None when
    nothing did or the run recorded no fingerprints (runs from before they were)."""
    recorded_file = folder / FINGERPRINTS
    if source is None or not recorded_file.is_file():
        return None
    recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
    current = fingerprints(source)
    changed = [split for split, print_ in recorded.items() if current.get(split) != print_]
    if not changed:
        return None
    named = ", ".join(str((current.get(s) or recorded[s]).get("file") or recorded[s].get("source")) for s in changed)
    return (f"data: {named} changed since {folder} was trained on it ({recorded_file} records other bytes); "
            "resuming would continue on different data with a schedule sized for the old epoch")


def missing_outputs(folder: Path, callbacks: list, test_after_fit: bool) -> list[str]:
    """The outputs a finished fit writes (the fit-end exports; with its test, the metrics and INT8 folder) that
    ``folder`` lacks: a run killed while exporting or testing."""
    expected = [c.dirname for c in callbacks if isinstance(c, HFExport | OnnxExport)]
    if test_after_fit:
        expected += [c.dirname for c in callbacks if isinstance(c, Int8Quantization)]
        expected += [c.filename for c in callbacks if isinstance(c, TestMetricsWriter)]
    return [name for name in expected if not (folder / name).exists()]


def refuse_zero_epochs(config) -> None:
    """A fit limited to 0 epochs or steps trains nothing, yet would export and test the model it started
    with (a head initialised at random) as if it were trained: refused, not warned, because nothing useful
    comes of it (``test`` without --ckpt_path scores a fresh model, with its warning)."""
    for key in ("max_epochs", "max_steps"):
        if config.trainer.get(key) == 0:
            raise ValueError(f"trainer.{key} 0: fit would train nothing and export the untrained model as its "
                             f"result; give at least 1 (or use `test` to score the model as it is)")


def refuse_to_overwrite_a_run(config) -> None:
    """A new ``fit`` into a run folder named with ``--trainer.logger.init_args.version`` that already holds a
    run would overwrite its config, checkpoints, exports and test metrics (``save_config_kwargs`` allows
    overwriting, which resuming needs). Unnamed runs get a fresh version_N from the logger."""
    folder = named_run_folder(config)
    # only rank 0: DDP re-runs this command in each child process, after rank 0 has parsed it
    if folder is not None and (folder / "config.yaml").is_file() and rank_zero_only.rank == 0:
        raise ValueError(f"{folder} already holds a run, which this fit would overwrite; continue it with "
                         "--ckpt_path last, name another run with --trainer.logger.init_args.version, or "
                         "remove the folder to train it again")


def run_of_command(config, subcommand: str, parser_of, fix: str) -> Path:
    """``find_run`` for this ``subcommand``'s config: for fit all of it, for validate/test/predict the settings
    they share with fit. ``parser_of(subcommand)`` is the CLI's parser of a subcommand (``LightningCLI._parser``)."""
    dumped = parser_of(subcommand).dump(config, skip_none=False)
    keys = None if subcommand == "fit" else set(yaml.safe_load(dumped))
    fit = parser_of("fit")

    def complete(saved: dict) -> dict:  # a saved fit config, with the settings added since at their defaults
        exit_on_error, fit.exit_on_error = fit.exit_on_error, False  # raise, not print usage and exit
        try:  # (a folder of an earlier test or predict run holds a config fit refuses: compared as saved)
            return yaml.safe_load(fit.dump(fit.parse_object(saved), skip_none=False))
        finally:
            fit.exit_on_error = exit_on_error

    return find_run(config, comparable(dumped, keys), keys, fix, complete)


class Resumed(NamedTuple):
    """The run a ``fit --ckpt_path last`` continues: its folder, the epoch of its ``last.ckpt`` (from 0), and
    whether that was its last epoch (trained, but maybe killed while exporting or testing)."""
    folder: Path
    epoch: int
    max_epochs: int | None
    finished: bool


def resume_into_its_own_run(config, parser_of) -> Resumed | None:
    """``fit --ckpt_path last`` continues the run it belongs to, in that run's folder, or refuses.

    The logger would open a new version_N, where Lightning finds no last.ckpt. The run is the newest one
    under the logger's name whose saved config equals this one (resume flags aside), or the version named
    with ``--trainer.logger.init_args.version``; the logger's version is set to it. Resuming anything else would
    train another run on new settings and overwrite its config, metrics and exports. None for a logger without
    version folders (Lightning's own lookup of "last"); ``parser_of`` as for ``run_of_command``.
    """
    args = getattr(config.trainer.logger, "init_args", None)
    if args is None or "save_dir" not in args:
        return None
    choose = ("pass --ckpt_path <file.ckpt> to start a new run from a checkpoint, or "
              "--trainer.logger.init_args.version <N> to continue version_<N>")
    folder = run_of_command(config, "fit", parser_of, f"so none is this run to resume; {choose}")
    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ValueError(f"--ckpt_path last: {folder} has no checkpoints/last.ckpt (it stopped before its first "
                         f"epoch ended); start it again without --ckpt_path, or {choose}")
    state = read_checkpoint(str(last))
    epoch, step = state.get("epoch", 0), state.get("global_step", 0)
    max_epochs = config.trainer.get("max_epochs")
    # A finished run: the CLI's before_fit, when the callbacks exist, decides whether anything is missing
    # (finish_or_refuse; Lightning then skips the done epochs and runs on_fit_end and the test).
    finished = isinstance(max_epochs, int) and max_epochs > 0 and epoch + 1 >= max_epochs
    number = folder.name.removeprefix("version_")
    args.version = int(number) if number.isdigit() else folder.name
    if not finished:
        log.info("resuming %s from %s (epoch %d, global step %d)", folder, last, epoch, step)
    return Resumed(folder, epoch, max_epochs, finished)


def checkpoint_of_its_run(config, subcommand: str, parser_of) -> None:
    """``validate/test/predict --ckpt_path last|best``: ``config.ckpt_path`` becomes the run's ``last.ckpt``, or the
    best checkpoint its first monitored ``ModelCheckpoint`` recorded in it. Lightning would find neither (a new
    run folder) and go on with the fresh model, scoring a random head. ``parser_of`` as for ``run_of_command``."""
    keyword = config.ckpt_path
    args = getattr(config.trainer.logger, "init_args", None)
    if args is None or "save_dir" not in args:
        raise ValueError(f"--ckpt_path {keyword}: without a logger there is no run folder to take it from; pass "
                         "the .ckpt file (checkpoints/ in the run's folder)")
    fix = ("so none is the run to take it from; pass the .ckpt file, or --trainer.logger.init_args.version <N> "
           "for version_<N>")
    folder = run_of_command(config, subcommand, parser_of, fix)
    path = checkpoint_of_run(folder, keyword)
    config.ckpt_path = str(path)
    log.info("%s: --ckpt_path %s is %s (run %s)", subcommand, keyword, os.path.relpath(path), folder)


def warn_if_truncated_otherwise(ckpt_path: str | None, datamodule, subcommand: str) -> None:
    """Warn when ``--ckpt_path`` was trained with another ``data.max_length`` (its datamodule hyper-parameters) than
    this command uses: longer texts are then cut where neither its training nor its exports (``artifact.json``) cut
    them, so the same text can get another answer here than from the run's ONNX folder. ``last`` and ``best`` find
    a run of these settings, so only a ``.ckpt`` named by its path can differ. Without ``--ckpt_path``, the same
    for an ``hf_model`` export as the model (its tokenizer records the max_length it was trained with)."""
    current = getattr(datamodule, "max_length", None)
    source = ckpt_path or (datamodule.hparams.get("tokenizer") if hasattr(datamodule, "hparams") else None)
    if current is None or not source or not Path(source).exists():  # a hub name, 'last' resolved elsewhere
        return
    trained = trained_max_length(source)
    if trained is not None and trained != current:
        rank_zero_warn(f"{subcommand}: data.max_length is {current}, but {source} was trained with {trained}: texts "
                       f"of more than {min(current, trained)} tokens are cut otherwise than in its training and its "
                       f"exports, so they can get other answers; pass --data.max_length {trained}")


def refuse_changed_data(folder: Path, source, data_changed_ok: bool) -> None:
    """Resuming on data edited since the run began would continue on other texts, with a schedule sized for the
    old epoch: refused, naming the split, unless ``--data_changed_ok true``."""
    message = changed_data(folder, source)
    if message is None:
        return
    if not data_changed_ok:
        raise ValueError(f"{message}. Restore the data, start a new run without --ckpt_path, or pass "
                         "--data_changed_ok true to resume anyway")
    rank_zero_warn(f"{message}; resuming anyway (--data_changed_ok true)")


def finish_or_refuse(resumed: Resumed, callbacks: list, test_after_fit: bool) -> None:
    """A resumed run whose epochs are all done: write the outputs it lacks (the fit-end exports, and the test's
    metrics and INT8 folder when it tests after fit), or refuse when it has them all."""
    missing = missing_outputs(resumed.folder, callbacks, test_after_fit)
    if not missing:
        raise ValueError(f"--ckpt_path last: {resumed.folder} already finished its {resumed.max_epochs} epochs "
                         f"(last.ckpt is from epoch {resumed.epoch}) and wrote its exports; nothing to resume. To "
                         "train it further, raise --trainer.max_epochs and name the run with "
                         "--trainer.logger.init_args.version")
    log.info("finishing %s: its %d epochs are done; writing what is missing: %s", resumed.folder,
             resumed.max_epochs, ", ".join(missing))


def say_how_to_resume(trainer, subcommand: str) -> None:
    """After SIGTERM stopped ``subcommand``: how to continue it (fit: from which ``last.ckpt``)."""
    if not trainer.is_global_zero:
        return
    if subcommand != "fit":
        log.error("%s interrupted by SIGTERM; its outputs were not written: run the same command again", subcommand)
        return
    dirs = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    last = next((d / "last.ckpt" for d in sorted(dirs) if (d / "last.ckpt").is_file()), None)
    if last is None:
        log.error("fit interrupted by SIGTERM before its first epoch ended (no last.ckpt to resume from); "
                  "start it again")
    else:
        log.error("fit interrupted by SIGTERM; resume it from %s with the same command and --ckpt_path last "
                  "(it also writes the exports and test metrics a run killed after training lacks)",
                  os.path.relpath(last))


def log_summary(trainer, model, subcommand: str) -> None:
    """What the run did and where everything it wrote is: the last lines of its output."""
    if not trainer.is_global_zero:
        return
    logger = trainer.logger
    folder = Path(logger.log_dir if logger is not None and logger.log_dir else trainer.default_root_dir)
    lines = [f"{subcommand} done; run folder {folder}"]
    best = trainer.checkpoint_callback
    if subcommand == "fit" and getattr(best, "best_model_path", ""):
        epoch = re.search(r"epoch=(\d+)", Path(best.best_model_path).name)
        # epochs count from 1 in what we print (the per-epoch lines), from 0 in Lightning's file names
        lines.append(f"  best {best.monitor} {float(best.best_model_score):.4f}"
                     f"{f' at epoch {int(epoch[1]) + 1}' if epoch else ''}: {best.best_model_path}")
    recorded = folder / FINGERPRINTS
    if subcommand == "fit" and recorded.is_file():
        for split, print_ in json.loads(recorded.read_text(encoding="utf-8")).items():
            lines.append(f"  data {split}: {print_['file']} ({print_['bytes']} bytes, sha256 "
                         f"{print_['sha256'][:16]})" if "file" in print_ else
                         f"  data {split}: {print_['source']} (datasets fingerprint "
                         f"{print_['datasets_fingerprint']})")
    report = getattr(model, "test_report", None)
    if report and subcommand in ("fit", "test"):
        lines.append("  test: " + ", ".join(f"{key} {report[key]:.4f}" for key in SUMMARY_METRICS))
    energy = read_energy(folder) if subcommand == "fit" else None
    if energy and "fit" in energy:
        lines.append(f"  energy: {energy['fit']['energy_kwh']:.6f} kWh ({energy['fit']['energy_method']}, "
                     f"codecarbon {energy['fit']['cpu_tracker']})")
    if folder.is_dir():
        entries = sorted(folder.iterdir())
        entries += [path for entry in entries if entry.name == "checkpoints" for path in sorted(entry.iterdir())]
        lines += [f"  {path}{'/' if path.is_dir() else ''}" for path in sorted(entries)]
    log.info("\n".join(lines))
