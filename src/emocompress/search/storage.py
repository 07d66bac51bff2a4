"""The study's storage: an Optuna RDB storage (SQLite by default, PostgreSQL for several machines) opened with
heartbeats and one-line refusals, the study created or resumed under its own budget, and its trials read past
Optuna's per-process cache."""

import time
from dataclasses import asdict
from datetime import datetime
from functools import partial

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState

from emocompress.search.space import Budget

# budget keys a resumed study may change: how long it searches, how the final choice re-times (not the trials)
_MAY_CHANGE = ("n_trials", "timeout_min", "retime_rounds")


class _Storage(RDBStorage):
    """Optuna's RDB storage, with a queued trial taken by one worker only. Optuna takes it (WAITING -> RUNNING)
    by reading its state and then writing it, under ``SELECT ... FOR UPDATE``, which SQLite ignores: two workers
    on one SQLite file both took one queued sibling (tests/test_search_reuse.py, two workers), and the second
    failed telling a trial the first had finished. Here the take is one conditional ``UPDATE``, atomic on any
    database."""

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        if state != TrialState.RUNNING or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        trial = models.TrialModel
        with self.engine.begin() as connection:
            taken = connection.execute(sqlalchemy.update(trial).where(
                trial.trial_id == trial_id, trial.state == TrialState.WAITING).values(
                state=TrialState.RUNNING, datetime_start=datetime.now())).rowcount
        return taken == 1


def sampler(seed: int) -> optuna.samplers.BaseSampler:
    # constraints come from each trial (Trial.set_constraint: the budget's gaps), which TPE reads
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def _shown(url: str) -> str:
    """The storage URL as messages show it: without its password."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, tries: int = 5) -> RDBStorage:
    """The study's RDB storage (SQLite, PostgreSQL, ...) at ``url``, with heartbeats: a trial whose worker was killed
    is marked failed after the grace period (when a worker starts its next trial), and its setting is then run
    again; until then it counts as running elsewhere. A URL that cannot be opened is a one-line ``ValueError``."""
    make = partial(_Storage, url, heartbeat_interval=60, grace_period=180)
    try:
        shown = _shown(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"--storage {url}: not a database URL; give one such as sqlite:///logs/compress/study.db "
                         "or postgresql+psycopg://user:password@host/dbname") from None
    try:
        for attempt in range(tries - 1):
            try:
                return make()
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers started at once on an empty database race to create its tables, and PostgreSQL refuses
                # the loser's CREATE; once the winner has made them, opening again finds them
                time.sleep(1 + attempt)
        return make()
    except sqlalchemy.exc.NoSuchModuleError:  # a URL of something SQLAlchemy has no dialect for (redis://...)
        raise ValueError(f"--storage {shown}: not a database Optuna can keep a study in; give sqlite:///<file> or "
                         "postgresql+psycopg://user:password@host/dbname") from None
    except ImportError as err:
        raise ValueError(f"--storage {shown}: no driver for this database ({err.__cause__ or err}); for "
                         "PostgreSQL: pip install 'emocompress[postgres]'") from None
    except sqlalchemy.exc.DatabaseError as err:  # unreachable, refused, or a file that is not SQLite
        reason = str(err.orig or err).strip().splitlines()[0]
        raise ValueError(f"--storage {shown}: cannot open it ({reason}); check the URL, that the server runs "
                         "and that the database exists (docs/search.md)") from None


def _limits(budget: dict) -> dict:
    """The budget's keys the trials were run and judged by: those a resumed study must keep."""
    return {k: v for k, v in budget.items() if k not in _MAY_CHANGE}


def open_study(rdb: RDBStorage, study_name: str, seed: int, budget: Budget, reference: dict) -> optuna.Study:
    """Create the study, or load it to resume; refuse to resume one made for another budget or teacher."""
    study = optuna.create_study(storage=rdb, study_name=study_name, sampler=sampler(seed), load_if_exists=True,
                                directions=["maximize", "minimize"])
    made_for = {"budget": asdict(budget), "teacher_macro_f1": reference["macro_f1"]}
    stored = study.user_attrs.get("made_for")
    if stored is None:
        study.set_user_attr("made_for", made_for)
    elif _limits(stored["budget"]) != _limits(made_for["budget"]):
        raise ValueError(f"--storage {_shown(rdb.url)}: study {study_name!r} was made for another budget "
                         f"({stored['budget']}); resume it with that budget, or give another --study_name or --out_dir")
    return study


def stored_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as the database holds them now. Optuna keeps a per-process cache over an RDB storage
    (``_CachedStorage``) that can miss another worker's trial: under load a worker fitted a setting that another
    had finished seconds before (tests/test_search.py, two workers). So every question about what the workers did
    (tried, running, spent, the duplicate check) reads past the cache."""
    storage = getattr(study._storage, "_backend", study._storage)  # the RDBStorage under Optuna's cache
    return storage.get_all_trials(study._study_id, deepcopy=False)
