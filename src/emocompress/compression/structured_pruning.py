"""Structured pruning of ``pl_module.model``: whole attention heads and FFN neurons removed, the layers
rebuilt smaller, recovery fine-tuning in the same fit."""

from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.utils import prune
from typing_extensions import override

from emocompress.compression.pruning import fold_masks_on_save
from emocompress.compression.schedule import PruningSchedule, warn_if_best_is_early
from emocompress.models import structure

_KINDS = {"heads": ("heads",), "ffn": ("ffn",), "both": ("heads", "ffn")}


class StructuredPruning(Callback):
    """Removes the least important attention heads and FFN neurons of ``pl_module.model`` (a BERT-, RoBERTa-
    or DistilBERT-style encoder), then lets the rest of ``fit`` recover the accuracy.

    A head is its rows of the query/key/value projections and its columns of the attention output
    projection; an FFN neuron is a row of the up-projection and a column of the down-projection. Removed
    units are first held at exactly zero by ``torch.nn.utils.prune`` masks; once the final amount is
    reached the linear layers are rebuilt smaller (optimizer state moved along), so the rest of recovery
    already runs on the smaller model. Under a multi-process strategy (DDP) the rebuild waits for the end
    of training, as a model must not change its parameters under DDP; until then masks hold the zeros.

    Importance (ranked among the units still kept):

    - ``magnitude``: sum of absolute weights of the unit (all four matrices).
    - ``taylor``: first-order Taylor importance ``|sum(activation * gradient)|`` of the unit's output,
      accumulated over the ``score_batches`` optimizer steps before each pruning step, each scored once from
      its whole gradient (all its accumulated batches, unscaled under AMP) (Michel et al.
      2019, "Are Sixteen Heads Really Better than One?"; Molchanov et al. 2019), read from the gradients
      training computes anyway (``_taylor_scores``). Scores are averaged across DDP ranks.

    With ``scope: global`` units compete across layers (scores normalised by each layer's L2 norm, as
    Michel et al.), so layers end with different widths; ``per_layer`` removes the same share from each.
    The last head and the last neuron of a layer are never removed.

    Keep ``start_step`` (``end_step`` with ``cubic``) within the first epoch, so that every checkpoint chosen on
    validation is at the final shape. Exports record the per-layer shape in ``config.json``; load them with
    ``emocompress.models.pretrained.load_model`` (every model path of the project does). onnxruntime fuses attention
    only when every layer kept as many heads (``scope: per_layer``).

    Logs ``prune/heads`` and ``prune/ffn``: the share of each removed so far.

    Args:
        units: what to remove: ``heads``, ``ffn`` (neurons) or ``both``.
        head_amount: final share of all attention heads removed, in [0, 1).
        ffn_amount: final share of all FFN neurons removed, in [0, 1).
        importance: ``magnitude`` or ``taylor``.
        score_batches: with ``taylor``, optimizer steps whose gradients score the units before each pruning (one
            batch each without gradient accumulation).
        scope: ``global`` (rank across layers) or ``per_layer`` (the same share in every layer).
        schedule: ``one_shot`` removes everything at ``start_step``; ``cubic`` raises the removed share from 0
            at ``start_step`` to the amounts at ``end_step`` (Zhu & Gupta 2017), every ``every_n_steps`` steps and
            at ``end_step`` (see ``PruningSchedule``).
        start_step: optimizer step of the first pruning (with ``taylor``, at least ``score_batches``).
        end_step: with ``cubic``, the step at which the amounts are reached.
        every_n_steps: with ``cubic``, steps between pruning updates.
    """

    def __init__(self, units: Literal["heads", "ffn", "both"] = "both", head_amount: float = 0.5,
                 ffn_amount: float = 0.5, importance: Literal["magnitude", "taylor"] = "magnitude",
                 score_batches: int = 32, scope: Literal["global", "per_layer"] = "global",
                 schedule: Literal["one_shot", "cubic"] = "one_shot", start_step: int = 0,
                 end_step: int | None = None, every_n_steps: int = 50):
        for name, amount in (("head_amount", head_amount), ("ffn_amount", ffn_amount)):
            if not 0 <= amount < 1:
                raise ValueError(f"StructuredPruning.{name} must be in [0, 1), got {amount}")
        # amount 1.0: amount_at gives the share of the way to each kind's amount (self.amounts scales it).
        self.schedule = PruningSchedule(1.0, schedule, start_step, end_step, every_n_steps, owner="StructuredPruning")
        if score_batches < 1:
            raise ValueError(f"StructuredPruning.score_batches must be >= 1, got {score_batches}")
        if importance == "taylor" and start_step < score_batches:
            raise ValueError(f"StructuredPruning.start_step ({start_step}) must be >= score_batches ({score_batches}) "
                             "with importance: taylor, which scores units on the batches before it prunes")
        self.units = units
        self.amounts = {"heads": head_amount if "heads" in _KINDS[units] else 0.0,
                        "ffn": ffn_amount if "ffn" in _KINDS[units] else 0.0}
        self.importance = importance
        self.score_batches = score_batches
        self.scope = scope
        # Saved in checkpoints: per kind, one bool vector per layer over the units it had when pruning began.
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.rebuilt = False
        self._scores: dict[str, list[torch.Tensor]] = {}
        self._last_step = -1

    # ---- hooks ----
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            layers = structure.layers(pl_module.model)
        except ValueError as err:
            raise ValueError(f"StructuredPruning: {err}; remove the callback or prune a transformer student") from err
        if not self.kept:  # not restored from a checkpoint
            self.kept = {"heads": [torch.ones(layer.heads, dtype=torch.bool) for layer in layers],
                         "ffn": [torch.ones(layer.ffn, dtype=torch.bool) for layer in layers]}
        fold_masks_on_save(pl_module.model)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Resuming mid-recovery: the checkpoint holds the zeros folded in; hold them with masks again.
        if not self.rebuilt and any((~k).any() for kept in self.kept.values() for k in kept):
            _apply_masks(pl_module.model, self.kept)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # Once per step, not after each backward: with gradient accumulation each backward's .grad also holds the
        # step's earlier batches (counted again), and under fp16 AMP it is still multiplied by the loss scale,
        # which changes between steps. Here the gradient is the step's whole one, unscaled by Lightning.
        step, upcoming = trainer.global_step, self.schedule.next_pruning_step(trainer.global_step)
        if self.importance == "taylor" and not self.rebuilt and upcoming is not None \
                and upcoming - step <= self.score_batches:
            self._scores = _add_scores(self._scores, _taylor_scores(pl_module.model))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.rebuilt or step == self._last_step or not self.schedule.is_pruning_step(step):
            return  # (gradient accumulation runs several batches per step)
        self._last_step = step
        scores = self._scores if self.importance == "taylor" else _magnitude_scores(pl_module.model)
        if not scores:  # resumed just before a pruning step: no gradients scored since
            rank_zero_warn("StructuredPruning: no Taylor scores were accumulated before this step; using magnitude")
            scores = _magnitude_scores(pl_module.model)
        self._scores = {}
        scores = _mean_across_ranks(trainer.strategy, {k: v for k, v in scores.items() if self.amounts[k] > 0},
                                    pl_module.device)
        removed = [_remove_lowest(self.kept[kind], scores[kind], self.amounts[kind] * self.schedule.amount_at(step),
                                  self.scope) for kind in scores]  # a list, not any(...): every kind prunes
        if any(removed):
            _apply_masks(pl_module.model, self.kept)
            _log_removed(pl_module, self.kept)
        if step >= self.schedule.final_step and not isinstance(trainer.strategy, ParallelStrategy):
            self._rebuild(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log_dict(_removed_shares(self.kept))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before on_fit_end (the HF export and the test after fit): leave a plain, smaller model.
        if trainer.global_step < self.schedule.final_step:
            rank_zero_warn(f"StructuredPruning: training ended with {_removed_shares(self.kept)} removed, short of "
                           f"the targets {self.amounts}: set start_step/end_step within the training steps")
        warn_if_best_is_early(trainer, self.schedule)
        if not self.rebuilt:
            self._rebuild(trainer, pl_module)

    def _rebuild(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _rebuild_layers(pl_module.model, self.kept, trainer.optimizers)
        self.rebuilt = True

    # ---- checkpoints ----
    @override
    def state_dict(self) -> dict:
        return {"kept": {kind: [k.tolist() for k in kept] for kind, kept in self.kept.items()},
                "rebuilt": self.rebuilt}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.kept = {kind: [torch.tensor(k, dtype=torch.bool) for k in kept]
                     for kind, kept in state_dict["kept"].items()}
        self.rebuilt = state_dict["rebuilt"]


# ---- scoring: per kind ("heads", "ffn"), one score vector per layer ----
def _magnitude_scores(model) -> dict[str, list[torch.Tensor]]:
    """Per layer, the sum of absolute weights of each head (H,) and FFN neuron (N,)."""
    scores = {"heads": [], "ffn": []}
    for layer in structure.layers(model):
        totals = {"heads": 0, "ffn": 0}
        for module, dim, kind in layer.linears().values():
            totals[kind] = totals[kind] + module.weight.detach().abs().sum(1 - dim).float().cpu()
        scores["heads"].append(totals["heads"].view(layer.heads, layer.head_size).sum(1))
        scores["ffn"].append(totals["ffn"])
    return scores


def _taylor_scores(model) -> dict[str, list[torch.Tensor]]:
    """Per layer, ``|sum(output * dL/doutput)|`` of each head (H,) and FFN neuron (N,) for this batch: the
    output projections' ``weight * grad`` summed over their columns of each unit."""
    scores = {"heads": [], "ffn": []}
    for layer in structure.layers(model):
        for kind, path in (("heads", layer.fam.attention_out), ("ffn", layer.fam.ffn_out)):
            module = layer.get(path)
            param = getattr(module, "weight_orig", module.weight)  # the leaf that holds .grad under a mask
            if param.grad is None:
                return {}
            per_column = (module.weight.detach() * param.grad).sum(0).float()  # (in_features,)
            if not torch.isfinite(per_column).all():  # a step fp16 AMP skips (inf gradients): not scored
                return {}
            if kind == "heads":
                per_column = per_column.view(layer.heads, layer.head_size).sum(1)
            scores[kind].append(per_column.abs().cpu())
    return scores


def _add_scores(total: dict[str, list[torch.Tensor]], new: dict[str, list[torch.Tensor]]) -> dict:
    """``total`` plus one batch's scores ``new``, layer by layer (Taylor scores add up over batches).

    >>> _add_scores({}, {"ffn": [torch.tensor([1., 2.])]})
    {'ffn': [tensor([1., 2.])]}
    >>> _add_scores({"ffn": [torch.tensor([1., 2.])]}, {"ffn": [torch.tensor([3., 0.])]})
    {'ffn': [tensor([4., 2.])]}
    """
    return {**total, **{kind: [t + v for t, v in zip(total[kind], values)] if kind in total else values
                        for kind, values in new.items()}}


def _mean_across_ranks(strategy, scores: dict[str, list[torch.Tensor]], device: torch.device) -> dict:
    """``scores`` averaged over the processes of ``strategy`` (a collective: every rank calls it, kind by kind
    in the same order), so that every DDP rank removes the same units."""
    means = {}
    for kind, per_layer in scores.items():
        mean = strategy.reduce(torch.cat(per_layer).to(device), reduce_op="mean").cpu()
        means[kind] = list(mean.split([len(s) for s in per_layer]))
    return means


# ---- choosing what to remove: per layer, a bool vector over the units it had when pruning began ----
def _remove_lowest(kept: list[torch.Tensor], scores: list[torch.Tensor], share: float,
                   scope: Literal["global", "per_layer"]) -> bool:
    """Mark the lowest-scoring kept units removed (``False`` in ``kept``, in place) until ``share`` of them
    is: ranked across layers (``global``, each layer's scores divided by their L2 norm over its kept units,
    as Michel et al. 2019) or within each layer (``per_layer``). The last unit of a layer is never removed.

    Returns:
        True if any unit was removed.

    >>> kept = [torch.ones(2, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    >>> _remove_lowest(kept, [torch.tensor([1., 3.]), torch.tensor([4., 1., 2., 3.])], 0.5, "per_layer"), kept
    (True, [tensor([False,  True]), tensor([ True, False, False,  True])])
    >>> _remove_lowest(kept, [torch.tensor([1., 3.]), torch.tensor([4., 1., 2., 3.])], 0.5, "per_layer")
    False
    """
    if scope == "per_layer":
        wanted = [round(share * len(k)) - int((~k).sum()) for k in kept]
    else:
        scores = [s / s[k].norm().clamp(min=1e-12) for s, k in zip(scores, kept)]
        wanted = [round(share * sum(len(k) for k in kept)) - sum(int((~k).sum()) for k in kept)]
    if max(wanted) <= 0:
        return False
    pools = [range(len(kept))] if scope == "global" else [[i] for i in range(len(kept))]
    for pool, n in zip(pools, wanted):
        candidates = sorted((float(scores[i][j]), i, j) for i in pool for j in kept[i].nonzero().flatten().tolist())
        for _, i, j in candidates:
            if n <= 0:
                break
            if kept[i].sum() > 1:  # never the last head or neuron of a layer
                kept[i][j] = False
                n -= 1
    return True


def _removed_shares(kept: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The share of each kind removed so far, as logged: ``{"prune/heads": ..., "prune/ffn": ...}``.

    >>> _removed_shares({"heads": [torch.tensor([True, False]), torch.tensor([True, True])]})
    {'prune/heads': 0.25}
    """
    return {f"prune/{kind}": sum(int((~k).sum()) for k in layers) / max(1, sum(len(k) for k in layers))
            for kind, layers in kept.items()}


def _log_removed(pl_module, kept: dict[str, list[torch.Tensor]]) -> None:
    pl_module.log_dict(_removed_shares(kept))
    rank_zero_info("StructuredPruning: removed %s; heads/FFN neurons kept per layer: %s",
                   {k: round(v, 3) for k, v in _removed_shares(kept).items()},
                   [(int(h.sum()), int(f.sum())) for h, f in zip(kept["heads"], kept["ffn"])])


# ---- masks, then rebuilding the layers and the optimizer state ----
def _apply_masks(model, kept: dict[str, list[torch.Tensor]]) -> None:
    """Hold the removed units of ``model`` at exactly zero with ``torch.nn.utils.prune`` masks."""
    for layer, heads, ffn in zip(structure.layers(model), kept["heads"], kept["ffn"]):
        rows = {"heads": heads.repeat_interleave(layer.head_size), "ffn": ffn}
        for module, dim, kind in layer.linears().values():
            keep = rows[kind].to(module.weight.device)
            _set_mask(module, "weight", keep[:, None] if dim == 0 else keep[None, :])
            if dim == 0:
                _set_mask(module, "bias", keep)


def _rebuild_layers(model, kept: dict[str, list[torch.Tensor]], optimizers: list[torch.optim.Optimizer]) -> None:
    """Replace ``model``'s masked layers by smaller ones and move the optimizers' parameters and state along."""
    for module in model.modules():
        for name in ("weight", "bias"):
            if hasattr(module, f"{name}_mask"):
                prune.remove(module, name)
    moved = structure.keep_units(model, kept["heads"], kept["ffn"])
    for optimizer in optimizers:
        _move_optimizer_state(optimizer, moved)
    rank_zero_info("StructuredPruning: rebuilt the layers smaller, heads/FFN neurons per layer: %s",
                   [(s["heads"], s["ffn"]) for s in structure.shape(model)])


def _set_mask(module, name: str, keep: torch.Tensor) -> None:
    """Hold ``module.<name>`` at zero where ``keep`` (broadcast to its shape) is False."""
    mask = keep.expand_as(getattr(module, name)).to(getattr(module, name).dtype)
    if hasattr(module, f"{name}_mask"):
        getattr(module, f"{name}_mask").copy_(mask)
    else:
        prune.custom_from_mask(module, name, mask)


def _move_optimizer_state(optimizer: torch.optim.Optimizer, moved: dict) -> None:
    """Point ``optimizer`` at the rebuilt layers' parameters, keeping the kept units' AdamW moments."""
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if id(param) not in moved:
                continue
            new, index, dim = moved[id(param)]
            state = optimizer.state.pop(param, None)
            group["params"][i] = new
            if state is not None:
                optimizer.state[new] = {k: v.index_select(dim, index) if index is not None and torch.is_tensor(v)
                                        and v.shape == param.shape else v for k, v in state.items()}
