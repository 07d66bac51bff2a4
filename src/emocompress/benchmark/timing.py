"""Timing models: interleaved rounds of calls in one process, so drift of a shared machine hits every model alike."""

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from emocompress.benchmark.variants import Variant


@torch.inference_mode()
def time_calls(fn, inputs: list, warmup: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Time in ms of ``fn(x)`` for each ``x`` of ``inputs``, after ``warmup`` untimed calls.

    ``clock`` is a seconds counter: wall time by default; ``time.thread_time`` counts only this thread's CPU time,
    which other processes on a shared machine barely change (but which misses work on the runtime's own threads).
    """
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs:
        start = clock()
        fn(x)
        times.append((clock() - start) * 1e3)
    return times


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, as numpy's default).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 90)
    (2.5, 3.7)
    """
    return round(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item(), 10)


def median_of_rounds(rounds: list[list[float]]) -> float:
    """The median over rounds of each round's median: one busy round moves it no more than one value.

    >>> median_of_rounds([[1.0, 2.0, 9.0], [1.0, 3.0, 3.0], [50.0, 60.0, 70.0]])
    3.0
    """
    return percentile([percentile(r, 50) for r in rounds], 50)


def interleaved_times(fns: dict[str, Callable], inputs: list, rounds: int, warmup: int,
                      around: Callable[[str], AbstractContextManager] | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[list[float]]]:
    """Time several models on the same inputs in interleaved rounds, in this process and thread setting.

    First every ``fn`` makes ``warmup`` untimed calls (on ``inputs[:warmup]``). Then, ``rounds`` times, every
    ``fn`` is called once on each of ``inputs`` in turn (``time_calls``), variants one after the other; round
    ``r`` starts with the ``r``-th variant, so none is always first or always after the same one. Slow drift of
    a shared machine (other jobs, clock throttling) then hits every variant alike instead of whichever ran
    during the busy minutes.

    Args:
        fns: name -> callable of one input.
        inputs: what each callable gets, in order.
        rounds: rounds of timing, at least 1.
        warmup: untimed calls per callable before the first round.
        around: name -> a context manager entered around each of that callable's stretches of timed calls (an
            energy meter, ``emocompress.evaluation.energy.TaskEnergy.measure``); its own cost is outside the times.
        clock: what a call's time is read from (``time_calls``): wall time by default.

    Returns:
        name -> one list per round of per-call times in ms, ``(rounds, len(inputs))``.
    """
    names = list(fns)
    for name in names:
        for x in inputs[:warmup]:
            fns[name](x)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with around(name) if around is not None else nullcontext():
                times[name].append(time_calls(fns[name], inputs, warmup=0, clock=clock))
    return times


def time_variants(variants: list[Variant], rounds: int, warmup: int,
                  energy: bool = True) -> dict[str, dict[str, float]]:
    """Latency (batch 1) and throughput (batches) of each variant's first run, in interleaved rounds, and with
    ``energy`` the energy of those timed calls (codecarbon, ``emocompress.evaluation.energy``).

    Returns:
        name -> ``latency_ms_median`` (median over rounds of each round's median), ``latency_ms_min``/``_max``
        (the least and greatest round median), ``latency_ms_p90`` (over all timed calls), ``throughput_per_s``
        (median over rounds of texts / total model time of a pass over the split) and its ``_min``/``_max``; with
        ``energy``: ``energy_kwh_per_1k`` (kWh per 1,000 texts predicted in the throughput batches),
        ``energy_kwh_per_1k_batch1`` (one text at a time) and ``energy_method`` (``measured`` or ``estimated``).
    """
    from emocompress.evaluation.energy import TaskEnergy

    meter = TaskEnergy() if energy else None
    singles = {v.name: (lambda i, v=v: v.forward(v.singles[i])) for v in variants}
    n_singles = min(len(v.singles) for v in variants)
    latency = interleaved_times(singles, list(range(n_singles)), rounds, warmup,
                                around=(lambda name: meter.measure(f"batch1/{name}")) if energy else None)
    batched = {v.name: (lambda i, v=v: v.forward(v.batches[i])) for v in variants}
    # every variant's batches hold the same texts; warm-up here is one batch, the singles already warmed up
    throughput = interleaved_times(batched, list(range(len(variants[0].batches))), rounds, warmup=1,
                                   around=meter.measure if energy else None)
    timing = {}
    for v in variants:
        medians = [percentile(r, 50) for r in latency[v.name]]
        per_s = [len(v.target) / (sum(r) / 1e3) for r in throughput[v.name]]
        timing[v.name] = {"latency_ms_median": median_of_rounds(latency[v.name]), "latency_ms_min": min(medians),
                          "latency_ms_max": max(medians),
                          "latency_ms_p90": percentile([t for r in latency[v.name] for t in r], 90),
                          "throughput_per_s": percentile(per_s, 50), "throughput_min_per_s": min(per_s),
                          "throughput_max_per_s": max(per_s)}
        if energy:
            timing[v.name] |= {"energy_kwh_per_1k": 1e3 * meter.kwh[v.name] / (rounds * len(v.target)),
                               "energy_kwh_per_1k_batch1": 1e3 * meter.kwh[f"batch1/{v.name}"] / (rounds * n_singles),
                               "energy_method": meter.method}
    return timing
