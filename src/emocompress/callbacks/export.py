"""Export the best model of a fit, loadable without Lightning: in Hugging Face format (``HFExport``)
or as an fp32 ONNX folder that serves with only onnxruntime and tokenizers (``OnnxExport``)."""

import copy
import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from emocompress.compression.export import datamodule_max_length, export_onnx
from emocompress.io import atomic_dir, check_folder_name, run_dir
from emocompress.models import pretrained
from emocompress.models.checkpoints import load_network

log = logging.getLogger(__name__)


class _BestModelExport(Callback):
    """When ``fit`` ends, rank 0 writes the best checkpoint's ``pl_module.model`` to ``<log_dir>/<dirname>``
    with ``_write``; without a ``ModelCheckpoint`` (or before it saved anything), the final weights."""

    def __init__(self, dirname: str):
        check_folder_name(dirname, f"{type(self).__name__}.dirname")
        self.dirname = dirname

    def _write(self, model: nn.Module, out: Path, datamodule) -> None:
        raise NotImplementedError

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = run_dir(trainer) / self.dirname  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        model = copy.deepcopy(pl_module.model).cpu()
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            load_network(model, best)
        self._write(model, out, trainer.datamodule)
        log.info("%s: exported the %s model to %s", type(self).__name__, f"best ({best})" if best else "final", out)


class HFExport(_BestModelExport):
    """When ``fit`` ends, write the best checkpoint's ``pl_module.model`` with ``save_pretrained``,
    plus the datamodule's tokenizer, to ``<log_dir>/<dirname>``. The model's config carries the
    label names (``id2label``), so ``AutoModelForSequenceClassification.from_pretrained(dir)`` and
    ``AutoTokenizer.from_pretrained(dir)`` are all a user needs. The tokenizer's ``model_max_length`` is the
    ``data.max_length`` the model was trained with, so ``pipeline("text-classification", dir)`` called with
    ``truncation=True`` cuts long texts where training and the ONNX/OpenVINO servers cut them.

    The folder is written under a temporary name and renamed into place, so it is never half-written.
    Without a ``ModelCheckpoint`` (or before it saved anything) the final weights are exported.

    Args:
        dirname: name of the export folder inside the run's log directory.
    """

    def __init__(self, dirname: str = "hf_model"):
        super().__init__(dirname)

    def _write(self, model: nn.Module, out: Path, datamodule) -> None:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            pretrained.mark_saved_config(tmp)
            tokenizer = getattr(datamodule, "tokenizer", None)
            if tokenizer is not None:  # model_max_length: the training max_length, where pipelines cut texts
                pretrained.save_trained_tokenizer(tokenizer, tmp, datamodule_max_length(datamodule), model.config)


class OnnxExport(_BestModelExport):
    """When ``fit`` ends, write the best checkpoint's ``pl_module.model`` as fp32 ONNX, with the
    datamodule's tokenizer and the label names, to ``<log_dir>/<dirname>`` (see
    ``emocompress.compression.export.export_onnx``). Serve it with
    ``python -m emocompress.deploy.serve <dir>``; benchmark it like an INT8 folder.

    Works for fine-tuned, pruned and distilled runs (the model is the student). The folder is
    written under a temporary name and renamed into place. Without a ``ModelCheckpoint`` (or before
    it saved anything) the final weights are exported.

    Args:
        dirname: name of the export folder inside the run's log directory.
        optimize: fuse attention and layer norms with onnxruntime's BERT optimizer (transformers only).
    """

    def __init__(self, dirname: str = "onnx", optimize: bool = True):
        super().__init__(dirname)
        self.optimize = optimize

    def _write(self, model: nn.Module, out: Path, datamodule) -> None:
        export_onnx(model, out, getattr(datamodule, "tokenizer", None), self.optimize,
                    datamodule_max_length(datamodule))
