"""Export the best model of a fit, loadable without Lightning: in Hugging Face format (``HFExport``)
or as an fp32 ONNX folder that serves with only onnxruntime and tokenizers (``OnnxExport``)."""

import copy
import logging
import shutil
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from emocompress.callbacks.quantization import export_onnx

log = logging.getLogger(__name__)


def _best_model(trainer: Trainer, pl_module: LightningModule) -> tuple[nn.Module, str]:
    """(a CPU copy of ``pl_module.model`` with the best checkpoint's weights, that checkpoint's path);
    the final weights and ``""`` without a ``ModelCheckpoint`` or before it saved anything."""
    model = copy.deepcopy(pl_module.model).cpu()
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if best:
        # weights_only: a checkpoint is data, never code to run.
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model, best


def _check_dirname(owner: str, dirname: str) -> None:
    if not dirname or Path(dirname).name != dirname:
        raise ValueError(f"{owner}.dirname must be a plain folder name, got {dirname!r}")


class HFExport(Callback):
    """When ``fit`` ends, write the best checkpoint's ``pl_module.model`` with ``save_pretrained``,
    plus the datamodule's tokenizer, to ``<log_dir>/<dirname>``. The model's config carries the
    label names (``id2label``), so ``AutoModelForSequenceClassification.from_pretrained(dir)`` and
    ``AutoTokenizer.from_pretrained(dir)`` are all a user needs.

    The folder is written under a temporary name and renamed into place, so it is never half-written.
    Without a ``ModelCheckpoint`` (or before it saved anything) the final weights are exported.

    Args:
        dirname: name of the export folder inside the run's log directory.
    """

    def __init__(self, dirname: str = "hf_model"):
        _check_dirname("HFExport", dirname)
        self.dirname = dirname

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask.
        out = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        if not trainer.is_global_zero:
            return
        model, best = _best_model(trainer, pl_module)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log.info("exported %s model to %s", f"best ({best})" if best else "final", out)


class OnnxExport(Callback):
    """When ``fit`` ends, write the best checkpoint's ``pl_module.model`` as fp32 ONNX, with the
    datamodule's tokenizer and the label names, to ``<log_dir>/<dirname>`` (see
    ``emocompress.callbacks.quantization.export_onnx``). Serve it with
    ``python -m emocompress.serve <dir>``; benchmark it like an INT8 folder.

    Works for fine-tuned, pruned and distilled runs (the model is the student). The folder is
    written under a temporary name and renamed into place. Without a ``ModelCheckpoint`` (or before
    it saved anything) the final weights are exported.

    Args:
        dirname: name of the export folder inside the run's log directory.
        optimize: fuse attention and layer norms with onnxruntime's BERT optimizer (transformers only).
    """

    def __init__(self, dirname: str = "onnx", optimize: bool = True):
        _check_dirname("OnnxExport", dirname)
        self.dirname = dirname
        self.optimize = optimize

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask.
        out = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        if not trainer.is_global_zero:
            return
        model, best = _best_model(trainer, pl_module)
        # The server truncates as training did (data.max_length).
        max_length = getattr(getattr(trainer.datamodule, "hparams", None), "max_length", 128)
        export_onnx(model, out, getattr(trainer.datamodule, "tokenizer", None), self.optimize, max_length)
        log.info("exported %s model as ONNX to %s", f"best ({best})" if best else "final", out)
