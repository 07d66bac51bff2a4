"""Early stopping of hopeless trials: ``HopelessTrialStop``, stacked onto every trial's fit by the search.

Optuna's own pruning (``trial.report`` / ``should_prune``, and its Lightning integration) is for single-objective
studies only; ours has two objectives. So the decision is made inside the fit, from the budget alone: a trial
whose val macro F1 after epoch k is already far below what the budget allows is stopped, and the search records it
as pruned. The margin keeps students that start slowly (more epochs would lift them) alive.
"""

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from emocompress.io import atomic_write_text, json_text, run_dir

# Written into the run folder of a stopped fit: the search reads it to record the trial as pruned.
STOPPED_FILE = "stopped_early.json"


class HopelessTrialStop(Callback):
    """Stops the fit after a validation (from epoch ``after_epoch`` on, counting from 1) whose ``monitor`` is
    below ``min_value``, and writes ``stopped_early.json`` (epoch, value, threshold) into the run folder.

    Args:
        min_value: the least val value a trial may have and go on: the budget's macro F1 minus a margin.
        after_epoch: the first epoch (from 1) checked; earlier ones are too early to judge.
        monitor: the logged val metric.
    """

    def __init__(self, min_value: float, after_epoch: int = 1, monitor: str = "val/macro_f1"):
        if after_epoch < 1:
            raise ValueError(f"HopelessTrialStop.after_epoch must be at least 1, got {after_epoch}")
        self.min_value = min_value
        self.after_epoch = after_epoch
        self.monitor = monitor

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or epoch < self.after_epoch or float(value) >= self.min_value:
            return
        trainer.should_stop = True
        folder = run_dir(trainer)
        if trainer.is_global_zero:
            atomic_write_text(folder / STOPPED_FILE, json_text(
                {"epoch": epoch, self.monitor: float(value), "min_value": self.min_value}, indent=2))
