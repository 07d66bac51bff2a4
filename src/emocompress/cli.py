"""Command line: ``emocompress fit|validate|test|predict`` through LightningCLI.

    emocompress fit -c configs/base.yaml -c configs/teacher.yaml
    emocompress test -c configs/base.yaml -c configs/teacher.yaml --ckpt_path logs/teacher/version_0/checkpoints/best.ckpt
    emocompress predict -c configs/base.yaml -c configs/teacher.yaml --ckpt_path ... --data.predict_file texts.txt
    emocompress fit -c configs/base.yaml -c configs/distill.yaml
    emocompress benchmark --config configs/benchmark.yaml

``model`` is any ``EmotionClassifier`` subclass (``class_path: emocompress.distillation.Distiller``);
without a ``class_path`` it is the ``EmotionClassifier``.
"""

import logging
import sys
from pathlib import Path

import torch
from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from emocompress.benchmark import benchmark
from emocompress.checkpoints import read_checkpoint
from emocompress.classifier import EmotionClassifier
from emocompress.data import EmotionDataModule
from emocompress.distillation import Distiller  # noqa: F401  (so `class_path: Distiller` resolves)


class EmoCLI(LightningCLI):
    """LightningCLI with the data -> model links, and a test of the best checkpoint after ``fit``."""

    def add_arguments_to_parser(self, parser):
        parser.set_defaults({"model": {"class_path": f"{EmotionClassifier.__module__}.{EmotionClassifier.__name__}"}})
        parser.link_arguments("data.model_name", "model.init_args.model_name")
        parser.link_arguments("data.id2label", "model.init_args.id2label", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the best checkpoint on the test split (fit only).")

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

    def before_instantiate_classes(self):
        # `fit --ckpt_path last` must find last.ckpt in the folder of the run it resumes, but the logger
        # would open a new version_N. Resume into the newest run of that logger name that has one.
        config = self.config.get(self.subcommand) if self.subcommand else None
        if self.subcommand != "fit" or config.get("ckpt_path") != "last":
            return
        logger = config.trainer.logger
        args = getattr(logger, "init_args", None)
        if args is None or args.get("version") is not None or "save_dir" not in args:
            return
        runs = sorted(Path(args.save_dir, args.get("name") or "").glob("version_*/checkpoints/last.ckpt"),
                      key=lambda p: p.stat().st_mtime)
        if runs:
            folder = runs[-1].parents[1].name  # version_<int>, or a version the user named
            number = folder.removeprefix("version_")
            args.version = int(number) if number.isdigit() else folder

    def after_fit(self):
        if self.config["fit"]["test_after_fit"] and not self.trainer.interrupted:
            ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def main(args=None):
    args = sys.argv[1:] if args is None else args
    if args[:1] == ["benchmark"]:
        # Not a Trainer method: a plain function, parsed by jsonargparse from its signature and docstring.
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        CLI(benchmark, args=args[1:], as_positional=False)
        return
    # TF32 matmuls on Ampere+ GPUs: ~2x faster, accuracy unaffected for fine-tuning. No effect on CPU.
    torch.set_float32_matmul_precision("high")
    EmoCLI(EmotionClassifier, EmotionDataModule, subclass_mode_model=True, args=args,
           save_config_kwargs={"overwrite": True},
           trainer_defaults={"default_root_dir": "logs"})


if __name__ == "__main__":
    main()
