import logging
import re

import pytest
from lightning.pytorch import Callback

from emocompress.callbacks.progress import EpochSummary
from emocompress.models.classifier import EmotionClassifier


class _Losses(Callback):
    """Records (loss, texts) of every training batch, as the Trainer hands them to callbacks."""

    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((float(outputs["loss"]), len(batch["labels"])))


def test_epoch_line_shows_the_epoch_mean_loss_and_counts_epochs_from_one(make_datamodule, tiny_model_dir,
                                                                          tiny_trainer, caplog):
    dm = make_datamodule(batch_size=5, oversample_to=None)
    model = EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2)
    losses = _Losses()
    with caplog.at_level(logging.INFO, logger="emocompress.callbacks.progress"):
        tiny_trainer(max_epochs=2, enable_checkpointing=False,
                     callbacks=[losses, EpochSummary(only_without_tty=False)]).fit(model, datamodule=dm)
    lines = [r.getMessage() for r in caplog.records if r.name == "emocompress.callbacks.progress"]
    assert [line.split(",")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    per_epoch = len(losses.batches) // 2
    for epoch, line in enumerate(lines):
        batches = losses.batches[epoch * per_epoch:(epoch + 1) * per_epoch]
        mean = sum(loss * n for loss, n in batches) / sum(n for _, n in batches)
        shown = float(re.search(r"train/loss ([0-9.]+)", line)[1])
        assert shown == pytest.approx(mean, abs=1e-4)
        assert shown != pytest.approx(batches[-1][0], abs=1e-4)  # not the last batch's loss


class _StepLosses(Callback):
    """Records (the module's logged train/loss, texts) of every training batch: the loss of the batch itself."""

    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((float(trainer.callback_metrics["train/loss"]), len(batch["labels"])))


def test_epoch_loss_is_not_divided_by_gradient_accumulation(make_datamodule, tiny_model_dir, tiny_trainer, caplog):
    # Lightning hands callbacks the loss divided by accumulate_grad_batches (what backward sees).
    dm = make_datamodule(batch_size=5, oversample_to=None)
    losses = _StepLosses()
    with caplog.at_level(logging.INFO, logger="emocompress.callbacks.progress"):
        tiny_trainer(max_epochs=1, enable_checkpointing=False, accumulate_grad_batches=2,
                     callbacks=[losses, EpochSummary(only_without_tty=False)]).fit(
            EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2), datamodule=dm)
    line = next(r.getMessage() for r in caplog.records if r.name == "emocompress.callbacks.progress")
    mean = sum(loss * n for loss, n in losses.batches) / sum(n for _, n in losses.batches)
    assert float(re.search(r"train/loss ([0-9.]+)", line)[1]) == pytest.approx(mean, abs=1e-4)
