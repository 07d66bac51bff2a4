"""``emocompress compress``: the space and budget refusals, a search that finds the known best of a tiny space,
a latency choice made on latencies re-timed together, two workers on one storage, early stopping, the progress
line, and (slow) the real command with tiny fits."""

import copy
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.cli import main
from emocompress.search import trials as search_trials
from emocompress.search.choice import retime
from emocompress.search.report import progress_line
from emocompress.search.run import search
from emocompress.search.space import check_settings, read_budget, read_space
from emocompress.search.stopping import STOPPED_FILE, HopelessTrialStop
from emocompress.search.trials import Shared, fit_args

from .conftest import REPO
from .test_cli import run_cli

# Benchmark settings of the test verdict: as brief as the benchmark allows.
QUICK_VERDICT = {"latency_samples": 2, "warmup": 0, "rounds": 1, "bootstrap": 1000, "num_threads": 1}
BUDGET = {"max_macro_f1_drop": 0.01, "objective": "size", "latency_samples": 2, "warmup": 0, "n_trials": 3}


def _space(tmp_path: Path, names: list[str]) -> list[dict]:
    """One dimension, ``student``, whose options are marker configs the fake runner recognises."""
    options = {}
    for name in names:
        marker = tmp_path / f"option_{name}.yaml"
        marker.write_text("{}\n")
        options[name] = {"configs": [str(marker)]}
    return [{"name": "student", "options": options}]


class FakeRunner:
    """A trial's fit without the fit: the prepared model of the option named in its arguments copied to
    ``hf_model``; ``fail`` options exit 1, ``hopeless`` ones stop early; counts the fits it ran."""

    def __init__(self, models: dict[str, str], interrupt_at: int | None = None):
        self.models, self.interrupt_at = models, interrupt_at
        self.calls: list[str] = []
        self.folders: dict[str, Path] = {}  # option -> the run folder of the trial that fitted it
        self.lock = threading.Lock()

    def __call__(self, args: list[str], folder: Path) -> int:
        name = next(Path(a).stem.removeprefix("option_") for a in args if Path(a).name.startswith("option_"))
        with self.lock:
            self.calls.append(name)
            self.folders[name] = folder
            if self.interrupt_at is not None and len(self.calls) > self.interrupt_at:
                raise KeyboardInterrupt  # the search killed while this trial trains
        if name == "fail":
            return 1
        if name == "hopeless":
            (folder / STOPPED_FILE).write_text(json.dumps({"epoch": 1}))
            return 0
        shutil.copytree(self.models[name], folder / "hf_model")
        return 0


def _search(tmp_path, models, emotion_dir, space, runner, **overrides):
    settings = {"teacher": models["teacher"], "data": str(emotion_dir), "space": space,
                "budget": BUDGET, "base": [], "out_dir": str(tmp_path / "search"), "test_verdict": False,
                "verdict": QUICK_VERDICT, **overrides}
    return search(**settings, runner=runner)


def _study(tmp_path, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name="compress", storage=storage or f"sqlite:///{tmp_path / 'search' / 'study.db'}")


