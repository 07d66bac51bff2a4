"""``emocompress compress``: the fastest (or smallest) model that keeps the teacher's accuracy within a budget, found
by an Optuna search over the existing recipes, selected on val, judged once on test.

    emocompress compress -c configs/compress.yaml --teacher logs/teacher/version_0/hf_model \\
        --data ../shared/data/emotion --out_dir logs/compress

The study has two objectives (val macro F1, up; latency or size at the target batch size, down); the budget's limits
are Optuna constraints (``Trial.set_constraint``, read by the TPE sampler), so the sampler learns where the feasible region
is, and the choice is the fastest feasible trial. It is stored in ``<out_dir>/study.db`` (SQLite) unless
``--storage`` names another RDB URL (``postgresql+psycopg://user:pass@host/db`` for workers on several
machines): a killed search run again resumes, finished trials are not redone, and several workers share one study.
"""

import json
import logging
import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Callable
from itertools import product
from pathlib import Path

import optuna
from optuna.trial import TrialState

from emocompress.benchmark.variants import data_labels
from emocompress.io import atomic_write_text, check_can_create, json_text
from emocompress.models.checkpoints import read_checkpoint
from emocompress.search import choice, report, trials
from emocompress.search.space import (
    Budget,
    Dimension,
    check_settings,
    fit_key,
    read_budget,
    read_space,
    unavailable_lines,
)
from emocompress.search.storage import open_storage, open_study, sampler, stored_trials
from emocompress.search.trials import Shared, run_fit

log = logging.getLogger(__name__)
DEFAULT_BASE = ("configs/trainer/default.yaml", "configs/recipes/distill.yaml")
TEACHER_FILE = "teacher_val.json"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialFailed(Exception):
    """A trial's fit (or test) exited with an error (its ``fit.log``/``test.log`` says why): recorded as failed, the
    search goes on."""


def compress(teacher: str, data: str, space: list[dict], budget: dict, base: list[str] | None = None,
             args: list[str] | None = None, first: list[dict] | None = None, out_dir: str = "logs/compress",
             storage: str | None = None, study_name: str = "compress", workers: int = 1, seed: int = 42,
             test_verdict: bool = True, verdict: dict | None = None, trust_remote_code: bool = False,
             test_base: list[str] | None = None) -> dict:
    """Search the ``space`` for the fastest model within the ``budget`` of the ``teacher``'s val accuracy.

    Args:
        teacher: the fine-tuned teacher: an ``hf_model`` export folder or a classifier ``.ckpt``.
        data: the data folder (train/val/test), as ``data.data`` of a fit.
        space: the dimensions and their options (``search.space``; configs/compress.yaml).
        budget: the accuracy limits, objective and length of the search (``search.space.Budget``).
        base: the configs every trial's fit starts from (paths relative to where the command runs); default
            configs/trainer/default.yaml and configs/recipes/distill.yaml.
        args: arguments added to every trial's fit, last (e.g. ``[--trainer.max_epochs, "2"]``).
        first: settings (dimension -> option) run before the sampler chooses: the cheap ones, so the
            feasible region is known early.
        out_dir: the search folder: the study, one run folder per trial under ``trials/``, the report.
        storage: an Optuna RDB URL; default ``sqlite:///<out_dir>/study.db``. For workers on several machines, a
            PostgreSQL database: ``postgresql+psycopg://user:password@host/dbname`` (docs/search.md).
        study_name: the study's name in the storage.
        workers: processes searching at once (each trial's fit is a process of its own); on one machine every
            trial's latency is then measured while others train.
        seed: the sampler's seed (worker ``i`` uses ``seed + i``) and every trial's ``seed_everything``.
        test_verdict: measure the chosen model and the Pareto front once on test with ``emocompress benchmark``.
        verdict: settings of that benchmark (``latency_samples``, ``rounds``, ``bootstrap``, ``num_threads``, ...).
        trust_remote_code: let model folders run their own code (the teacher and the measured models).
        test_base: the configs a post-training trial's ``test`` starts from (a trial that differs from a fitted one
            only in ``after_fit`` dimensions tests that fit's ``hf_model``); default configs/trainer/default.yaml.

    Returns:
        The summary written to ``<out_dir>/summary.json``.
    """
    return search(teacher, data, space, budget, base, args, first, out_dir, storage, study_name, workers, seed,
                  test_verdict, verdict, trust_remote_code, test_base=test_base)


