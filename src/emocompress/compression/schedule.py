"""When the pruning callbacks prune, and how much: the one answer to "is this a pruning step"."""

from dataclasses import dataclass, field
from typing import Literal

from lightning.pytorch.utilities import rank_zero_warn

from emocompress.models.checkpoints import read_checkpoint


@dataclass(frozen=True)
class PruningSchedule:
    """The optimizer steps at which a pruning callback prunes, and the share pruned by each step.

    ``one_shot`` prunes once, to ``amount``, at ``start_step``. ``cubic`` follows Zhu & Gupta (2017), "To prune,
    or not to prune": ``s_t = amount * (1 - (1 - (t - start_step) / (end_step - start_step)) ** 3)``, rising fast
    first and flattening as ``end_step`` nears, when the network has fewer redundant weights left to lose. It
    updates every ``every_n_steps`` steps from ``start_step``, and always at ``end_step``, never after it.

    Pruning at ``end_step`` even when it is off the ``every_n_steps`` grid is the rule because ``end_step`` is
    where the schedule promises ``amount``: ``StructuredPruning`` rebuilds its layers smaller there, and the
    advice to keep ``end_step`` in the first epoch (so that checkpoints chosen on validation are at the final
    sparsity) holds only if the final sparsity is reached at ``end_step``, not at the next grid step or never.

    The callbacks build it from their own flat config keys (``schedule``, ``start_step``, ``end_step``,
    ``every_n_steps``), so ``schedule`` there is this object's ``kind``.

    Args:
        amount: final share pruned, in [0, 1]. ``StructuredPruning`` keeps the default 1.0 and scales
            ``amount_at`` by its own two amounts (heads, FFN neurons).
        kind: ``one_shot`` or ``cubic``.
        start_step: optimizer step of the first pruning, >= 0 (0: before the first step).
        end_step: with ``cubic``, the step at which ``amount`` is reached (> ``start_step``); ignored by ``one_shot``.
        every_n_steps: with ``cubic``, steps between pruning updates, >= 1.
        owner: the callback whose config keys these are, named in error messages.

    Raises:
        ValueError: a setting out of range, or ``cubic`` without ``end_step`` > ``start_step``.

    >>> cubic = PruningSchedule(0.5, "cubic", start_step=0, end_step=100, every_n_steps=30)
    >>> [t for t in range(300) if cubic.is_pruning_step(t)]  # 100 is off the grid of 30 and still a pruning step
    [0, 30, 60, 90, 100]
    >>> [round(cubic.amount_at(t), 3) for t in (0, 50, 100, 200)]
    [0.0, 0.438, 0.5, 0.5]
    >>> one_shot = PruningSchedule(0.5, start_step=10)
    >>> [t for t in range(300) if one_shot.is_pruning_step(t)], one_shot.amount_at(9), one_shot.amount_at(10)
    ([10], 0.0, 0.5)
    """

    amount: float = 1.0
    kind: Literal["one_shot", "cubic"] = "one_shot"
    start_step: int = 0
    end_step: int | None = None
    every_n_steps: int = 50
    owner: str = field(default="PruningSchedule", compare=False, repr=False)

    def __post_init__(self):
        if not 0 <= self.amount <= 1:
            raise ValueError(f"{self.owner}.amount must be in [0, 1], got {self.amount}")
        if self.kind not in ("one_shot", "cubic"):
            raise ValueError(f"{self.owner}.schedule must be one_shot or cubic, got {self.kind!r}")
        if self.start_step < 0 or self.every_n_steps < 1:
            raise ValueError(f"{self.owner}.start_step must be >= 0 and every_n_steps >= 1, got {self.start_step} "
                             f"and {self.every_n_steps}")
        if self.kind == "cubic" and (self.end_step is None or self.end_step <= self.start_step):
            raise ValueError(f"{self.owner}.end_step must be set and > start_step ({self.start_step}) for the cubic "
                             f"schedule, got {self.end_step}")

    @property
    def final_step(self) -> int:
        """The step at which ``amount`` is reached: the last pruning step."""
        return self.start_step if self.kind == "one_shot" else self.end_step

    def is_pruning_step(self, step: int) -> bool:
        """Whether the callback prunes at optimizer step ``step`` (to ``amount_at(step)``)."""
        if step == self.final_step:
            return True
        return (self.kind == "cubic" and self.start_step <= step < self.end_step
                and (step - self.start_step) % self.every_n_steps == 0)

    def next_pruning_step(self, step: int) -> int | None:
        """The first pruning step after ``step``, or None when pruning is over.

        >>> s = PruningSchedule(kind="cubic", start_step=4, end_step=10, every_n_steps=3)
        >>> [s.next_pruning_step(t) for t in (0, 4, 5, 7, 9, 10)]
        [4, 7, 7, 10, 10, None]
        """
        if step < self.start_step:
            return self.start_step
        if step >= self.final_step:
            return None
        on_grid = self.start_step + ((step - self.start_step) // self.every_n_steps + 1) * self.every_n_steps
        return min(on_grid, self.end_step)

    def amount_at(self, step: int) -> float:
        """Share of the weights (units) to have pruned at ``step``: 0 before ``start_step``, ``amount`` from
        ``final_step`` on."""
        if step < self.start_step:
            return 0.0
        if self.kind == "one_shot":
            return self.amount
        progress = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return self.amount * (1 - (1 - progress) ** 3)


def warn_if_best_is_early(trainer, schedule: PruningSchedule) -> None:
    """Warn when the best checkpoint (what ``HFExport``, ``OnnxExport`` and the test after ``fit`` use) was saved
    at or before ``schedule.final_step``, so before the final pruning: that model is less pruned than the run
    reports. (A checkpoint at global step N holds N steps; the pruning of step N comes before step N runs.)"""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if not best or trainer.global_step <= schedule.final_step:  # short runs have the callbacks' own warning
        return
    step = read_checkpoint(best).get("global_step", schedule.final_step + 1)
    if step <= schedule.final_step:
        rank_zero_warn(f"{schedule.owner}: the best checkpoint ({best}) is from step {step}, before the end of the "
                       f"pruning schedule (step {schedule.final_step}): the exports and the test after fit use it, "
                       f"less pruned than the target; end the schedule within the first epoch (before the first "
                       "checkpoint)")
