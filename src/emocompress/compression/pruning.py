"""Global unstructured magnitude pruning of ``pl_module.model`` with recovery fine-tuning in the same fit."""

from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.utils import prune
from typing_extensions import override

from emocompress.compression.schedule import PruningSchedule, warn_if_best_is_early

# Top-level module names of a transformers classification head (BERT/RoBERTa/DistilBERT/recurrent students).
_HEAD_NAMES = ("classifier", "pre_classifier", "score")


class MagnitudePruning(Callback):
    """Prunes the smallest-magnitude weights across all ``nn.Linear`` layers of ``pl_module.model`` (one
    global threshold, biases never), then lets the rest of ``fit`` recover the accuracy.

    Pruning uses ``torch.nn.utils.prune``: each pruned layer's ``weight`` is recomputed from
    ``weight_orig * weight_mask`` before every forward, so pruned weights are exactly zero through every
    optimizer step. Checkpoints store plain weights with the zeros folded in (they load into an unpruned
    model); on resume the masks are rebuilt from those zeros. When training ends the masks are removed
    (``prune.remove``), leaving an ordinary model whose pruned weights are zero. Each rank computes the
    same masks from the same (DDP-synchronised) weights, so it works under DDP.

    Only ``pl_module.model`` is touched: a distillation teacher or any other module is never pruned.

    Logs ``prune/sparsity`` (over the pruned layers) and ``prune/sparsity/<layer>``.

    Args:
        amount: final share of the targeted weights set to zero, in [0, 0.95].
        schedule: ``one_shot`` prunes to ``amount`` at ``start_step``; ``cubic`` raises the sparsity
            from 0 at ``start_step`` to ``amount`` at ``end_step`` (Zhu & Gupta 2017), pruning every
            ``every_n_steps`` optimizer steps and at ``end_step`` (see ``PruningSchedule``).
        start_step: optimizer step at which pruning starts (0: before the first step).
        end_step: with ``cubic``, the step at which ``amount`` is reached; keep it within the first epoch
            or two so that checkpoints chosen on validation are at the final sparsity.
        every_n_steps: with ``cubic``, steps between pruning updates.
        include_classifier: also prune the task head (the layers outside ``model.base_model``).
        include_embeddings: also prune the ``nn.Embedding`` tables (word, position, token type).
    """

    def __init__(self, amount: float = 0.5, schedule: Literal["one_shot", "cubic"] = "one_shot",
                 start_step: int = 0, end_step: int | None = None, every_n_steps: int = 50,
                 include_classifier: bool = True, include_embeddings: bool = False):
        if not 0 <= amount <= 0.95:
            raise ValueError(f"MagnitudePruning.amount must be in [0, 0.95], got {amount}")
        # Flat keys, as in the configs and the saved config.yaml of earlier runs (which resume by comparing it).
        self.schedule = PruningSchedule(amount, schedule, start_step, end_step, every_n_steps, owner="MagnitudePruning")
        self.include_classifier = include_classifier
        self.include_embeddings = include_embeddings
        self.sparsity = 0.0  # sparsity reached so far; saved in checkpoints

    # ---- what to prune ----
    def parameters_to_prune(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of each layer whose ``weight`` is pruned. Override to choose other layers."""
        types = (nn.Linear, nn.Embedding) if self.include_embeddings else (nn.Linear,)
        encoder = getattr(model, "base_model", model)
        head = {id(m) for m in model.modules()} - {id(m) for m in encoder.modules()}
        return [(name, module) for name, module in model.named_modules()
                if isinstance(module, types) and (self.include_classifier or id(module) not in head)]

    def _targets(self, pl_module: LightningModule) -> list[tuple[str, nn.Module]]:
        return self.parameters_to_prune(pl_module.model)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Before any training: a model whose only nn.Linear is its head (a BiLSTM student) would have
        # its head pruned alone, and the run would report success.
        if stage != "fit":
            return
        names = [name for name, _ in self._targets(pl_module)]
        if not any(name.split(".")[0] not in _HEAD_NAMES for name in names):
            raise ValueError(f"MagnitudePruning: {type(pl_module.model).__name__} has no prunable layers outside its "
                             f"classification head (targets: {names or 'none'}); prune a transformer model, set "
                             "include_embeddings: true to prune its embedding table, or remove the callback")
        fold_masks_on_save(pl_module.model)

    # ---- pruning ----
    def _prune_to(self, pl_module: LightningModule, sparsity: float) -> None:
        targets = self._targets(pl_module)
        total = sum(m.weight.numel() for _, m in targets)
        already = sum(int((m.weight_mask == 0).sum()) for _, m in targets if prune.is_pruned(m))
        # An int amount prunes exactly that many of the still-unpruned weights, so the count is exact.
        extra = round(sparsity * total) - already
        if extra <= 0:
            return
        prune.global_unstructured([(m, "weight") for _, m in targets], prune.L1Unstructured, amount=extra)
        self.sparsity = sparsity
        self._log(pl_module, targets, announce=True)

    def _log(self, pl_module: LightningModule, targets, announce: bool = False) -> None:
        zeros = {name: int((m.weight == 0).sum()) for name, m in targets}
        total = sum(m.weight.numel() for _, m in targets)
        values = {"prune/sparsity": sum(zeros.values()) / total}
        values.update({f"prune/sparsity/{name}": zeros[name] / m.weight.numel() for name, m in targets})
        pl_module.log_dict(values, sync_dist=True)
        if announce:  # once per pruning step; the epoch-end logging only records the metrics
            rank_zero_info("pruned %d layers to %.2f%% global sparsity", len(targets),
                           100 * values["prune/sparsity"])

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs after a checkpoint is restored: rebuild the masks from the folded zeros when resuming.
        if self.sparsity > 0:
            for _, module in self._targets(pl_module):
                if not prune.is_pruned(module):
                    prune.custom_from_mask(module, "weight", mask=module.weight.detach() != 0)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        # With gradient accumulation a step runs several batches; _prune_to has nothing left to do after the first.
        if self.schedule.is_pruning_step(trainer.global_step):
            self._prune_to(pl_module, self.schedule.amount_at(trainer.global_step))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.sparsity > 0:
            self._log(pl_module, self._targets(pl_module))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before on_fit_end (the HF export and the test after fit): leave a plain model with zeros.
        if self.sparsity < self.schedule.amount:
            rank_zero_warn(f"training ended at {self.sparsity:.3f} sparsity, below the target {self.schedule.amount}: "
                           "set MagnitudePruning.end_step within the training steps")
        warn_if_best_is_early(trainer, self.schedule)
        for _, module in self._targets(pl_module):
            if prune.is_pruned(module):
                prune.remove(module, "weight")

    # ---- checkpoints (the model's state_dict folds the masks in: fold_masks_on_save, from setup) ----
    @override
    def state_dict(self) -> dict:
        return {"sparsity": self.sparsity}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.sparsity = state_dict["sparsity"]


def fold_masks(state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Replace each ``<name>_orig`` / ``<name>_mask`` pair of ``torch.nn.utils.prune`` in a state dict (its keys
    under ``prefix``) by the plain ``<name>`` with the zeros folded in, so that a checkpoint loads into a model
    without masks (HF export, test, a later run); the live model keeps its masks."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith("_orig")]:
        base = key.removesuffix("_orig")
        if base + "_mask" in state:
            state[base] = state.pop(key) * state.pop(base + "_mask")


def fold_masks_on_save(module: nn.Module) -> None:
    """Fold the masks into every ``state_dict`` of ``module`` from now on (``fold_masks``; once per module), and so
    into every checkpoint of a LightningModule holding it: weights-only ones too (``ModelCheckpoint``'s
    ``save_weights_only``), for which Lightning skips the callbacks' ``on_save_checkpoint``."""
    if not getattr(module, "_folds_masks", False):
        module.register_state_dict_post_hook(_fold_hook)
        module._folds_masks = True


def _fold_hook(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata) -> None:
    fold_masks(state, prefix)


def sparsity(module: nn.Module) -> float:
    """Share of exactly-zero entries over the ``weight`` tensors of the ``nn.Linear`` layers of ``module``.

    >>> layer = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    >>> sparsity(layer)
    0.75
    """
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))