def search(teacher: str, data: str, space: list[dict], budget: dict, base=None, args=None, first=None,
           out_dir: str = "logs/compress", storage: str | None = None, study_name: str = "compress", workers: int = 1,
           seed: int = 42, test_verdict: bool = True, verdict: dict | None = None, trust_remote_code: bool = False,
           runner: Callable[[list[str], Path], int] = run_fit, test_base: list[str] | None = None) -> dict:
    """``compress``, with the function that runs a trial's command (``runner(args, run_folder)``: its exit status;
    ``args`` start with ``fit``, or ``test`` for a trial that reuses another's fit) as an argument: tests give a
    cheaper one. Workers beyond the first always run ``run_fit``."""
    report.check_verdict(verdict or {})
    dimensions, budget_, shared, firsts = _settings(teacher, data, space, budget, base, args, first, out_dir, seed,
                                                    workers, test_base)
    for line in unavailable_lines(dimensions):
        log.info("compress: %s", line)
    storage = storage or f"sqlite:///{shared.out_dir / 'study.db'}"
    rdb = open_storage(storage)  # a URL that cannot be opened fails now, before the teacher is measured
    reference = teacher_reference(shared, budget_, trust_remote_code)
    study = open_study(rdb, study_name, seed, budget_, reference)
    for settings in firsts:  # cheap trials first; skip_if_exists: not again on a resumed search
        study.enqueue_trial(settings, user_attrs={"first": True}, skip_if_exists=True)
    work = (storage, study_name, space, budget, shared, reference, trust_remote_code)
    context = multiprocessing.get_context("spawn")
    others = [context.Process(target=_worker, args=(*work, seed + i)) for i in range(1, workers)]
    for process in others:
        process.start()
    optimize(study, dimensions, budget_, shared, reference, runner, trust_remote_code)
    for process in others:
        process.join()
    wait_for_others(study)
    picked = choice.choose(study.get_trials(deepcopy=False), reference, budget_, shared, trust_remote_code)
    return report.finish(study, picked, budget_, shared, reference, test_verdict, verdict or {}, trust_remote_code)


def _settings(teacher, data, space, budget, base, args, first, out_dir, seed, workers, test_base=None):
    """The checked settings: a one-line ``ValueError`` naming the key before anything runs."""
    dimensions, budget_ = read_space(space), read_budget(budget)
    if not Path(teacher).exists():
        raise ValueError(f"--teacher {teacher}: does not exist; give the teacher's hf_model folder or .ckpt")
    if not Path(data).is_dir():
        raise ValueError(f"--data {data}: not a folder; give the data folder with train, val and test files")
    if workers < 1:
        raise ValueError(f"--workers {workers}: give at least 1 (the processes searching at once)")
    base = DEFAULT_BASE if base is None else base
    if not any(d.after_fit for d in dimensions):
        test_base = []  # read only by post-training trials
    elif test_base is None:
        test_base = [DEFAULT_BASE[0]]
    for key, files, what in (("base", base, "every trial's fit"), ("test_base", test_base, "a post-training "
                             "trial's test (of another trial's fit)")):
        for file in files:
            if not Path(file).is_file():
                raise ValueError(f"{key}: {file} does not exist; give the configs {what} starts from")
    firsts = [check_settings(dimensions, s or {}, f"first[{i}]") for i, s in enumerate(first or [])]
    trials.check_fit_args(base, list(map(str, args or [])))
    try:
        check_can_create(out_dir)  # a file there was a FileExistsError traceback
    except ValueError as err:
        raise ValueError(f"--out_dir {err}") from None
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # the student reads the teacher's tokens: a checkpoint teacher's network is the model_name it recorded
    model_name = read_checkpoint(teacher)["hyper_parameters"]["model_name"] if teacher.endswith(".ckpt") else teacher
    shared = Shared(str(Path(teacher).resolve()), model_name, str(Path(data).resolve()), out,
                    tuple(str(Path(f).resolve()) for f in base), tuple(map(str, args or [])), seed,
                    tuple(str(Path(f).resolve()) for f in test_base))
    return dimensions, budget_, shared, firsts


