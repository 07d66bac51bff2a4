"""``emocompress compress``: post-training (``after_fit``) dimensions. A setting that differs from a fitted one only
there is a ``test`` of that fit, not another fit; its siblings run right after a fit and are queued again when a
search resumes; a bad ``after_fit`` is refused naming the key."""

import json
import shutil
import threading
from pathlib import Path

import optuna
import pytest
import yaml

from emocompress.cli import main
from emocompress.search import run as search_run
from emocompress.search.space import read_space

from .conftest import REPO
from .test_cli import run_cli
from .test_search import QUICK_VERDICT, _csv, _search, _space, _study

# `lossy` writes `bad`'s model as its artifact, as if quantization ruined the model: a trial measured from its own
# artifact has `bad`'s val macro F1, one measured from the fit it reused would have the fitted model's
AFTER_FIT = {"fp32": None, "good": "int8", "lossy": "openvino_int8"}


def _int8_space(tmp_path: Path, students: list[str]) -> list[dict]:
    """``student`` (trained, marker configs) x ``int8`` (after_fit: fp32, good, lossy; marker configs)."""
    options = {}
    for name, artifact in AFTER_FIT.items():
        options[name] = {}
        if artifact:
            marker = tmp_path / f"after_{name}.yaml"
            marker.write_text("{}\n")
            options[name] = {"configs": [str(marker)], "artifact": artifact}
    return [*_space(tmp_path, students), {"name": "int8", "after_fit": True, "options": options}]


class PostTrainingRunner:
    """``fit``: the student option's prepared model copied to ``hf_model``; ``test``: the model its
    ``--model.init_args.model_name`` names. Either writes the INT8 option's artifact as the real fit's or test's
    Int8Quantization would: a copy of that model (``good``) or of ``bad`` (``lossy``)."""

    def __init__(self, models: dict[str, str]):
        self.models = models
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], folder: Path) -> int:
        self.calls.append(args)
        if args[0] == "fit":
            student = next(Path(a).stem.removeprefix("option_") for a in args if Path(a).name.startswith("option_"))
            model = self.models[student]
            shutil.copytree(model, folder / "hf_model")
        else:
            model = args[args.index("--model.init_args.model_name") + 1]
        for name, artifact in AFTER_FIT.items():
            if any(Path(a).name == f"after_{name}.yaml" for a in args):
                shutil.copytree(self.models["bad"] if name == "lossy" else model, folder / artifact)
        return 0

    def subcommands(self) -> list[str]:
        return [args[0] for args in self.calls]


def _measured(tmp_path) -> list[optuna.trial.FrozenTrial]:
    return [t for t in _study(tmp_path).trials
            if t.state == optuna.trial.TrialState.COMPLETE and "same_as" not in t.user_attrs]