@pytest.mark.slow  # about 10 s on 2 busy cores: a study, fits copied, models measured
def test_search_finds_the_known_best_and_judges_it_on_test(search_models, emotion_dir, tmp_path):
    runner = FakeRunner(search_models)
    summary = _search(tmp_path, search_models, emotion_dir, _space(tmp_path, ["big", "bad", "same"]), runner,
                      test_verdict=True)
    out = tmp_path / "search"
    # every setting fitted once; the smallest within budget is `same` (bad is smaller but loses 5 points)
    assert sorted(runner.calls) == ["bad", "big", "same"]
    assert summary["chosen"]["settings"] == {"student": "same"}
    assert summary["chosen"]["val_macro_f1"] == pytest.approx(0.2, abs=1e-6)
    assert Path(summary["chosen"]["artifact"]).parent == out / "trials" / f"trial_{summary['chosen']['trial']:04d}"
    assert summary["chosen"]["command"].split(" && ")[1].startswith("emocompress fit ")
    # big and same make the same predictions; big is dominated (larger), so the front is `same` alone
    rows = {r["settings"]: r for r in _csv(out / "trials.csv") if not r["same_as"]}
    assert rows["student=bad"]["within_budget"] == "False" and rows["student=big"]["pareto"] == "False"
    assert rows["student=same"]["pareto"] == "True"
    assert (out / "pareto.png").stat().st_size > 0 and (out / "trials.md").is_file()
    # the verdict on test: the chosen model predicts as the teacher, so the test interval agrees with val
    assert [(t["model"], t["verdict"]) for t in summary["test"]] == [(f"trial {summary['chosen']['trial']} (chosen)",
                                                                       "agrees")]
    assert (out / "test_benchmark" / "model_comparison.csv").is_file()
    assert "Chosen on val: trial" in (out / "summary.md").read_text()
    page = (out / "report.html").read_text()  # the benchmark's page: trials, the front inlined, the test verdict
    assert "Test verdict" in page and "data:image/png;base64," in page and "Chosen on val: trial" in page


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def _deeper(source: str, out: Path, layers: int) -> str:
    """``source`` with its first encoder layer repeated to ``layers`` layers: slower, the same predictions (the
    search models' heads ignore the encoder)."""
    model = AutoModelForSequenceClassification.from_pretrained(source)
    encoder = model.bert.encoder
    encoder.layer.extend(copy.deepcopy(encoder.layer[0]) for _ in range(layers - len(encoder.layer)))
    model.config.num_hidden_layers = layers
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


@pytest.mark.slow  # 15 to 40 s on 2 busy cores: a study, fits copied, models measured, then re-timed
def test_latency_choice_uses_the_trials_re_timed_together(search_models, emotion_dir, tmp_path, monkeypatch):
    # `slow` predicts as `same` with 8 times its layers. `same`'s first timing, taken alone when its trial ended,
    # is inflated by a minute, as if another trial's fit had run beside it: by those timings `slow` is the faster.
    # Re-timed together with the teacher in interleaved rounds, `same` is, and is chosen.
    runner = FakeRunner({**search_models, "slow": _deeper(search_models["same"], tmp_path / "slow", 16)})
    measure_model = search_trials.measure_model

    def beside_a_fit(path, *args, **kwargs):
        result = measure_model(path, *args, **kwargs)
        if Path(path).parent == runner.folders.get("same"):
            result["latency_ms"] += 60_000.0
        return result

    monkeypatch.setattr(search_trials, "measure_model", beside_a_fit)
    threads = torch.get_num_threads()
    # Tensors this small gain nothing from a second thread, and on a busy machine lose 100x waiting for it.
    torch.set_num_threads(1)
    try:
        summary = _search(tmp_path, search_models, emotion_dir, _space(tmp_path, ["same", "slow"]), runner,
                          budget={**BUDGET, "objective": "latency", "latency_samples": 5, "warmup": 2,
                                  "retime_rounds": 3})
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "search"
    rows = {r["settings"].removeprefix("student="): r for r in _csv(out / "trials.csv") if not r["same_as"]}
    first = {name: float(row["latency_ms"]) for name, row in rows.items()}
    again = {name: float(row["latency_ms_retimed"]) for name, row in rows.items()}
    assert first["same"] > first["slow"] and again["same"] < again["slow"]
    same = int(rows["same"]["trial"])
    assert summary["chosen"]["settings"] == {"student": "same"} and summary["pareto"] == [same]
    assert (summary["chosen"]["latency_ms"], summary["chosen"]["latency_ms_retimed"]) == (first["same"], again["same"])
    teacher = summary["teacher_val"]["latency_ms_retimed"]
    assert summary["retimed"] == {"rounds": 3, "latency_ms": {"teacher": teacher, **{
        f"trial {r['trial']}": again[name] for name, r in rows.items()}}}
    assert summary["chosen"]["val_speedup"] == pytest.approx(teacher / again["same"])
    # both timings shown: the table's columns, the summary's sentence
    assert "| latency_ms | latency_ms_retimed |" in (out / "trials.md").read_text()
    assert f"{again['same']:.3g} ms re-timed ({first['same']:.3g} ms timed alone)" in (out / "summary.md").read_text()