def teacher_reference(shared: Shared, budget: Budget, trust_remote_code: bool = False) -> dict:
    """The teacher measured on val as the trials are (``teacher_val.json`` in the search folder, measured once)."""
    path = shared.out_dir / TEACHER_FILE
    if path.is_file():
        reference = json.loads(path.read_text())
        if (reference["path"], reference["data"], reference["batch_size"]) != (shared.teacher, shared.data,
                                                                               budget.batch_size):
            raise ValueError(f"--out_dir {shared.out_dir}: holds a search of teacher {reference['path']} on "
                             f"{reference['data']} at batch {reference['batch_size']}; give another --out_dir")
        return reference
    log.info("compress: measuring the teacher on val (%s)", shared.teacher)
    reference = trials.measure_model(shared.teacher, shared.data, data_labels(shared.data), budget.batch_size,
                                     budget.latency_samples, budget.warmup, trust_remote_code=trust_remote_code)
    reference.update(data=shared.data, batch_size=budget.batch_size)
    atomic_write_text(path, json_text(reference))
    return reference


def _set_constraints(trial: optuna.Trial, gaps: dict[str, float] | None) -> None:
    """The budget's gaps as the trial's Optuna constraints (<= 0: within the limit); a trial that was not
    measured (stopped early, a repeat of one) is infeasible."""
    for key, gap in (gaps or {"measured": 1.0}).items():
        trial.set_constraint(key, gap)