@pytest.mark.slow  # about 15 s on 2 busy cores: 6 trials measured
def test_post_training_siblings_test_the_fitted_model_instead_of_fitting(search_models, emotion_dir, tmp_path):
    runner = PostTrainingRunner(search_models)
    _search(tmp_path, search_models, emotion_dir, _int8_space(tmp_path, ["same", "big"]), runner,
            budget={"max_macro_f1_drop": 0.01, "objective": "size", "latency_samples": 2, "warmup": 0,
                    "n_trials": 10})
    # 2 students x 3 INT8 options: one fit per student, the other 4 settings are tests of those fits
    assert sorted(runner.subcommands()) == ["fit"] * 2 + ["test"] * 4
    trials = _measured(tmp_path)
    assert len(trials) == 6 and len({tuple(sorted(t.user_attrs["settings"].items())) for t in trials}) == 6
    fits = {t.user_attrs["settings"]["student"]: t for t in trials if "reused" not in t.user_attrs}
    assert sorted(fits) == ["big", "same"]
    # cheap trials first: the two trials after the first fit are its siblings
    first = min(fits.values(), key=lambda t: t.number)
    assert [trials[i].user_attrs.get("reused") for i in (1, 2)] == [first.number] * 2
    for trial in trials:
        settings, folder = trial.user_attrs["settings"], Path(trial.user_attrs["run"])
        if "reused" not in trial.user_attrs:
            continue
        fitted = fits[settings["student"]]
        assert trial.user_attrs["reused"] == fitted.number
        command = (folder / "command.txt").read_text()  # re-runs the trial alone: a test of the fitted hf_model
        assert command.split(" && ")[1].startswith("emocompress test -c ")
        assert f"--model.init_args.model_name {fitted.user_attrs['run']}/hf_model" in command
        assert f"--trainer.logger.init_args.version {folder.name}" in command
        artifact = Path(trial.user_attrs["artifact"])
        # measured from its own artifact; the fp32 model is the fitted trial's export itself
        own = AFTER_FIT[settings["int8"]]
        assert artifact == (folder / own if own else Path(fitted.user_attrs["run"]) / "hf_model")
        expected = 0.148 if settings["int8"] == "lossy" else 0.2
        assert trial.user_attrs["val"]["macro_f1"] == pytest.approx(expected, abs=2e-3)
        assert trial.values[0] == trial.user_attrs["val"]["macro_f1"]
    rows = {r["trial"]: r for r in _csv(tmp_path / "search" / "trials.csv")}
    reused = next(t for t in trials if "reused" in t.user_attrs)
    assert rows[str(reused.number)]["state"].endswith(f"(reused fit of trial {reused.user_attrs['reused']})")
    assert f"reused fit of trial {reused.user_attrs['reused']}" in (tmp_path / "search" / "trials.md").read_text()


@pytest.mark.slow  # about 10 s on 2 busy cores: 3 trials measured
def test_a_resumed_search_queues_the_untried_siblings_of_its_fits(search_models, emotion_dir, tmp_path,
                                                                   monkeypatch):
    space = _int8_space(tmp_path, ["same"])
    budget = {"max_macro_f1_drop": 0.01, "objective": "size", "latency_samples": 2, "warmup": 0, "n_trials": 1}
    # a search killed after its first fit, before it queued the siblings (or one from before after_fit existed)
    monkeypatch.setattr(search_run, "enqueue_siblings", lambda *args: None)
    killed = PostTrainingRunner(search_models)
    _search(tmp_path, search_models, emotion_dir, space, killed, budget=budget)
    assert killed.subcommands() == ["fit"]
    assert not _study(tmp_path).get_trials(states=(optuna.trial.TrialState.WAITING,))
    monkeypatch.undo()

    again = PostTrainingRunner(search_models)
    _search(tmp_path, search_models, emotion_dir, space, again, budget={**budget, "n_trials": 3})
    assert again.subcommands() == ["test", "test"]
    fit, *siblings = _measured(tmp_path)
    assert len(siblings) == 2 and {s.user_attrs["settings"]["int8"] for s in siblings} | {
        fit.user_attrs["settings"]["int8"]} == set(AFTER_FIT)
    for sibling in siblings:  # queued from the stored fit, not drawn by the sampler
        assert sibling.system_attrs["fixed_params"] == sibling.user_attrs["settings"]
        assert sibling.user_attrs["sibling_of"] == fit.number and sibling.user_attrs["reused"] == fit.number