def test_no_re_timing_without_every_candidate_model_here(tmp_path, caplog):
    # a trial another machine ran (its model not in this search folder): the choice keeps the first timings
    elsewhere = optuna.trial.create_trial(values=[0.2, 1.0], user_attrs={
        "gaps": {"max_macro_f1_drop": 0.0}, "artifact": str(tmp_path / "trial_0003" / "hf_model"),
        "val": {"latency_ms": 1.0}})
    elsewhere.number = 3
    shared = Shared("/teacher", "/teacher", "/data", tmp_path, ())
    with caplog.at_level(logging.WARNING):
        assert retime([elsewhere], {"latency_ms": 5.0}, read_budget({**BUDGET, "objective": "latency"}), shared,
                      False) is None
    assert "cannot re-time trials [3]" in caplog.text
    # objective size: nothing to re-time
    assert retime([elsewhere], {"latency_ms": 5.0}, read_budget(BUDGET), shared, False) is None


@pytest.mark.slow  # about 10 s on 2 busy cores: a study, fits copied, models measured
def test_two_workers_on_one_storage_run_disjoint_trials(search_models, emotion_dir, tmp_path):
    # two searches at once on one SQLite file (threads here; processes or machines alike share only the storage)
    runner = FakeRunner(search_models)
    names = ["big", "bad", "same"]
    space = _space(tmp_path, names)
    _search(tmp_path, search_models, emotion_dir, space, FakeRunner(search_models), budget={**BUDGET, "n_trials": 1})
    errors = []

    def work():
        try:
            _search(tmp_path, search_models, emotion_dir, space, runner, budget={**BUDGET, "n_trials": 3})
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    trials = [t for t in _study(tmp_path).trials if t.state == optuna.trial.TrialState.COMPLETE]
    fitted = [t for t in trials if "same_as" not in t.user_attrs]
    # each setting fitted once, in its own run folder, by whichever worker drew it
    assert sorted(t.user_attrs["settings"]["student"] for t in fitted) == sorted(names)
    assert len({t.user_attrs["run"] for t in fitted}) == 3 and len(runner.calls) == 2


def test_hopeless_and_failed_trials_are_recorded_not_chosen(search_models, emotion_dir, tmp_path):
    runner = FakeRunner(search_models)
    summary = _search(tmp_path, search_models, emotion_dir, _space(tmp_path, ["hopeless", "fail", "same"]), runner)
    assert sorted(runner.calls) == ["fail", "hopeless", "same"]  # a failed setting is not fitted again
    assert summary["chosen"]["settings"] == {"student": "same"}
    assert summary["trials"]["pruned"] == 1 and summary["trials"]["fail"] == 1
    states = {r["settings"]: r["state"] for r in _csv(tmp_path / "search" / "trials.csv") if not r["same_as"]}
    assert states["student=hopeless"].startswith("pruned") and states["student=fail"] == "fail"
    # the study resumes only under its own budget (the trial count, time and re-timing rounds may change)
    with pytest.raises(ValueError, match="was made for another budget"):
        _search(tmp_path, search_models, emotion_dir, _space(tmp_path, ["same"]), runner,
                budget={**BUDGET, "max_macro_f1_drop": 0.02})
    _search(tmp_path, search_models, emotion_dir, _space(tmp_path, ["hopeless", "fail", "same"]), runner,
            budget={**BUDGET, "retime_rounds": 2})
    assert len(runner.calls) == 3  # every setting was tried: nothing runs again