def _worker(storage, study_name, space, budget, shared, reference, trust_remote_code, seed) -> None:
    """A worker process: the same study, loaded from the storage, searched with its own sampler seed."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage), sampler=sampler(seed))
    optimize(study, read_space(space), read_budget(budget), shared, reference, trust_remote_code=trust_remote_code)


def wait_for_others(study: optuna.Study, poll_s: float = 2.0) -> None:
    """Wait for the trials that workers elsewhere (other machines on the storage) still run, so that the report
    covers the whole study. A trial whose worker died is marked failed once its heartbeat is stale."""
    waited = set()
    while running := _running(stored_trials(study)):
        if waited != (numbers := {t.number for t in running}):
            log.info("compress: waiting for trials %s, which other workers run", sorted(numbers))
            waited = numbers
        with warnings.catch_warnings():  # experimental since Optuna 2.9; optimize calls it the same way
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        time.sleep(poll_s)


def all_settings(dimensions: list[Dimension]) -> list[dict[str, str]]:
    """Every distinct setting of the space (only the dimensions that apply in it)."""
    found = []
    for combo in product(*(d.options for d in dimensions)):
        settings = {}
        for dim, option in zip(dimensions, combo):
            if dim.applies(settings):
                settings[dim.name] = option
        if settings not in found:
            found.append(settings)
    return found


def suggest(trial: optuna.Trial, dimensions: list[Dimension]) -> dict[str, str]:
    """A setting: an option sampled for each dimension whose ``when`` holds (define-by-run: the others are not
    Optuna parameters of this trial)."""
    settings: dict[str, str] = {}
    for dim in dimensions:
        if dim.applies(settings):
            settings[dim.name] = trial.suggest_categorical(dim.name, list(dim.options))
    return settings


def optimize(study: optuna.Study, dimensions: list[Dimension], budget: Budget, shared: Shared, reference: dict,
             runner: Callable[[list[str], Path], int] = run_fit, trust_remote_code: bool = False) -> None:
    """Run trials of ``study`` until the budget's trial count or time is spent, or every setting is done.
    ``runner(args, run_folder)`` runs a trial's command, a ``fit`` or a post-training trial's ``test`` (``run_fit``;
    tests give a cheaper one)."""
    start = time.monotonic()
    timeout = budget.timeout_min * 60 if budget.timeout_min else None
    total = len(all_settings(dimensions))

    def spent() -> bool:
        trials = stored_trials(study)
        done = [t for t in trials if _was_tried(t)]
        distinct = {_key(t) for t in done + _running(trials)}
        return bool(budget.n_trials and len(done) >= budget.n_trials) or len(distinct) >= total

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        settings = suggest(trial, dimensions)
        trial.set_user_attr("settings", settings)
        trials = stored_trials(study)
        # Each trial records its settings before it reads the others', so of two running trials of one setting at
        # least one sees the other and runs nothing (both may: the setting is then left to a later draw); an order
        # by start or number would let both run when one reads before the other has recorded its settings.
        others = [t for t in trials if _was_tried(t)] + [t for t in _running(trials) if t.number != trial.number
                                                          and "same_as" not in t.user_attrs]
        same = next((t for t in others if t.user_attrs.get("settings") == settings), None)
        if same is None:
            fitted = _fitted_sibling(trials, dimensions, settings)
            return _run_trial(trial, settings, dimensions, budget, shared, reference, runner, trust_remote_code,
                              fitted)
        # The sampler chose a setting already tried (or being tried by another worker): not another fit. A
        # measured one's result is copied; anything else ends as pruned. Repeats count toward no budget.
        trial.set_user_attr("same_as", same.number)
        _set_constraints(trial, same.user_attrs.get("gaps") if same.state == TrialState.COMPLETE else None)
        if same.state == TrialState.RUNNING:
            time.sleep(1)  # another worker fits it: draw again in a moment, not in a busy loop
        if same.state != TrialState.COMPLETE:
            raise optuna.TrialPruned()
        for key in ("gaps", "val", "run", "artifact"):
            if key in same.user_attrs:
                trial.set_user_attr(key, same.user_attrs[key])
        return tuple(same.values)

    def stop_when_spent(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "same_as" not in trial.user_attrs:
            log.info("compress: %s", report.progress_line(trial, budget, reference, tried(study), total, start,
                                                          timeout))
        if _is_fit(trial):
            enqueue_siblings(study, dimensions, [trial])
        if spent():
            study.stop()

    # a resumed search (or a worker joining one): the untried siblings of the fits it has run before the sampler
    enqueue_siblings(study, dimensions, [t for t in stored_trials(study) if _is_fit(t)])
    if spent():
        log.info("compress: the study already has %d tried trials: nothing left to run", len(tried(study)))
        return
    study.optimize(objective, timeout=timeout, callbacks=[stop_when_spent], catch=(TrialFailed,))


def _is_fit(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether ``trial`` fitted a model that post-training siblings can reuse: its own fit, finished and measured."""
    return trial.state == TrialState.COMPLETE and not {"same_as", "reused"} & set(trial.user_attrs)


def _fitted_sibling(stored: list[optuna.trial.FrozenTrial], dimensions: list[Dimension],
                    settings: dict) -> optuna.trial.FrozenTrial | None:
    """A finished fit with the same options as ``settings`` on every dimension that is not ``after_fit``, whose
    ``hf_model`` is here (a fit another machine ran, without a shared file system, is not)."""
    key = fit_key(dimensions, settings)
    return next((t for t in stored if _is_fit(t) and fit_key(dimensions, t.user_attrs.get("settings", {})) == key
                 and (Path(t.user_attrs.get("run", "")) / "hf_model").is_dir()), None)


