"""How a search chooses, on val: the trials within the budget, their latency timed again together with the
teacher's (``retime``), the Pareto front of val macro F1 against the objective, and its cheapest member."""

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from emocompress.benchmark.variants import data_labels
from emocompress.search.trials import Shared, retime_latency

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The front (cheapest first), the chosen trial (its first member; None: no trial within budget), and the
    re-timed val latencies (name -> ms, None if not re-timed)."""

    front: list
    chosen: optuna.trial.FrozenTrial | None
    retimed: dict[str, float] | None

    def cost(self, trial: optuna.trial.FrozenTrial) -> float | None:
        """The re-timed latency the choice used for ``trial``, None if it used the trial's first timing."""
        return self.retimed.get(timing_name(trial)) if self.retimed else None


def timing_name(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's name among the re-timed models (``trial 4``; the teacher's is ``teacher``)."""
    return f"trial {trial.number}"


def choose(trials: list[optuna.trial.FrozenTrial], reference: dict, budget, shared: Shared,
           trust_remote_code: bool = False) -> Choice:
    """Re-time (``retime``), then the front and its cheapest member: at equal cost the higher F1 dominates, so
    no tie is left."""
    retimed = retime(trials, reference, budget, shared, trust_remote_code)
    front = pareto_front(trials, (lambda t: retimed[timing_name(t)]) if retimed else None)
    return Choice(front, front[0] if front else None, retimed)


def within_budget(trial: optuna.trial.FrozenTrial) -> bool:
    gaps = trial.user_attrs.get("gaps")
    return trial.state == TrialState.COMPLETE and bool(gaps) and all(g <= 1e-12 for g in gaps.values())


def candidates(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials a choice is made among: within budget, one per distinct setting (a repeat of a measured setting
    is the same model)."""
    return [t for t in trials if within_budget(t) and "same_as" not in t.user_attrs]


def pareto_front(trials: list[optuna.trial.FrozenTrial],
                 cost: Callable[[optuna.trial.FrozenTrial], float] | None = None) -> list[optuna.trial.FrozenTrial]:
    """The ``candidates`` no other one beats on both val macro F1 and the objective, cheapest first. ``cost``:
    a candidate's objective to use instead of its own (the re-timed latency)."""
    feasible = candidates(trials)
    point = {t.number: (t.values[0], cost(t) if cost else t.values[1]) for t in feasible}
    return sorted((t for t in feasible if not any(
        point[o.number][0] >= point[t.number][0] and point[o.number][1] <= point[t.number][1]
        and point[o.number] != point[t.number] for o in feasible)), key=lambda t: point[t.number][1])


def retime(trials: list[optuna.trial.FrozenTrial], reference: dict, budget, shared: Shared,
           trust_remote_code: bool) -> dict[str, float] | None:
    """With ``objective: latency``, the val latency of the teacher and of every ``candidates`` trial timed again
    together, in ``budget.retime_rounds`` interleaved rounds in this process (``trials.retime_latency``): name
    (``teacher``, ``trial 4``) -> median ms. Each trial's first timing was taken alone when it ended, beside
    whatever the machine did then (other trials' fits), so those are not comparable. None: nothing to re-time
    (objective size, no trial within budget), or a candidate's model is not in this search folder (a trial of
    another machine): the choice then uses the first timings, and a warning says so."""
    chosen_among = candidates(trials)
    if budget.objective != "latency" or not chosen_among:
        return None
    elsewhere = [t.number for t in chosen_among if not Path(t.user_attrs["artifact"]).exists()]
    if elsewhere:
        log.warning("compress: cannot re-time trials %s: their models are not in %s (another machine ran them); "
                    "choosing by the latency each trial measured alone when it ended", elsewhere, shared.out_dir)
        return None
    paths = {"teacher": shared.teacher, **{timing_name(t): t.user_attrs["artifact"] for t in chosen_among}}
    log.info("compress: re-timing the teacher and the %d trials within budget on val in %d interleaved rounds",
             len(chosen_among), budget.retime_rounds)
    times = retime_latency(paths, shared.data, data_labels(shared.data), budget.batch_size, budget.latency_samples,
                           budget.warmup, budget.retime_rounds, trust_remote_code=trust_remote_code)
    first = {"teacher": reference["latency_ms"], **{timing_name(t): t.user_attrs["val"]["latency_ms"]
                                                    for t in chosen_among}}
    log.info("compress: val latency at batch %d, timed alone -> re-timed together: %s", budget.batch_size,
             ", ".join(f"{name} {first[name]:.3g} -> {ms:.3g} ms" for name, ms in times.items()))
    return times