def test_progress_line_names_the_trial_its_result_and_an_eta_from_the_budget():
    reference = {"macro_f1": 0.25}
    kept = optuna.trial.create_trial(values=[0.2412, 4.1], user_attrs={
        "settings": {"student": "layers2", "int8": "onnxruntime"}, "val": {"macro_f1": 0.2412, "size_mb": 4.1},
        "gaps": {"max_macro_f1_drop": -0.0012}})
    pruned = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={
        "settings": {"student": "cnn"}, "stopped": {"epoch": 1}})
    kept.number, pruned.number = 3, 4
    done = [kept, pruned]  # both finished in the last 10 minutes: 5 minutes a trial
    ten_minutes_ago = time.monotonic() - 600

    def line(trial, **budget):
        return progress_line(trial, read_budget({**BUDGET, **budget}), reference, done, 6, ten_minutes_ago,
                             budget["timeout_min"] * 60 if budget.get("timeout_min") else None)

    # 4 trials allowed, 2 done: 2 more at 5 minutes each
    assert line(kept, n_trials=4) == ("trial 3 [student=layers2 int8=onnxruntime]: val macro F1 0.2412 (-0.88 pt), "
                                      "4.1 MB: kept; 2/4 done, ETA 0:10:00")
    assert line(pruned, n_trials=4).startswith("trial 4 [student=cnn]: not measured: pruned (hopeless at epoch 1); ")
    # no trial count: every one of the 6 settings, capped by the 5 minutes timeout_min leaves
    assert line(kept, n_trials=None, timeout_min=15).endswith("2/6 done, ETA 0:05:00")
    assert line(kept, n_trials=2).endswith("2/2 done, ETA 0:00:00")


def test_hopeless_trial_stop_stops_below_the_threshold(tmp_path):
    trainer = Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    stop = HopelessTrialStop(min_value=0.5, after_epoch=2)
    for epoch, value, stops in ((0, 0.1, False), (1, 0.6, False), (1, 0.4, True)):
        trainer.fit_loop.epoch_progress.current.completed = epoch
        trainer.callback_metrics["val/macro_f1"] = torch.tensor(value)
        stop.on_validation_end(trainer, None)
        assert trainer.should_stop == stops
    assert json.loads((tmp_path / STOPPED_FILE).read_text()) == {"epoch": 2, "val/macro_f1": pytest.approx(0.4),
                                                                 "min_value": 0.5}


