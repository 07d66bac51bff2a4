import itertools

import pytest

from emocompress.compression.pruning import MagnitudePruning
from emocompress.compression.schedule import PruningSchedule
from emocompress.compression.structured_pruning import StructuredPruning

# one_shot and cubic, with end_step on and off the every_n_steps grid
_SCHEDULES = [PruningSchedule(0.5, "one_shot", start_step=s) for s in (0, 3)] + [
    PruningSchedule(0.6, "cubic", start_step=s, end_step=s + length, every_n_steps=n)
    for s, length, n in itertools.product((0, 2), (1, 6, 7), (1, 2, 3, 50))]


def _pruning_steps(schedule, horizon=80):
    return [t for t in range(horizon) if schedule.is_pruning_step(t)]


@pytest.mark.parametrize("schedule", _SCHEDULES, ids=repr)
def test_prunes_from_start_step_to_end_step_and_reaches_the_amount_at_end_step(schedule):
    steps = _pruning_steps(schedule)
    assert steps[0] == schedule.start_step
    assert steps[-1] == schedule.final_step  # never after end_step, and always at it, on the grid or off it
    assert schedule.amount_at(schedule.final_step) == pytest.approx(schedule.amount)
    if schedule.kind == "cubic":
        on_grid = list(range(schedule.start_step, schedule.end_step, schedule.every_n_steps))
        assert steps == sorted(set(on_grid) | {schedule.end_step})
    amounts = [schedule.amount_at(t) for t in range(80)]
    first_nonzero = schedule.start_step + (schedule.kind == "cubic")  # the cubic rise starts from 0 at start_step
    assert not any(amounts[:first_nonzero]) and amounts[first_nonzero] > 0
    assert all(a <= b for a, b in zip(amounts, amounts[1:]))  # sparsity only rises
    assert set(amounts[schedule.final_step:]) == {schedule.amount}


@pytest.mark.parametrize("schedule", _SCHEDULES, ids=repr)
def test_next_pruning_step_is_the_first_pruning_step_after(schedule):
    steps = _pruning_steps(schedule)
    for t in range(80):
        assert schedule.next_pruning_step(t) == next((s for s in steps if s > t), None), t


def test_the_cubic_rise_is_zhu_and_gupta():
    schedule = PruningSchedule(0.8, "cubic", start_step=10, end_step=20, every_n_steps=5)
    assert schedule.amount_at(15) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert _pruning_steps(schedule) == [10, 15, 20]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "cubic"}, r"MagnitudePruning\.end_step must be set and > start_step \(0\) for the cubic schedule, "
                        "got None"),
    ({"kind": "cubic", "start_step": 5, "end_step": 5}, r"end_step must be set and > start_step \(5\)"),
    ({"start_step": -1}, r"MagnitudePruning\.start_step must be >= 0 and every_n_steps >= 1, got -1 and 50"),
    ({"every_n_steps": 0}, "every_n_steps >= 1"),
    ({"amount": 1.5}, r"MagnitudePruning\.amount must be in \[0, 1\], got 1.5"),
    ({"kind": "linear"}, r"MagnitudePruning\.schedule must be one_shot or cubic, got 'linear'"),
])
def test_bad_settings_name_the_owner_s_config_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningSchedule(owner="MagnitudePruning", **kwargs)


def test_both_pruning_callbacks_follow_the_one_schedule():
    keys = {"schedule": "cubic", "start_step": 2, "end_step": 9, "every_n_steps": 3}
    magnitude, structured = MagnitudePruning(amount=0.5, **keys), StructuredPruning(**keys)
    assert magnitude.schedule == PruningSchedule(0.5, "cubic", 2, 9, 3)
    assert structured.schedule == PruningSchedule(1.0, "cubic", 2, 9, 3)  # scaled by head_amount, ffn_amount
    assert _pruning_steps(magnitude.schedule) == _pruning_steps(structured.schedule) == [2, 5, 8, 9]
