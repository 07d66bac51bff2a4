"""Run folders: which run a command belongs to, what a fit recorded there (its config and data fingerprints), and
what an interrupted run lacks. Used by ``emocompress.cli`` only; every refusal is a one-line ``ValueError``.
"""

import json
from pathlib import Path

import yaml
from lightning.pytorch.cli import SaveConfigCallback

from emocompress.callbacks.export import HFExport, OnnxExport
from emocompress.callbacks.metrics import TestMetricsWriter
from emocompress.compression.quantization import Int8Quantization
from emocompress.data.sources import SPLIT_NAMES, split_fingerprint
from emocompress.io import atomic_write_text
from emocompress.models.checkpoints import current_class_paths, read_checkpoint

# Settings that may differ between a run and its resumption.
RESUME_FLAGS = ("ckpt_path", "config", "data_changed_ok")


# The run folder's record of the data a fit trained on (split_fingerprint of each split).
FINGERPRINTS = "data_fingerprint.json"


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