def enqueue_siblings(study: optuna.Study, dimensions: list[Dimension],
                     fits: list[optuna.trial.FrozenTrial]) -> None:
    """Queue, for each of ``fits``, every setting that differs from it only in ``after_fit`` dimensions and is not
    in the study yet: each is a test of the fitted model (minutes), not a fit, so they run before the sampler
    chooses again (after the trials already queued). Two workers may queue one setting twice; the second is then
    a repeat (``same_as``) and runs nothing."""
    if not any(d.after_fit for d in dimensions):
        return
    every = all_settings(dimensions)
    for fit in fits:
        key = fit_key(dimensions, fit.user_attrs["settings"])
        for settings in every:
            if fit_key(dimensions, settings) == key and settings != fit.user_attrs["settings"]:
                study.enqueue_trial(settings, user_attrs={"sibling_of": fit.number}, skip_if_exists=True)


def _key(trial: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(trial.user_attrs.get("settings", {}).items()))


def tried(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials whose setting was tried: fitted and measured or stopped early, or whose fit failed (not run
    again); not repeats of another trial, nor trials a killed search left unfinished (those are run again)."""
    return [t for t in stored_trials(study) if _was_tried(t)]


def _was_tried(trial: optuna.trial.FrozenTrial) -> bool:
    return "same_as" not in trial.user_attrs and (
        trial.state in FINISHED or (trial.state == TrialState.FAIL and "failed" in trial.user_attrs))


def _running(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == TrialState.RUNNING]


def _run_trial(trial: optuna.Trial, settings: dict, dimensions: list[Dimension], budget: Budget, shared: Shared,
               reference: dict, runner, trust_remote_code: bool,
               fitted: optuna.trial.FrozenTrial | None = None) -> tuple[float, float]:
    """Fit the trial's recipe in its run folder (or, with ``fitted``, test that trial's fitted model with this
    trial's post-training options), then measure its model on val and record the budget's gaps."""
    folder = trials.run_folder(shared, trial.number)
    artifact_name = trials.artifact_name(dimensions, settings)
    if fitted is None:
        min_f1 = reference["macro_f1"] - budget.max_macro_f1_drop - budget.early_stop_margin
        args = trials.fit_args(dimensions, settings, shared, trial.number, min_f1, budget.early_stop_epoch)
        artifact = folder / artifact_name
    else:
        source = Path(fitted.user_attrs["run"])
        trial.set_user_attr("reused", fitted.number)
        args = trials.test_args(dimensions, settings, shared, trial.number, source)
        # the test writes an INT8 option's artifact here; the fp32 model is the fit's own export
        artifact = source / artifact_name if artifact_name == "hf_model" else folder / artifact_name
    trial.set_user_attr("run", str(folder))
    # the command is in the study too: the report of a worker on another machine cannot read this run folder
    trial.set_user_attr("command", (folder / trials.COMMAND_FILE).read_text().strip())
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    status = runner(args, folder)
    stopped = trials.stopped_early(folder)
    if stopped is not None:
        trial.set_user_attr("stopped", stopped)
        _set_constraints(trial, None)
        raise optuna.TrialPruned()
    if status != 0 or not artifact.exists():
        trial.set_user_attr("failed", status)
        raise TrialFailed(f"trial {trial.number}: the {args[0]} exited with {status} (see "
                          f"{folder / trials.log_file(args)})" if status else
                          f"trial {trial.number}: the {args[0]} made no {artifact}")
    result = trials.measure_model(str(artifact), shared.data, data_labels(shared.data), budget.batch_size,
                           budget.latency_samples, budget.warmup, trust_remote_code=trust_remote_code)
    trial.set_user_attr("artifact", str(artifact))
    trial.set_user_attr("val", result)
    gaps = trials.budget_gaps(result, reference, budget)
    trial.set_user_attr("gaps", gaps)
    _set_constraints(trial, gaps)
    return result["macro_f1"], result[report.OBJECTIVE_KEYS[budget.objective]]