@pytest.mark.slow  # about 15 s on 2 busy cores: 6 trials measured by two workers
def test_two_workers_run_each_sibling_once(search_models, emotion_dir, tmp_path):
    space = _int8_space(tmp_path, ["same", "big"])
    budget = {"max_macro_f1_drop": 0.01, "objective": "size", "latency_samples": 2, "warmup": 0, "n_trials": 1}
    runners = [PostTrainingRunner(search_models) for _ in range(3)]
    _search(tmp_path, search_models, emotion_dir, space, runners[0], budget=budget)  # a study with one fit
    errors = []

    def work(runner):
        try:  # both resume the study, so both queue the first fit's siblings
            _search(tmp_path, search_models, emotion_dir, space, runner, budget={**budget, "n_trials": 10})
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(runner,)) for runner in runners[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    # every setting run once, by one worker or the other: a fit, or a test of a fitted sibling
    assert sum(len(r.calls) for r in runners) == 6
    trials = _measured(tmp_path)
    assert len({tuple(sorted(t.user_attrs["settings"].items())) for t in trials}) == len(trials) == 6
    assert sum("reused" in t.user_attrs for t in trials) >= 2  # the first fit's siblings at least


def test_a_bad_after_fit_is_refused_naming_the_key(search_models, emotion_dir, tmp_path, capsys):
    space = [{"name": "int8", "after_fit": "yes", "options": {"fp32": {}}}]
    with pytest.raises(ValueError, match=r"space\[0\] \(int8\)\.after_fit: 'yes'; give true"):
        read_space(space)
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "-c", str(REPO / "configs" / "compress.yaml"), "--teacher", search_models["teacher"],
              "--data", str(emotion_dir), "--space", '[{"name": "int8", "after_fit": "yes", "options": {"a": {}}}]',
              "--out_dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "space[0] (int8).after_fit: 'yes'" in capsys.readouterr().err
    assert not (tmp_path / "teacher_val.json").exists()  # refused before the teacher is measured


@pytest.mark.slow  # about a minute on 2 busy cores: a real tiny distillation fit, a real INT8 test of it
def test_compress_command_tests_a_real_fit_for_its_int8_sibling(tiny_teacher_dir, emotion_dir, tmp_path):
    config = tmp_path / "compress_tiny.yaml"
    config.write_text(yaml.safe_dump({
        "base": [str(REPO / "configs/trainer/default.yaml"), str(REPO / "configs/recipes/distill.yaml"),
                 str(REPO / "configs/overlays/tiny.yaml")],
        "test_base": [str(REPO / "configs/trainer/default.yaml"), str(REPO / "configs/overlays/tiny.yaml")],
        "args": ["--trainer.max_epochs", "1", "--model.init_args.student_layers", "[1]"],
        "budget": {"max_macro_f1_drop": 1.0, "objective": "size", "n_trials": 2, "latency_samples": 2, "warmup": 0},
        "space": [{"name": "int8", "after_fit": True, "options": {"fp32": {}, "onnxruntime": {
            "configs": [str(REPO / "configs/overlays/quantize.yaml")], "artifact": "int8"}}}],
        "first": [{"int8": "fp32"}], "verdict": QUICK_VERDICT}))
    result = run_cli("compress", "-c", config, "--teacher", tiny_teacher_dir, "--data", emotion_dir,
                     "--out_dir", tmp_path / "search", "--test_verdict", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = {t.number: t for t in _study(tmp_path).trials}
    assert trials[0].user_attrs["settings"] == {"int8": "fp32"} and "reused" not in trials[0].user_attrs
    assert trials[1].user_attrs["settings"] == {"int8": "onnxruntime"} and trials[1].user_attrs["reused"] == 0
    fitted, tested = (Path(trials[i].user_attrs["run"]) for i in (0, 1))
    assert (fitted / "fit.log").is_file() and not (tested / "fit.log").exists()
    # the test's own run folder: its log, config, test metrics and the INT8 artifact it was measured from
    assert (tested / "test.log").is_file() and (tested / "config.yaml").is_file() and not (tested / "checkpoints").exists()
    assert trials[1].user_attrs["artifact"] == str(tested / "int8")
    assert json.loads((tested / "test_metrics.json").read_text())
    assert trials[1].state == optuna.trial.TrialState.COMPLETE and trials[1].user_attrs["val"]["size_mb"] > 0
    assert "reused fit of trial 0" in result.stderr
