"""``emocompress compress``: the study's storage. A killed search resumes from it without redoing finished trials
(SQLite, the default, and PostgreSQL), workers on several machines share a PostgreSQL database and run disjoint
trials, and a storage URL that cannot be opened is refused in one line. The PostgreSQL tests run against a
throwaway local server (``postgres_url`` in conftest.py) and skip where none can start."""

import threading
from pathlib import Path

import optuna
import pytest

from emocompress.cli import main

from .conftest import REPO
from .test_search import BUDGET, FakeRunner, _search, _space, _study


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request) -> str | None:
    """The study's storage: the default (SQLite in the search folder), or an empty database on a throwaway
    PostgreSQL server (the storage of workers on several machines; skipped where no server can start)."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.mark.slow  # about 10 s on 2 busy cores: a study, fits copied, models measured
def test_resume_after_a_kill_does_not_redo_finished_trials(search_models, emotion_dir, tmp_path, storage):
    space = _space(tmp_path, ["big", "bad", "same"])
    killed = FakeRunner(search_models, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):  # killed while the third fit trains
        _search(tmp_path, search_models, emotion_dir, space, killed, storage=storage)
    finished = [t for t in _study(tmp_path, storage).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(killed.calls) == 3 and len({t.user_attrs["settings"]["student"] for t in finished}) == 2

    again = FakeRunner(search_models)
    _search(tmp_path, search_models, emotion_dir, space, again, storage=storage)
    # only the interrupted setting is fitted again; the two finished ones are not redone
    assert again.calls == [killed.calls[-1]]
    fitted = [t for t in _study(tmp_path, storage).trials if "same_as" not in t.user_attrs]
    assert [t.state for t in fitted].count(optuna.trial.TrialState.COMPLETE) == 3
    assert [t.state for t in fitted].count(optuna.trial.TrialState.FAIL) == 1  # the interrupted trial


@pytest.mark.slow  # about 10 s on 2 busy cores: a study, fits copied, models measured
def test_two_machines_on_one_postgresql_storage_run_disjoint_trials(search_models, emotion_dir, tmp_path, postgres_url):
    # two searches started at once on an empty database, each with a search folder of its own: machines that share
    # only the storage (threads here), with no shared file system
    names = ["big", "bad", "same"]
    space = _space(tmp_path, names)
    runners, summaries, errors = [FakeRunner(search_models), FakeRunner(search_models)], {}, []

    def work(i: int):
        try:
            summaries[i] = _search(tmp_path, search_models, emotion_dir, space, runners[i], storage=postgres_url,
                                   out_dir=str(tmp_path / f"machine{i}"))
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    fitted = [t for t in _study(tmp_path, postgres_url).trials if "same_as" not in t.user_attrs]
    # each setting fitted once, by whichever machine drew it, in that machine's search folder
    assert sorted(runners[0].calls + runners[1].calls) == sorted(names)
    assert sorted(t.user_attrs["settings"]["student"] for t in fitted) == sorted(names)
    for i, runner in enumerate(runners):
        own = [t for t in fitted if Path(t.user_attrs["run"]).parent.parent == tmp_path / f"machine{i}"]
        assert sorted(t.user_attrs["settings"]["student"] for t in own) == sorted(runner.calls)
        assert len(list((tmp_path / f"machine{i}" / "trials").glob("trial_*/hf_model"))) == len(runner.calls)
        # each machine's report has every trial of the study and the same choice, wherever it was fitted
        assert summaries[i]["chosen"]["settings"] == {"student": "same"} and summaries[i]["trials"]["complete"] == 3
        assert summaries[i]["chosen"]["command"].split(" && ")[1].startswith("emocompress fit ")
    # the report again, on one machine, after the study is done (docs/search.md: the test verdict without a shared
    # file system): n_trials 1 is spent already, so no trial runs
    again = FakeRunner(search_models)
    summary = _search(tmp_path, search_models, emotion_dir, space, again, storage=postgres_url,
                      out_dir=str(tmp_path / "machine0"), budget={**BUDGET, "n_trials": 1})
    assert again.calls == [] and summary["chosen"] == summaries[0]["chosen"]


@pytest.mark.parametrize("url, says", [
    ("postgresql+psycopg://me:secret@/optuna?host=/nowhere", "cannot open it ("),
    ("mysql://me:secret@localhost/optuna", "no driver for this database"),
    ("study.db", "not a database URL"),
    # both were tracebacks: a URL SQLAlchemy has no dialect for, and an SQLite URL of a file that is no database
    ("redis://localhost/0", "not a database Optuna can keep a study in"),
    ("sqlite:///{tmp}/notes.txt", "cannot open it (file is not a database)"),
], ids=["unreachable", "no_driver", "not_a_url", "not_a_database", "not_sqlite"])
def test_cli_refuses_a_storage_it_cannot_open_in_one_line(search_models, emotion_dir, tmp_path, capsys, url, says):
    url = url.format(tmp=tmp_path)
    (tmp_path / "notes.txt").write_text("not a database, though the URL says sqlite\n" * 100)
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "-c", str(REPO / "configs" / "compress.yaml"), "--teacher", search_models["teacher"],
              "--data", str(emotion_dir), "--out_dir", str(tmp_path), "--storage", url])
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("emocompress: error:")]
    assert exit_.value.code == 2 and len(error) == 1 and error[0].startswith(f"emocompress: error: --storage "
                                                                              f"{url.split(':')[0]}")
    assert says in error[0] and "secret" not in error[0]
    assert not (tmp_path / "teacher_val.json").exists()  # refused before the teacher is measured
