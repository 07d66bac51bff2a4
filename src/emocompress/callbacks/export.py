"""Export the best model of a fit in Hugging Face format, loadable without Lightning."""

import copy
import logging
import shutil
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

log = logging.getLogger(__name__)


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
        if not dirname or Path(dirname).name != dirname:
            raise ValueError(f"HFExport.dirname must be a plain folder name, got {dirname!r}")
        self.dirname = dirname

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask.
        out = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        if not trainer.is_global_zero:
            return
        model = copy.deepcopy(pl_module.model).cpu()
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            # weights_only: a checkpoint is data, never code to run.
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log.info("exported %s model to %s", f"best ({best})" if best else "final", out)