@pytest.mark.parametrize("space, key", [
    ([], "space: empty"),
    ([{"name": "student", "options": {}}], "space[0] (student).options: empty"),
    ([{"name": "a", "options": {"x": {}}}, {"name": "a", "options": {"y": {}}}], "space[1] (a).name"),
    ([{"name": "a", "options": {"x": {}}, "when": {"b": ["y"]}}, {"name": "b", "options": {"y": {}}}],
     "space[0] (a).when.b"),
    ([{"name": "a", "options": {"x": {}}}, {"name": "b", "options": {"y": {}}, "when": {"a": ["z"]}}],
     "space[1] (b).when.a"),
    ([{"name": "a", "options": {"x": {"configs": ["nowhere.yaml"]}}}], "space[0] (a).options: none is available"),
    ([{"name": "a", "options": {"x": {"artifact": "onnx"}}}], "space[0] (a).options.x.artifact"),
])
def test_refuses_an_empty_or_contradictory_space(space, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_space(space)


@pytest.mark.parametrize("budget, key", [
    ({}, "budget: empty"),
    ({"n_trials": 3}, "budget.max_macro_f1_drop: missing"),
    ({"max_macro_f1_drop": -0.1, "n_trials": 3}, "budget.max_macro_f1_drop"),
    ({"max_macro_f1_drop": 0.01}, "budget: neither n_trials nor timeout_min"),
    ({"max_macro_f1_drop": 0.01, "n_trials": 0}, "budget.n_trials"),
    ({"max_macro_f1_drop": 0.01, "n_trials": 3, "min_rare_recall": 1.5}, "budget.min_rare_recall"),
    ({"max_macro_f1_drop": 0.01, "n_trials": 3, "objective": "speed"}, "budget.objective"),
    ({"max_macro_f1_drop": 0.01, "n_trials": 3, "max_drop": 1}, "budget.max_drop: unknown key"),
    ({"max_macro_f1_drop": 0.01, "n_trials": 3, "retime_rounds": 0}, "budget.retime_rounds"),
])
def test_refuses_an_empty_or_contradictory_budget(budget, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        read_budget(budget)


def test_settings_that_contradict_a_condition_are_refused():
    space = read_space([{"name": "student", "options": {"cnn": {}, "layers": {}}},
                        {"name": "prune", "when": {"student": ["layers"]}, "options": {"none": {}, "0.5": {}}}])
    assert check_settings(space, {"student": "cnn"}, "first[0]") == {"student": "cnn"}
    assert check_settings(space, {"student": "layers", "prune": "0.5"}, "first[0]") == {"student": "layers",
                                                                                      "prune": "0.5"}
    with pytest.raises(ValueError, match=r"first\[0\]\.prune: '0.5' contradicts"):
        check_settings(space, {"student": "cnn", "prune": "0.5"}, "first[0]")
    with pytest.raises(ValueError, match=r"first\[1\]\.prune: missing"):
        check_settings(space, {"student": "layers"}, "first[1]")


def test_the_default_config_reads_and_lists_what_is_not_available_yet():
    config = yaml.safe_load((REPO / "configs" / "compress.yaml").read_text())
    space = read_space(config["space"], REPO)
    read_budget(config["budget"])
    for i, settings in enumerate(config["first"]):
        check_settings(space, settings, f"first[{i}]")
    for dim in space:
        for option in dim.options.values():
            assert all(Path(file).is_file() for file in option.configs)


@pytest.mark.parametrize("budget, message", [
    ('{"max_macro_f1_drop": 0.01}', "budget: neither n_trials nor timeout_min"),
    ('{"max_macro_f1_drop": 0.01, "n_trials": 3, "retime_rounds": 1.5}', "budget.retime_rounds: 1.5; give an integer"),
])
def test_cli_refuses_a_bad_budget_in_one_line(search_models, emotion_dir, tmp_path, capsys, budget, message):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "-c", str(REPO / "configs" / "compress.yaml"), "--teacher", search_models["teacher"],
              "--data", str(emotion_dir), "--budget", budget, "--out_dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_trial_argument_is_refused_before_the_search(search_models, emotion_dir, tmp_path):
    # a mistyped key in `args` failed every trial's fit, one by one, instead of the command
    runner = FakeRunner(search_models)
    with pytest.raises(ValueError, match=r"^args --trainer.max_epoch 1: unrecognized arguments: --trainer.max_epoch 1; "
                                         r"check the spelling .*; fix the search's args"):
        _search(tmp_path, search_models, emotion_dir, _space(tmp_path, ["same"]), runner,
                args=["--trainer.max_epoch", "1"])
    assert runner.calls == [] and not (tmp_path / "search").exists()


def test_cli_reads_one_budget_key_as_yaml(search_models, emotion_dir, tmp_path, capsys):
    # `--budget.KEY VALUE` reaches the search as a string: read as YAML, 0 is the integer 0 (refused as such), and
    # a valid number such as `--budget.timeout_min 12` is no longer refused as the string '12'
    assert read_budget({"max_macro_f1_drop": "0.01", "timeout_min": "12", "min_rare_recall": "null"}).timeout_min == 12
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "-c", str(REPO / "configs" / "compress.yaml"), "--teacher", search_models["teacher"],
              "--data", str(emotion_dir), "--budget.retime_rounds", "0", "--out_dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "budget.retime_rounds: 0; give an integer" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_command_runs_real_trial_fits(tiny_teacher_dir, emotion_dir, tmp_path):
    # two real distillation fits of tiny students (a 1-layer cut, fp32 and INT8) by two worker processes on one
    # SQLite storage, selected on val, judged on test
    config = tmp_path / "compress_tiny.yaml"
    config.write_text(yaml.safe_dump({
        "base": [str(REPO / "configs/trainer/default.yaml"), str(REPO / "configs/recipes/distill.yaml"),
                 str(REPO / "configs/overlays/tiny.yaml")],
        "args": ["--trainer.max_epochs", "1", "--model.init_args.student_layers", "[1]"],
        "budget": {"max_macro_f1_drop": 1.0, "objective": "size", "n_trials": 2, "latency_samples": 2, "warmup": 0},
        "space": [{"name": "int8", "options": {"fp32": {}, "onnxruntime": {
            "configs": [str(REPO / "configs/overlays/quantize.yaml")], "artifact": "int8"}}}],
        "verdict": QUICK_VERDICT}))
    result = run_cli("compress", "-c", config, "--teacher", tiny_teacher_dir, "--data", emotion_dir,
                     "--out_dir", tmp_path / "search", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["trials"]["complete"] == 2
    assert summary["chosen"]["settings"] == {"int8": "onnxruntime"}  # the smaller file, same budget
    run = Path(summary["chosen"]["artifact"]).parent
    assert (run / "config.yaml").is_file() and (run / "fit.log").is_file() and (run / "checkpoints").is_dir()
    assert result.stderr.count("compress: trial ") == 2 and "ETA" in result.stderr  # one line per trial, either worker
    runs = sorted((tmp_path / "search" / "trials").glob("trial_*/config.yaml"))
    assert len(runs) == 2  # no setting fitted twice


def test_a_trial_of_the_default_space_is_the_recipes_stack(tmp_path, capsys):
    # the 3-layer student pruned by half under distillation, tested as INT8: each option's arguments reach the
    # callback its own configs added, and search.yaml points the run, teacher and logits cache into the search
    config = yaml.safe_load((REPO / "configs" / "compress.yaml").read_text())
    space = read_space(config["space"], REPO)
    settings = check_settings(space, {"student": "layers3", "prune": "0.5", "vocab_prune": "none",
                                      "int8": "onnxruntime"}, "case")
    shared = Shared("/teacher", "/teacher", "/data", tmp_path, tuple(str(REPO / f) for f in config["base"]))
    args = fit_args(space, settings, shared, 7, min_macro_f1=0.8, after_epoch=1)
    assert (tmp_path / "trials" / "trial_0007" / "command.txt").read_text().count(" -c ") == 5
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args") for c in printed["trainer"]["callbacks"]}
    assert (callbacks["StructuredPruning"]["head_amount"], callbacks["StructuredPruning"]["ffn_amount"]) == (0.5, 0.5)
    assert callbacks["Int8Quantization"]["backend"] == "onnxruntime" and callbacks["HopelessTrialStop"]["min_value"] == 0.8
    model = printed["model"]["init_args"]
    assert (model["student"], model["student_layers"], model["teacher"]) == ("layers", [1, 3, 5], "/teacher")
    assert model["logits_cache"] == str(tmp_path / "teacher_logits")
    logger = printed["trainer"]["logger"]["init_args"]
    assert Path(logger["save_dir"], logger["name"], logger["version"]) == tmp_path / "trials" / "trial_0007"


def test_a_verdict_key_the_benchmark_does_not_take_is_refused_before_the_search(search_models, emotion_dir,
                                                                                tmp_path):
    # a typo there was found only when every trial was done: benchmark() refused the key with a TypeError
    def runner(args, folder):
        raise AssertionError("no trial may run")

    for key in ("latency_sample", "out_dir"):  # a typo; a setting the verdict makes itself
        with pytest.raises(ValueError, match=rf"verdict.{key}: not a setting of the test benchmark; give some of "
                                             "num_threads, latency_samples, warmup"):
            _search(tmp_path, search_models, emotion_dir, _space(tmp_path, ["same"]), runner, test_verdict=True,
                    verdict={**QUICK_VERDICT, key: 3})
    assert not (tmp_path / "search").exists()
