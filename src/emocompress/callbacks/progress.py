"""One plain log line per epoch, for runs whose output is a file (nohup, CI, cluster job logs)."""

import logging
import sys
import time

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

log = logging.getLogger(__name__)


class EpochSummary(Callback):
    """After each validation of ``fit``, logs one line: epoch, train loss, training speed and the val
    metrics, e.g. ``epoch 2/4, train/loss 0.3120, 94.8 texts/s, val/loss 0.2841, val/macro_f1 0.9047, ...``.

    ``train/loss`` is the mean loss of the epoch's batches so far, weighted by their texts (this process's
    batches under DDP), not the last batch's, which jumps from one batch to the next. Epochs count from 1,
    like everything the CLI prints (Lightning's checkpoint names count from 0).

    A progress bar redraws one terminal line and leaves nothing readable in a log file; this writes a
    line that stays. By default only when stderr is not a terminal (where the progress bar already shows it).

    Args:
        only_without_tty: stay silent when stderr is a terminal.
        metrics: val metrics to show, in order (``val/`` keys logged by the module).
    """

    def __init__(self, only_without_tty: bool = True,
                 metrics: tuple[str, ...] = ("val/loss", "val/macro_f1", "val/balanced_accuracy", "val/accuracy")):
        self.only_without_tty = only_without_tty
        self.metrics = metrics
        self._texts = 0
        self._loss_sum = 0.0  # sum over this epoch's batches of loss x texts
        self._loss_texts = 0
        self._start = self._end = None

    def _silent(self, trainer: Trainer) -> bool:
        return (self.only_without_tty and sys.stderr.isatty()) or not trainer.is_global_zero

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._texts, self._start = 0, time.perf_counter()
        self._loss_sum, self._loss_texts = 0.0, 0

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        texts = len(batch["labels"])
        self._texts += texts * trainer.world_size  # every rank trains on a batch of this size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # Lightning divides it by accumulate_grad_batches (what backward sees): undone
            self._loss_sum += float(loss) * trainer.accumulate_grad_batches * texts
            self._loss_texts += texts
        self._end = time.perf_counter()  # training time only: validation runs after the last batch

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._end is None or self._silent(trainer):
            return
        values = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if self._loss_texts:
            parts.append(f"train/loss {self._loss_sum / self._loss_texts:.4f}")
        parts.append(f"{self._texts / (self._end - self._start):.1f} texts/s")
        parts += [f"{key} {float(values[key]):.4f}" for key in self.metrics if key in values]
        log.info(", ".join(parts))
