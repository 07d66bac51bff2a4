"""The real command line, run in subprocesses on a tiny model: fit -> test -> predict, DDP, configs."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.__main__ import main as emocompress_main
from emocompress.cli import main
from emocompress.models.classifier import EmotionClassifier
from emocompress.recipes import read_recipes

from .conftest import REPO

CONFIGS = REPO / "configs"


def run_cli(*args, cwd: Path, warnings: str = "ignore") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": warnings, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "emocompress.cli", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    return result


def tiny_args(emotion_dir, tiny_model_dir, *extra):
    return ["-c", CONFIGS / "trainer/default.yaml", "-c", CONFIGS / "overlays/tiny.yaml", "--data.data", emotion_dir,
            "--model.model_name", tiny_model_dir, *extra]


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _assert_half_zero(weights):
    """Exactly half of all entries of ``weights`` are zero: global 50% magnitude pruning, to the weight."""
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))


def _assert_pruned_and_tested_in_int8(run: Path):
    """``run``'s HF export is 50% pruned over its Linear layers, and its test (all 9 texts) ran on ONNX INT8."""
    exported = AutoModelForSequenceClassification.from_pretrained(run / "hf_model")
    _assert_half_zero([m.weight for m in exported.modules() if isinstance(m, torch.nn.Linear)])
    assert json.loads((run / "int8" / "artifact.json").read_text())["backend"] == "onnxruntime"
    assert sum(map(sum, json.loads((run / "test_metrics.json").read_text())["confusion_matrix"])) == 9


def _assert_one_and_two_processes_agree(runs: Path) -> tuple[dict, dict]:
    """``runs``/version_0 (1 process) and version_1 (2 DDP processes) trained the same weights and tested the same;
    returns version_1's (state_dict of last.ckpt, test report)."""
    weights = [torch.load(runs / v / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for v in ("version_0", "version_1")]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=1e-5, rtol=1e-4, msg=name)
    one, two = (json.loads((runs / v / "test_metrics.json").read_text()) for v in ("version_0", "version_1"))
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["macro_f1"] == pytest.approx(one["macro_f1"], abs=1e-6)
    return weights[1], two


@pytest.mark.slow
def test_fit_test_predict(emotion_dir, tiny_model_dir, tmp_path):
    fit = _ok(run_cli("fit", *tiny_args(emotion_dir, tiny_model_dir), cwd=tmp_path))
    run = tmp_path / "logs" / "tiny" / "version_0"
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    # the one epoch of the run is epoch 1 in the summary, as in the per-epoch lines (the file name says epoch=0)
    assert "epoch=0" in best.name and f" at epoch 1: {Path('logs') / 'tiny' / 'version_0'}" in fit.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file()

    # fit tested the best checkpoint and wrote the metrics
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["labels"] == ["anger", "joy", "love"]
    assert sum(map(sum, report["confusion_matrix"])) == 9
    assert set(report) >= {"accuracy", "macro_f1", "balanced_accuracy", "cohen_kappa", "per_class"}

    # the HF export loads without Lightning and gives the best checkpoint's logits
    exported = AutoModelForSequenceClassification.from_pretrained(run / "hf_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf_model")
    assert exported.config.id2label == {0: "anger", 1: "joy", 2: "love"}
    module = EmotionClassifier.load_from_checkpoint(best, map_location="cpu").eval()
    batch = tokenizer(["i feel so happy", "furious today"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, module(batch))

    # test again from the checkpoint in a fresh process: same numbers
    _ok(run_cli("test", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", best), cwd=tmp_path))
    assert json.loads((run.parent / "version_1" / "test_metrics.json").read_text()) == report

    # predict: texts in, JSON lines with labels and probabilities out
    texts = tmp_path / "texts.txt"
    texts.write_text("i feel so happy today\n\ni am furious\nloving and tender\n")
    _ok(run_cli("predict", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", best,
                                      "--data.predict_file", texts), cwd=tmp_path))
    records = [json.loads(line) for line in (run.parent / "version_2" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in records] == [
        (1, "i feel so happy today"), (3, "i am furious"), (4, "loving and tender")]
    for record in records:
        assert record["label"] in report["labels"]
        assert sum(record["probs"].values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(emotion_dir, tiny_model_dir, tmp_path):
    # 1 process x batch 8 and 2 processes x batch 4 see the same global batches (the sampler groups
    # for batch_size * world_size), so with unweighted loss and no dropout they train the same model.
    same = ("--data.class_weighting", "none", "--trainer.max_epochs", 3)
    ddp = ("--trainer.devices", 2, "--trainer.strategy", "ddp")
    _ok(run_cli("fit", *tiny_args(emotion_dir, tiny_model_dir, *same, "--data.batch_size", 8), cwd=tmp_path))
    _ok(run_cli("fit", *tiny_args(emotion_dir, tiny_model_dir, *same, *ddp, "--data.batch_size", 4), cwd=tmp_path))
    runs = tmp_path / "logs" / "tiny"
    _, two = _assert_one_and_two_processes_agree(runs)

    # testing on 2 ranks: 9 test texts, none dropped or counted twice, the same numbers as 1 rank
    best = next((runs / "version_1" / "checkpoints").glob("best-*.ckpt"))
    _ok(run_cli("test", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", best, *ddp), cwd=tmp_path))
    tested = json.loads((runs / "version_2" / "test_metrics.json").read_text())
    assert sum(map(sum, tested["confusion_matrix"])) == 9
    assert tested["confusion_matrix"] == two["confusion_matrix"]
    for name in ("accuracy", "macro_f1", "balanced_accuracy", "cohen_kappa"):
        assert tested[name] == pytest.approx(two[name], abs=1e-6)

    # predicting on 2 ranks: one file, every test text once, in input order
    _ok(run_cli("predict", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", best, *ddp), cwd=tmp_path))
    lines = (runs / "version_3" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["line"] for line in lines] == list(range(1, 10))

    # validating on 2 ranks logs the validation metrics of 1 rank
    _ok(run_cli("validate", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", best), cwd=tmp_path))
    _ok(run_cli("validate", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", best, *ddp), cwd=tmp_path))
    for tag in ("val/macro_f1", "val/accuracy", "val/cohen_kappa", "val/f1/love"):
        assert _last_scalar(runs / "version_5", tag) == pytest.approx(_last_scalar(runs / "version_4", tag), abs=1e-6)


def _last_scalar(run: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return events.Scalars(tag)[-1].value


RECIPES = read_recipes(str(CONFIGS / "recipes.yaml"))


def _print_config(subcommand: str, configs: list[str], capsys, args=()) -> dict:
    """The merged config of ``configs`` (paths as the recipe table writes them, relative to the repository)."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *(arg for file in configs for arg in ("-c", str(REPO / file))), *map(str, args),
              "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", [name for name, recipe in RECIPES.items() if recipe["command"] != "vocab"])
def test_every_recipe_stack_parses(recipe, capsys):
    # the stack of configs/recipes.yaml, as `make recipe NAME=<recipe>` gives it (its fixed args after it)
    stack = RECIPES[recipe]
    config = _print_config(stack["command"], stack["configs"], capsys, stack["args"])
    assert config["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/macro_f1"
    if "--model.model_name" in stack["args"]:  # the network a test-only recipe quantizes
        network = stack["args"][stack["args"].index("--model.model_name") + 1]
        assert config["model"]["init_args"]["model_name"] == network


def _documented_commands() -> list[list[str]]:
    """The arguments of every ``emocompress <subcommand> ...`` command in a bash block of README.md and docs/*.md, as
    the shell splits them (continuation lines and quotes spanning lines joined, comments dropped); not ``serve``,
    which starts a server and has no --print_config."""
    commands, pending = [], ""
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                pending += line + "\n"
                try:
                    words = shlex.split(pending, comments=True)
                except ValueError:  # a quote still open: the command goes on on the next line
                    continue
                pending = ""
                if words[:1] == ["emocompress"] and words[1] != "serve" and words not in commands:
                    commands.append(words)
    return commands


@pytest.mark.parametrize("words", _documented_commands(), ids=" ".join)
def test_every_documented_command_parses(words, capsys, monkeypatch):
    # as a user pastes it, in the repository root; --print_config stops after parsing, so nothing runs
    monkeypatch.chdir(REPO)
    asks_help = {"--help", "--model.help"} & set(words)
    with pytest.raises(SystemExit) as exit_info:
        main([*words[1:], *([] if asks_help else ["--print_config"])])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]


def test_every_config_file_is_in_a_recipe_or_an_overlay():
    # a file under recipes/ or data/ that no recipe stacks is parsed by no test and run by no command
    used = {file for recipe in RECIPES.values() for file in recipe["configs"]}
    files = {str(p.relative_to(REPO)) for folder in ("trainer", "recipes", "data")
             for p in (CONFIGS / folder).rglob("*.yaml")}
    assert files - used == set()


@pytest.mark.parametrize("overlay", sorted(p.name for p in (CONFIGS / "overlays").glob("*.yaml")))
def test_every_overlay_parses_on_the_teacher(overlay, capsys):
    config = _print_config("fit", [*RECIPES["teacher"]["configs"], f"configs/overlays/{overlay}"], capsys)
    assert config["model"]["class_path"] == "emocompress.models.classifier.EmotionClassifier"


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--data.oversample_to" in out and "--model.help" in out and "--trainer.devices" in out


def test_an_unknown_subcommand_lists_them_all(capsys):
    # LightningCLI's own answer offered only fit, validate, test and predict for a mistyped `benchmarkk`
    with pytest.raises(SystemExit) as exit_info:
        emocompress_main(["benchmarkk", "-c", "configs/benchmark/defaults.yaml"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("emocompress: error: unknown subcommand 'benchmarkk'; give one of fit, validate, "
                                       "test, predict, benchmark, vocab, serve, compress (emocompress --help)\n")


@pytest.mark.parametrize(("args", "abbreviated"), [
    (("fit", "--trainer.max_ep", "7", "--print_config"), "--trainer.max_ep"),  # --print_config: no run before the fix
    (("benchmark", "--out", "x"), "--out"),
    (("vocab", "--vocab", "4000", "--data", "x"), "--vocab"),
    (("compress", "--teach", "x"), "--teach"),
    (("serve", "folder", "--max_batch", "3"), "--max_batch"),
], ids=["fit", "benchmark", "vocab", "compress", "serve"])
def test_abbreviated_options_are_refused(args, abbreviated, capsys):
    # argparse's allow_abbrev took `--trainer.max_ep 7` as --trainer.max_epochs 7 (and a typo that is the prefix of one
    # key as that key), silently
    with pytest.raises(SystemExit) as exit_info:
        emocompress_main(list(args))
    assert exit_info.value.code == 2
    assert f"error: unrecognized arguments: {abbreviated} " in capsys.readouterr().err


@pytest.mark.parametrize(("args", "line"), [
    (("fit", "--trainer.max_epochs", "abc"), "trainer.max_epochs: got 'abc', expected int or null; fix "
                                             "--trainer.max_epochs (or the key in your config file)"),
    (("fit", "--model.lr", "fast"), "model.lr: got 'fast', expected float or null; fix --model.lr"),
    (("fit", "--model.warmup", "0.2"), "model.warmup: no such option; see the options with --model.help CLASS"),
    (("fit", "--data.class_weighting", "inverted"), "data.class_weighting: got 'inverted', expected one of 'none', "
                                                    "'inverse', 'sqrt_inverse'; fix --data.class_weighting"),
    (("fit", "--trainer.precision", "17"), "trainer.precision: got '17', expected one of 64, 32, 16, "),
    (("fit", "--data.no_such_key", "1"), "unrecognized arguments: --data.no_such_key 1; check the spelling"),
    (("benchmark", "--models", "a"), "models: got 'a', expected dict; fix --models"),
    (("vocab", "--data", "x", "--vocab_size", "many", "--out_dir", "y"), "vocab_size: got 'many', expected int"),
    (("fit", "-c", "no_such.yaml"), "config: File does not exist: '"),
], ids=["max_epochs", "lr", "warmup", "class_weighting", "precision", "no_such_key", "models", "vocab_size", "config"])
def test_parse_errors_are_one_line_naming_the_key(args, line, capsys):
    # jsonargparse printed the usage (dozens of lines), then its nested report of every Union subtype it tried
    with pytest.raises(SystemExit) as exit_info:
        emocompress_main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emocompress: error: {line}") and err.count("\n") == 1, err


@pytest.mark.parametrize(("model", "expected"), [("EmotionClassifier", "--model.warmup_ratio"),
                                                 ("Distiller", "--model.temperature")])
def test_model_help(model, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", model])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert expected in out and "--model.lr" in out


@pytest.mark.parametrize(("extra", "message"), [
    (("--data.oversample_to", "2"), r"data.oversample_to must be in (0, 1]"),
    (("--data.no_such_key", "1"), "no_such_key"),
    (("--data.class_weighting", "inverted"), "inverted"),
    (("--data.num_workers", "-1"), "data.num_workers must be 0 (load in the main process) or more, got -1"),
])
def test_bad_config_fails_with_a_clear_message(emotion_dir, tiny_model_dir, tmp_path, extra, message, capsys,
                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails_in_process(["fit", *tiny_args(emotion_dir, tiny_model_dir, *extra)], message, capsys)


def _fails_in_process(args, message, capsys):
    # In-process (a subprocess costs seconds of imports): a parse error exits, a bad value raises.
    with pytest.raises((SystemExit, ValueError)) as error:
        main([str(a) for a in args])
    assert message in capsys.readouterr().err + str(error.value)


@pytest.mark.parametrize(("extra", "message"), [
    (("--model.alpha", "2"), "model.alpha must be in [0, 1], got 2.0"),
    (("--model.student", "gru"), "gru"),
    (("--model.temperature", "hot"), "hot"),
])
def test_bad_distill_config_fails_before_any_data_is_read(emotion_dir, tiny_teacher_dir, tmp_path, extra, message,
                                                          capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails_in_process(["fit", *distill_args(emotion_dir, tiny_teacher_dir, tmp_path / "cache", extra=extra)],
                      message, capsys)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_prune_and_quantize_in_one_run_under_ddp(emotion_dir, tiny_model_dir, tmp_path):
    # The real configs, shrunk by tiny.yaml: pruning with recovery during fit, INT8 for the test after
    # it, on 2 DDP processes (where Lightning's own ModelPruning breaks).
    args = ["-c", CONFIGS / "trainer/default.yaml", "-c", CONFIGS / "recipes/prune.yaml", "-c", CONFIGS / "overlays/quantize.yaml",
            "-c", CONFIGS / "overlays/tiny.yaml", "--data.data", emotion_dir, "--model.model_name", tiny_model_dir,
            "--trainer.max_epochs", 2, "--trainer.devices", 2, "--trainer.strategy", "ddp"]
    _ok(run_cli("fit", *args, cwd=tmp_path))
    _assert_pruned_and_tested_in_int8(tmp_path / "logs" / "tiny" / "version_0")


@pytest.mark.parametrize("recipe", [name for name in RECIPES if name.startswith("goemotions_")
                                    and RECIPES[name]["command"] != "vocab"])
def test_every_goemotions_recipe_reads_goemotions(recipe, capsys):
    stack = RECIPES[recipe]
    config = _print_config(stack["command"], stack["configs"], capsys)
    data = config["data"]["data"]
    assert (REPO / data).resolve().is_relative_to((REPO.parent / "shared" / "data" / "goemotions_ekman").resolve())
    teacher = config["model"]["init_args"].get("teacher")
    if teacher:  # the data set's own teacher, not emotion's
        assert teacher.startswith(config["trainer"]["logger"]["init_args"]["save_dir"] + "/")
    if recipe == "goemotions_teacher":  # the tuned imbalance handling replaces the emotion recipe's
        assert (config["data"]["oversample_to"], config["data"]["class_weighting"]) == (None, "sqrt_inverse")


@pytest.mark.parametrize("config", sorted(p.name for p in (CONFIGS / "benchmark").glob("*.yaml")
                                          if p.name != "defaults.yaml"))
def test_benchmark_config_parses(config, capsys):
    # composed on the shared defaults, as `make report NAME=<config>` runs it
    out = _print_config("benchmark", ["configs/benchmark/defaults.yaml", f"configs/benchmark/{config}"], capsys)
    assert out["baseline"] in out["models"] and out["num_threads"] == 2
    assert out["out_dir"].startswith("reports/benchmark")


def distill_args(emotion_dir, teacher_dir, cache, *configs, extra=()):
    """The real distill.yaml (plus ``configs``), shrunk by tiny.yaml, with the tiny teacher."""
    overlays = [arg for name in ("recipes/distill.yaml", *configs) for arg in ("-c", CONFIGS / name)]
    return ["-c", CONFIGS / "trainer/default.yaml", *overlays, "-c", CONFIGS / "overlays/tiny.yaml", "--data.data", emotion_dir,
            "--model.model_name", teacher_dir, "--model.teacher", teacher_dir, "--model.student_layers", "[1]",
            "--model.logits_cache", cache, *extra]


@pytest.mark.slow
def test_distill_fit_test_and_export(emotion_dir, tiny_teacher_dir, tmp_path):
    args = distill_args(emotion_dir, tiny_teacher_dir, tmp_path / "cache")
    _ok(run_cli("fit", *args, cwd=tmp_path))
    run = tmp_path / "logs" / "tiny" / "version_0"
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1
    report = json.loads((run / "test_metrics.json").read_text())
    assert sum(map(sum, report["confusion_matrix"])) == 9
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(best, weights_only=True)["state_dict"]
    assert state and not any(k.startswith("teacher") for k in state)  # the teacher is not saved
    exported = AutoModelForSequenceClassification.from_pretrained(run / "hf_model").eval()
    assert exported.config.num_hidden_layers == 1
    # the benchmark reads the student from the Distiller checkpoint too: the same network as the export
    from emocompress.benchmark.variants import file_sizes_mb, load_for_benchmark, weights_sizes_mb

    from_checkpoint, _, _ = load_for_benchmark(best)
    ids = torch.tensor([[2, 5, 6, 3]])
    with torch.no_grad():
        torch.testing.assert_close(from_checkpoint(input_ids=ids).logits, exported(input_ids=ids).logits)
    # its size is the student as exported, not the checkpoint (optimizer state, hyper-parameters)
    shipped = file_sizes_mb(run / "hf_model" / "model.safetensors")
    assert weights_sizes_mb(from_checkpoint, best) == pytest.approx(shipped, rel=1e-3)
    assert shipped[0] < 0.5 * best.stat().st_size / 1e6
    # the student tests like any model, from its checkpoint, in a fresh process
    _ok(run_cli("test", *args, "--ckpt_path", best, cwd=tmp_path))
    assert json.loads((run.parent / "version_1" / "test_metrics.json").read_text()) == report


@pytest.mark.slow
def test_distill_prune_and_quantize_in_one_run_under_ddp(emotion_dir, tiny_teacher_dir, tmp_path):
    # Distil + Prune + Quant: the student is pruned during distillation and tested as INT8, on 2 processes.
    args = distill_args(emotion_dir, tiny_teacher_dir, tmp_path / "cache", "recipes/prune.yaml", "overlays/quantize.yaml",
                        extra=("--model.student_layers", "[0, 1]", "--trainer.max_epochs", 2,
                               "--trainer.devices", 2, "--trainer.strategy", "ddp"))
    _ok(run_cli("fit", *args, cwd=tmp_path))
    _assert_pruned_and_tested_in_int8(tmp_path / "logs" / "tiny" / "version_0")  # the student
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    assert not any(bool((m.weight == 0).any()) for m in teacher.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.slow
def test_bilstm_student_distils_and_quantizes(emotion_dir, tiny_teacher_dir, tmp_path):
    from emocompress.models.loading import load_artifact
    from emocompress.models.students import SmallEncoderClassifier

    args = distill_args(emotion_dir, tiny_teacher_dir, tmp_path / "cache", "recipes/distill_bilstm.yaml", "overlays/quantize.yaml",
                        extra=("--model.embedding_dim", 8, "--model.hidden_size", 8))
    fit = _ok(run_cli("fit", *args, cwd=tmp_path, warnings="default"))
    run = tmp_path / "logs" / "tiny" / "version_0"
    # the summary once: onnxruntime's quantizer gives the root logger a handler, which must not repeat ours
    assert (fit.stdout + fit.stderr).count(f"fit done; run folder {Path('logs') / 'tiny' / 'version_0'}") == 1
    assert "multiple `ModelCheckpoint`" not in fit.stderr  # known-harmless: the first one is the best-F1 one
    student = AutoModelForSequenceClassification.from_pretrained(run / "hf_model").eval()
    assert isinstance(student, SmallEncoderClassifier) and student.config.encoder == "bilstm"
    tokenizer = AutoTokenizer.from_pretrained(run / "hf_model")
    batch = tokenizer(["i feel so happy today", "furious", "loving and tender, very fond"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        fp32 = student(**batch).logits
    int8 = load_artifact(run / "int8")(**batch).logits
    torch.testing.assert_close(int8, fp32, atol=0.05, rtol=0.05)


@pytest.mark.slow
def test_bilstm_over_its_own_vocabulary_with_augmented_copies(emotion_dir, tiny_teacher_dir, tmp_path):
    # make recipe NAME=distill_bilstm_vocab, shrunk: the vocab subcommand, then the recipe with the student reading it
    vocab = tmp_path / "vocab"
    _ok(run_cli("vocab", "--data", emotion_dir, "--out_dir", vocab, "--vocab_size", 100, cwd=tmp_path))
    args = distill_args(emotion_dir, tiny_teacher_dir, tmp_path / "cache", "recipes/distill_bilstm.yaml",
                        "recipes/distill_bilstm_vocab.yaml", "overlays/quantize.yaml",
                        extra=("--model.model_name", vocab, "--model.embedding_dim", 8, "--model.hidden_size", 8,
                               "--data.augment.copies", 2))
    fit = _ok(run_cli("fit", *args, cwd=tmp_path))
    assert "with 2 augmented copies per text" in fit.stderr
    run = tmp_path / "logs" / "tiny" / "version_0"
    gold = len((emotion_dir / "train.txt").read_text().splitlines())
    [cache] = (tmp_path / "cache").glob("teacher-*.pt")
    assert len(torch.load(cache, weights_only=True)["keys"]) > 2 * gold  # the teacher labelled the copies
    vocab_ids = AutoTokenizer.from_pretrained(vocab).get_vocab()
    for folder in ("hf_model", "int8"):  # the student's tokenizer travels with it
        assert AutoTokenizer.from_pretrained(run / folder).get_vocab() == vocab_ids
    assert AutoModelForSequenceClassification.from_pretrained(run / "hf_model").config.vocab_size == len(vocab_ids)
    # the checkpoint (augmentation settings in its hyperparameters) tests in a fresh process
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    _ok(run_cli("test", *args, "--ckpt_path", best, cwd=tmp_path))
    report = json.loads((run.parent / "version_1" / "test_metrics.json").read_text())
    assert sum(map(sum, report["confusion_matrix"])) == 9


@pytest.mark.slow
def test_distill_and_prune_ddp_two_cpu_processes_match_one(emotion_dir, tiny_teacher_dir, tmp_path):
    # As for the classifier: 1 process x batch 8 and 2 processes x batch 4 see the same global batches;
    # the teacher's logits come from one cache, so both runs distil (and prune) the same student. fp32: under bf16
    # autocast the two runs differ by bf16 rounding (up to 1.5e-4 here), which would hide a real bug.
    same = ("--data.class_weighting", "none", "--trainer.max_epochs", 2, "--trainer.precision", "32-true")
    cache = tmp_path / "cache"
    _ok(run_cli("fit", *distill_args(emotion_dir, tiny_teacher_dir, cache, "recipes/prune.yaml",
                                     extra=(*same, "--data.batch_size", 8)), cwd=tmp_path))
    _ok(run_cli("fit", *distill_args(emotion_dir, tiny_teacher_dir, cache, "recipes/prune.yaml", extra=(
        *same, "--data.batch_size", 4, "--trainer.devices", 2, "--trainer.strategy", "ddp")), cwd=tmp_path))
    weights, _ = _assert_one_and_two_processes_agree(tmp_path / "logs" / "tiny")
    _assert_half_zero([v for k, v in weights.items()
                       if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k])


@pytest.mark.slow
def test_augmented_distillation_ddp_two_cpu_processes_match_one(emotion_dir, tiny_teacher_dir, tmp_path):
    # data.augment under DDP: every rank builds the same copies (seeded, from the same texts) before the sampler
    # shards the rows, so 2 processes x batch 4 train what 1 process x batch 8 trains. Each run labels the copies
    # into a cache of its own, so a rank that built other copies would show in the cache as well as in the weights.
    # alpha 0 (soft labels only): the gold loss averages over a rank's gold rows, and the two ranks of a step hold
    # different numbers of them (copies have none), so with gold labels 2 x 4 is not exactly 1 x 8.
    same = ("--data.class_weighting", "none", "--trainer.max_epochs", 2, "--trainer.precision", "32-true",
            "--data.augment.copies", 2, "--model.alpha", 0)
    caches = [tmp_path / "cache_one", tmp_path / "cache_two"]
    _ok(run_cli("fit", *distill_args(emotion_dir, tiny_teacher_dir, caches[0], extra=(*same, "--data.batch_size", 8)),
                cwd=tmp_path))
    _ok(run_cli("fit", *distill_args(emotion_dir, tiny_teacher_dir, caches[1], extra=(
        *same, "--data.batch_size", 4, "--trainer.devices", 2, "--trainer.strategy", "ddp")), cwd=tmp_path))
    one, two = (torch.load(next(c.glob("teacher-*.pt")), weights_only=True) for c in caches)
    gold = len((emotion_dir / "train.txt").read_text().splitlines())
    assert len(one["keys"]) > 2 * gold and one["keys"] == two["keys"]  # the copies, and the same copies
    torch.testing.assert_close(two["logits"], one["logits"])
    _assert_one_and_two_processes_agree(tmp_path / "logs" / "tiny")


@pytest.mark.slow
def test_planted_pickle_as_ckpt_path_is_refused(emotion_dir, tiny_model_dir, tmp_path, malicious_checkpoint):
    path, marker = malicious_checkpoint
    result = run_cli("test", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", path), cwd=tmp_path)
    assert result.returncode != 0
    assert "--ckpt_path: refused to load" in result.stderr and "could run code" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_sigkilled_distill_prune_fit_resumes_to_the_same_model(tiny_teacher_dir, tmp_path):
    # Distillation with its logits cache and pruning masks, killed mid-epoch with SIGKILL, resumed with
    # --ckpt_path last: the result is the uninterrupted run's, optimizer and schedule included.
    import signal
    import time

    from .conftest import write_split

    data = tmp_path / "data"
    data.mkdir()
    write_split(data / "train.txt", {"anger": 160, "joy": 80, "love": 40}, seed=0)  # 120 steps an epoch
    write_split(data / "val.txt", {"anger": 3, "joy": 2, "love": 2}, seed=1)
    write_split(data / "test.txt", {"anger": 4, "joy": 3, "love": 2}, seed=2)
    args = ["fit", *distill_args(data, tiny_teacher_dir, tmp_path / "cache", "recipes/prune.yaml", extra=(
        "--trainer.max_epochs", 2, "--trainer.limit_train_batches", 1.0, "--trainer.precision", "32-true",
        "--test_after_fit", "false"))]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    _ok(run_cli(*args, cwd=whole))

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", "emocompress.cli", *map(str, args)], cwd=killed, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # in epoch 1, after epoch 0's checkpoint
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["epoch"] == 0  # it died before finishing epoch 1

    _ok(run_cli(*args, "--ckpt_path", "last", cwd=killed))
    assert not (killed / "logs" / "tiny" / "version_1").exists()  # resumed into the killed run's folder
    done = [torch.load(root / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
            for root in (whole, killed)]
    assert done[0]["epoch"] == 1  # last.ckpt is the latest state, whether or not val/macro_f1 improved
    assert done[1]["global_step"] == done[0]["global_step"]
    for name, value in done[0]["state_dict"].items():
        torch.testing.assert_close(done[1]["state_dict"][name], value, atol=1e-6, rtol=1e-6, msg=name)
    for key in ("exp_avg", "exp_avg_sq"):
        for index, state in done[0]["optimizer_states"][0]["state"].items():
            torch.testing.assert_close(done[1]["optimizer_states"][0]["state"][index][key], state[key],
                                       atol=1e-6, rtol=1e-6)
    assert done[1]["lr_schedulers"] == done[0]["lr_schedulers"]


# ---- nothing lost, nothing guessed (issue 10): each refusal is one line, before any training ----
def _run_in_process(args, monkeypatch, cwd):
    monkeypatch.chdir(cwd)
    main([str(a) for a in args])


def _refused(args, capsys, monkeypatch, cwd) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _run_in_process(args, monkeypatch, cwd)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_resume_only_continues_the_run_it_belongs_to(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    args = ["fit", *tiny_args(emotion_dir, tiny_model_dir, "--test_after_fit", "false")]
    _run_in_process(args, monkeypatch, tmp_path)  # version_0: finished, 1 epoch of 1
    finished = tmp_path / "logs" / "tiny" / "version_0"
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}

    err = _refused([*args, "--ckpt_path", "last"], capsys, monkeypatch, tmp_path)
    assert "logs/tiny/version_0 already finished its 1 epochs" in err

    err = _refused([*args, "--model.lr", "5e-4", "--ckpt_path", "last"], capsys, monkeypatch, tmp_path)
    assert "no run under logs/tiny was started with this config" in err and "--trainer.logger.init_args.version" in err

    # A second run of the same config killed before its first epoch end: its folder has a config, no last.ckpt.
    killed = finished.with_name("version_1")
    killed.mkdir()
    (killed / "config.yaml").write_text((finished / "config.yaml").read_text())
    err = _refused([*args, "--ckpt_path", "last"], capsys, monkeypatch, tmp_path)
    assert "logs/tiny/version_1 has no checkpoints/last.ckpt" in err
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == before  # untouched

    # Named explicitly, with more epochs, the finished run is trained further in its own folder.
    _run_in_process([*args, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "0",
                     "--ckpt_path", "last"], monkeypatch, tmp_path)
    assert "resuming logs/tiny/version_0 from logs/tiny/version_0/checkpoints/last.ckpt (epoch 0" in \
        capsys.readouterr().err
    assert torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "logs" / "tiny" / "version_2").exists()


class SigtermInSecondEpoch(Callback):
    """Sends this process a real SIGTERM after the first batch of epoch 1, as a cluster's time limit would; once
    (``sent``), so that the same command resumes."""

    sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0 and not SigtermInSecondEpoch.sent:
            SigtermInSecondEpoch.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_exits_143_and_names_the_resume(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    # Lightning ends fit on SIGTERM with a SystemExit without a code: exit 0, and `make ... && next` went on.
    args = ["fit", *tiny_args(emotion_dir, tiny_model_dir, "--trainer.max_epochs", "2",
                              "--trainer.callbacks+", f"{__name__}.SigtermInSecondEpoch")]
    monkeypatch.setattr(SigtermInSecondEpoch, "sent", False)
    with pytest.raises(SystemExit) as exit_info:
        _run_in_process(args, monkeypatch, tmp_path)
    assert exit_info.value.code == 143
    run = tmp_path / "logs" / "tiny" / "version_0"
    err = capsys.readouterr().err
    assert f"fit interrupted by SIGTERM; resume it from {Path('logs/tiny/version_0/checkpoints/last.ckpt')} with " \
           "the same command and --ckpt_path last" in err
    assert not (run / "hf_model").exists() and not (run / "test_metrics.json").exists()
    _run_in_process([*args, "--ckpt_path", "last"], monkeypatch, tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert (run / "hf_model" / "config.json").is_file() and (run / "test_metrics.json").is_file()


def test_resume_finishes_a_run_killed_during_its_exports(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    # Killed after its last epoch, before hf_model and test_metrics.json were written: resume was refused as
    # "already finished", and the run could never be completed.
    args = ["fit", *tiny_args(emotion_dir, tiny_model_dir)]
    _run_in_process(args, monkeypatch, tmp_path)
    run = tmp_path / "logs" / "tiny" / "version_0"
    report = json.loads((run / "test_metrics.json").read_text())
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    shutil.rmtree(run / "hf_model")
    (run / "test_metrics.json").unlink()
    capsys.readouterr()
    _run_in_process([*args, "--ckpt_path", "last"], monkeypatch, tmp_path)
    assert "finishing logs/tiny/version_0: its 1 epochs are done; writing what is missing: hf_model, " \
           "test_metrics.json" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == last  # not trained further
    assert json.loads((run / "test_metrics.json").read_text()) == report
    assert AutoModelForSequenceClassification.from_pretrained(run / "hf_model").config.id2label[2] == "love"
    assert not (run.parent / "version_1").exists()
    # now complete: a further resume is refused as before
    err = _refused([*args, "--ckpt_path", "last"], capsys, monkeypatch, tmp_path)
    assert "logs/tiny/version_0 already finished its 1 epochs" in err


def test_runs_and_checkpoints_of_version_0_1_still_resume_and_load(emotion_dir, tiny_model_dir, tmp_path, capsys,
                                                                     monkeypatch):
    # 0.1.0 recorded the class paths of its flat modules (emocompress.classifier.EmotionClassifier) in config.yaml
    # and in checkpoints (hyper_parameters' _class_path), its configs had no data.trust_remote_code, and the network
    # was data.model_name (model.model_name was linked from it), in config.yaml and the datamodule's hyper-parameters
    from emocompress.benchmark.variants import load_for_benchmark

    args = ["fit", *tiny_args(emotion_dir, tiny_model_dir)]
    _run_in_process(args, monkeypatch, tmp_path)
    run = tmp_path / "logs" / "tiny" / "version_0"
    report = json.loads((run / "test_metrics.json").read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "emocompress.models.classifier.EmotionClassifier"
    saved["model"]["class_path"] = "emocompress.classifier.EmotionClassifier"
    del saved["data"]["trust_remote_code"]
    assert "tokenizer" not in saved["data"]  # a link target: not saved
    saved["data"]["model_name"] = saved["model"]["init_args"].pop("model_name")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    for path in (best, run / "checkpoints" / "last.ckpt"):  # tested, and resumed
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["hyper_parameters"]["_class_path"] == "emocompress.models.classifier.EmotionClassifier"
        checkpoint["hyper_parameters"]["_class_path"] = "emocompress.classifier.EmotionClassifier"
        data_hparams = checkpoint["datamodule_hyper_parameters"]
        data_hparams["model_name"] = data_hparams.pop("tokenizer")
        torch.save(checkpoint, path)
    shutil.rmtree(run / "hf_model")
    capsys.readouterr()

    _run_in_process([*args, "--ckpt_path", "last"], monkeypatch, tmp_path)  # the old run is this config's run
    assert "finishing logs/tiny/version_0" in capsys.readouterr().err and (run / "hf_model").is_dir()
    _run_in_process(["test", *tiny_args(emotion_dir, tiny_model_dir), "--ckpt_path", best], monkeypatch, tmp_path)
    assert json.loads((run.parent / "version_1" / "test_metrics.json").read_text()) == report
    model, _, _ = load_for_benchmark(best)
    assert model.config.id2label == {0: "anger", 1: "joy", 2: "love"}


def test_test_and_predict_resolve_last_and_best_from_their_run(emotion_dir, tiny_model_dir, tmp_path, capsys,
                                                               monkeypatch):
    # `test --ckpt_path last` loaded nothing (Lightning: "No checkpoint will be loaded") and scored a random head.
    common = tiny_args(emotion_dir, tiny_model_dir)
    err = _refused(["test", *common, "--ckpt_path", "last"], capsys, monkeypatch, tmp_path)
    assert "--ckpt_path last: no run under logs/tiny was started with this config" in err
    _run_in_process(["fit", *common, "--trainer.max_epochs", "2"], monkeypatch, tmp_path)
    run = tmp_path / "logs" / "tiny" / "version_0"
    report = json.loads((run / "test_metrics.json").read_text())
    capsys.readouterr()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_in_process(["test", *common, "--trainer.max_epochs", "2", "--ckpt_path", "best"], monkeypatch, tmp_path)
    assert not [str(w.message) for w in caught if "No checkpoint" in str(w.message) or "at random" in str(w.message)]
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    assert f"test: --ckpt_path best is {best.relative_to(tmp_path)} (run {Path('logs/tiny/version_0')})" in \
        capsys.readouterr().err
    assert json.loads((run.parent / "version_1" / "test_metrics.json").read_text()) == report  # fit tested best

    _run_in_process(["test", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"], monkeypatch, tmp_path)
    assert f"is {Path('logs/tiny/version_0/checkpoints/last.ckpt')}" in capsys.readouterr().err
    _run_in_process(["test", *common, "--ckpt_path", run / "checkpoints" / "last.ckpt"], monkeypatch, tmp_path)
    assert (json.loads((run.parent / "version_2" / "test_metrics.json").read_text())
            == json.loads((run.parent / "version_3" / "test_metrics.json").read_text()))

    # predict with another predict_file is still this run; a changed model setting is not
    texts = tmp_path / "texts.txt"
    texts.write_text("i feel so happy\n")
    _run_in_process(["predict", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last",
                     "--data.predict_file", texts], monkeypatch, tmp_path)
    assert (run.parent / "version_4" / "predictions.jsonl").is_file()
    err = _refused(["test", *common, "--trainer.max_epochs", "2", "--model.lr", "5e-4", "--ckpt_path", "best"],
                   capsys, monkeypatch, tmp_path)
    assert "--ckpt_path best: no run under logs/tiny was started with this config" in err
    err = _refused(["validate", *common, "--trainer.max_epochs", "2", "--trainer.logger", "false",
                    "--ckpt_path", "last"], capsys, monkeypatch, tmp_path)
    assert "--ckpt_path last: without a logger there is no run folder to take it from" in err


@pytest.mark.parametrize("option", ["--trainer.max_epochs", "--trainer.max_steps"])
def test_a_fit_of_zero_epochs_is_refused(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch, option):
    # It exported the random head as hf_model and tested it as if it were a trained model.
    err = _refused(["fit", *tiny_args(emotion_dir, tiny_model_dir, option, "0")], capsys, monkeypatch, tmp_path)
    assert f"{option.removeprefix('--')} 0: fit would train nothing and export the untrained model" in err
    assert not (tmp_path / "logs").exists()


def test_resume_refuses_changed_data_unless_told(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    # An edited train.txt (same path, same config) was resumed silently, with a schedule sized for the old epoch.
    import hashlib

    args = ["fit", *tiny_args(emotion_dir, tiny_model_dir, "--test_after_fit", "false")]
    _run_in_process(args, monkeypatch, tmp_path)
    run = tmp_path / "logs" / "tiny" / "version_0"
    train = emotion_dir / "train.txt"
    recorded = json.loads((run / "data_fingerprint.json").read_text())
    assert set(recorded) == {"train", "val", "test"}
    assert recorded["train"] == {"file": str(train), "bytes": train.stat().st_size,
                                 "sha256": hashlib.sha256(train.read_bytes()).hexdigest()}
    assert f"data train: {train} ({train.stat().st_size} bytes, sha256 {recorded['train']['sha256'][:16]})" in \
        capsys.readouterr().err  # in the run summary

    train.write_text(train.read_text() + "i am so glad today;joy\n")
    more = [*args, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "0", "--ckpt_path", "last"]
    err = _refused(more, capsys, monkeypatch, tmp_path)
    assert f"data: {train} changed since {Path('logs/tiny/version_0')} was trained on it" in err
    assert "--data_changed_ok true" in err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # not resumed

    _run_in_process([*more, "--data_changed_ok", "true"], monkeypatch, tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert json.loads((run / "data_fingerprint.json").read_text())["train"]["bytes"] == train.stat().st_size


def test_model_and_checkpoint_mistakes_are_one_line(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    # transformers/huggingface_hub tracebacks before: a mistyped folder is tried as a hub repo id
    err = _refused(["fit", *tiny_args(emotion_dir, tiny_model_dir, "--model.model_name", "./nope")], capsys,
                   monkeypatch, tmp_path)
    assert "model.model_name './nope' (or a model the config names) cannot be loaded" in err
    # a checkpoint of another hidden size: torch's state_dict error with a Lightning traceback before
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.bert.embeddings.word_embeddings.weight": torch.zeros(30, 8)},
                "pytorch-lightning_version": "2.6.0", "epoch": 0, "global_step": 1}, other)
    err = _refused(["test", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", other)], capsys, monkeypatch,
                   tmp_path)
    assert f"--ckpt_path {other}: its weights do not fit this model" in err


def test_fit_and_test_without_a_logger(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    # LearningRateMonitor (base.yaml) crashed a fit with --trainer.logger false
    args = tiny_args(emotion_dir, tiny_model_dir, "--trainer.logger", "false")
    _run_in_process(["fit", *args], monkeypatch, tmp_path)
    best = next((tmp_path / "logs" / "checkpoints").glob("best-*.ckpt"))
    assert (tmp_path / "logs" / "hf_model" / "config.json").is_file()
    assert (tmp_path / "logs" / "data_fingerprint.json").is_file()
    _run_in_process(["test", *args, "--ckpt_path", best], monkeypatch, tmp_path)
    assert json.loads((tmp_path / "logs" / "test_metrics.json").read_text())["labels"] == ["anger", "joy", "love"]


def test_a_new_fit_never_overwrites_a_named_run(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    # the Makefile's seed, sweep and tuning runs name their folders: run twice, the second must not replace the first
    args = ["fit", *tiny_args(emotion_dir, tiny_model_dir, "--test_after_fit", "false",
                              "--trainer.logger.init_args.version", "seed_1")]
    _run_in_process(args, monkeypatch, tmp_path)
    run = tmp_path / "logs" / "tiny" / "seed_1"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert run / "config.yaml" in before and run / "checkpoints" / "last.ckpt" in before
    err = _refused(args, capsys, monkeypatch, tmp_path)
    assert "logs/tiny/seed_1 already holds a run, which this fit would overwrite" in err and "--ckpt_path last" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # untouched


def test_fit_without_a_test_split_stops_before_training(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    (emotion_dir / "test.txt").unlink()
    err = _refused(["fit", *tiny_args(emotion_dir, tiny_model_dir)], capsys, monkeypatch, tmp_path)
    assert "has no test split, and fit tests the best checkpoint" in err and "--test_after_fit false" in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip"])
def test_broken_checkpoints_are_named(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch, content):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(content)
    err = _refused(["test", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", broken)], capsys, monkeypatch,
                   tmp_path)
    assert f"--ckpt_path: cannot read a Lightning checkpoint from {broken}" in err
    err = _refused(["fit", *tiny_args(emotion_dir, tiny_model_dir, "--model.init_checkpoint", broken)], capsys,
                   monkeypatch, tmp_path)
    assert f"model.init_checkpoint: cannot read a Lightning checkpoint from {broken}" in err
    err = _refused(["test", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", tmp_path / "nope.ckpt")], capsys,
                   monkeypatch, tmp_path)
    assert f"--ckpt_path: {tmp_path / 'nope.ckpt'} does not exist" in err
    err = _refused(["test", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", tiny_model_dir)], capsys,
                   monkeypatch, tmp_path)
    assert f"--ckpt_path: {tiny_model_dir} is a folder; give a .ckpt file" in err and "--model.model_name" in err


def test_a_broken_save_to_disk_folder_is_named_as_data(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # its FileNotFoundError reached the handler for models: "model.model_name ... cannot be loaded"
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train", "validation", "test"]}')
    err = _refused(["fit", *tiny_args(saved, tiny_model_dir)], capsys, monkeypatch, tmp_path)
    assert f"emocompress: error: data: {saved} has a dataset_dict.json but cannot be loaded" in err
    assert "model.model_name" not in err


def test_limit_batches_stay_integers_after_scikit_learn_was_imported(emotion_dir, tiny_model_dir, tmp_path):
    # typing caches Unions by equality: scikit-learn's Optional[Union[float, int]], built before Lightning's
    # Optional[Union[int, float]], made jsonargparse read `1` (one batch) as 1.0 (every batch) in that process
    code = "import sys, sklearn.metrics; from emocompress.cli import main; main(sys.argv[1:])"
    args = ["fit", *tiny_args(emotion_dir, tiny_model_dir), "--trainer.limit_train_batches", "1", "--print_config"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^  limit_train_batches: 1$", done.stdout, re.MULTILINE), done.stdout


def test_testing_a_fresh_head_warns_loudly(emotion_dir, tiny_model_dir, tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="test WITHOUT --ckpt_path on a model whose classification head was just "
                                         "initialised at random"):
        _run_in_process(["test", *tiny_args(emotion_dir, tiny_model_dir)], monkeypatch, tmp_path)


def test_a_checkpoint_predicted_at_another_max_length_warns(emotion_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                             recwarn):
    _run_in_process(["fit", *tiny_args(emotion_dir, tiny_model_dir, "--test_after_fit", "false",
                                       "--data.max_length", "16")], monkeypatch, tmp_path)
    best = next((tmp_path / "logs" / "tiny" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    recwarn.clear()
    # the run's setting: no warning; the default 128 tokens: the checkpoint's texts would be cut elsewhere than its
    # ONNX export (artifact.json: 16) cuts them
    predict = ["predict", *tiny_args(emotion_dir, tiny_model_dir, "--ckpt_path", best)]
    _run_in_process([*predict, "--data.max_length", "16"], monkeypatch, tmp_path)
    assert not [w for w in recwarn if "was trained with" in str(w.message)]
    with pytest.warns(UserWarning, match=rf"predict: data.max_length is 128, but {re.escape(str(best))} was trained "
                                         r"with 16: texts of more than 16 tokens are cut otherwise .* pass "
                                         r"--data.max_length 16$"):
        _run_in_process(predict, monkeypatch, tmp_path)
    # its hf_model export as the model, without --ckpt_path: its tokenizer records the 16
    exported = tmp_path / "logs" / "tiny" / "version_0" / "hf_model"
    with pytest.warns(UserWarning, match=rf"test: data.max_length is 128, but {re.escape(str(exported))} was trained "
                                         r"with 16: .* pass --data.max_length 16$"):
        _run_in_process(["test", *tiny_args(emotion_dir, exported)], monkeypatch, tmp_path)


@pytest.mark.slow
def test_data_errors_print_one_line_without_a_traceback(emotion_dir, tiny_model_dir, tmp_path):
    (emotion_dir / "val.txt").write_text("happy day;joy\nglum day;gloom\n")
    result = run_cli("fit", *tiny_args(emotion_dir, tiny_model_dir), cwd=tmp_path)
    assert result.returncode == 2
    assert f"emocompress: error: {emotion_dir / 'val.txt'}:2: unknown label 'gloom'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("precision", "native", "expected"), [
    ("bf16-mixed", False, "32-true"), ("bf16-mixed", True, "bf16-mixed"),
    # Lightning runs 16-mixed on a CPU as bf16-mixed (fp16 AMP has no CPU kernels): the same fallback applies
    ("16-mixed", False, "32-true"), ("16", False, "32-true"), ("16-mixed", True, "bf16-mixed")])
def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(emotion_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                              precision, native, expected):
    # Emulated bf16 trained 14x slower than fp32 on an AVX2-only CPU: the teacher's bf16 default would crawl.
    from emocompress.cli import EmoCLI, EmotionClassifier, EmotionDataModule

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.chdir(tmp_path)
    args = ["fit", *map(str, tiny_args(emotion_dir, tiny_model_dir, "--trainer.precision", precision))]
    with pytest.warns(UserWarning, match="no native bf16") if not native else contextlib.nullcontext():
        cli = EmoCLI(EmotionClassifier, EmotionDataModule, subclass_mode_model=True, args=args[1:], run=False)
    assert cli.trainer.precision == expected


@pytest.mark.parametrize("given", ["flag", "config"])
@pytest.mark.parametrize("model_class", ["EmotionClassifier", "Distiller"])
def test_model_name_is_the_network_and_links_the_data_tokenizer(emotion_dir, tiny_teacher_dir, tmp_path, capsys,
                                                                monkeypatch, given, model_class):
    # data.model_name decided which network was pruned or distilled; the model's own argument does now, for every
    # model class, and the datamodule tokenizes with the tokenizer of that network.
    from emocompress.cli import EmoCLI, EmotionClassifier, EmotionDataModule
    from emocompress.compression.distillation import Distiller

    monkeypatch.chdir(tmp_path)
    args = ["-c", CONFIGS / "trainer/default.yaml", "-c", CONFIGS / "overlays/tiny.yaml", "--data.data", emotion_dir]
    if model_class == "Distiller":
        args += ["--model.class_path", "emocompress.compression.distillation.Distiller",
                 "--model.teacher", tiny_teacher_dir]
    if given == "flag":
        args += ["--model.model_name", tiny_teacher_dir]
    else:
        network = {"model": {"init_args": {"model_name": tiny_teacher_dir}}}
        (tmp_path / "network.yaml").write_text(yaml.safe_dump(network))
        args += ["-c", tmp_path / "network.yaml"]
    cli = EmoCLI(EmotionClassifier, EmotionDataModule, subclass_mode_model=True, args=[*map(str, args)], run=False)
    assert type(cli.model) is {"EmotionClassifier": EmotionClassifier, "Distiller": Distiller}[model_class]
    assert cli.model.hparams.model_name == cli.datamodule.hparams.tokenizer == tiny_teacher_dir
    assert cli.datamodule.tokenizer.name_or_path == tiny_teacher_dir

    capsys.readouterr()
    with pytest.raises(SystemExit):  # a link target: one setting, so tokenizer and network cannot disagree
        main(["fit", *map(str, args), "--data.tokenizer", tiny_teacher_dir])
    assert capsys.readouterr().err == ('emocompress: error: Linked "data.tokenizer" must be given via '
                                       '"model.init_args.model_name".\n')


def test_a_checkpoint_save_that_fails_midway_leaves_the_earlier_file(emotion_dir, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    # Lightning writes to a temp file in the system temp dir and moves it: across filesystems that is a copy,
    # which a full disk cuts short, leaving a truncated best-*.ckpt where the file was.
    import errno

    from emocompress.cli import EmoCLI, EmotionClassifier, EmotionDataModule
    from emocompress.models import checkpoints

    monkeypatch.chdir(tmp_path)
    cli = EmoCLI(EmotionClassifier, EmotionDataModule, subclass_mode_model=True, run=False,
                 args=[*map(str, tiny_args(emotion_dir, tiny_model_dir))])
    io = cli.trainer.strategy.checkpoint_io
    target = tmp_path / "checkpoints" / "best-epoch=0.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, target)
    before = target.read_bytes()

    # 1. The system temp dir on another filesystem: a rename out of it fails (EXDEV), the copy runs out of space.
    elsewhere = tmp_path / "other-filesystem"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    rename = os.rename

    def cross_device_rename(src, dst, *args, **kwargs):
        if str(src).startswith(str(elsewhere)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst, *args, **kwargs)

    def copy_until_full(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:20])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", cross_device_rename)
    monkeypatch.setattr(shutil, "copyfile", copy_until_full)  # what shutil.move's copy2 calls

    # 2. The disk fills while the checkpoint itself is written
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    for failure in ({}, {"save": disk_full}):
        target.write_bytes(before)
        for name, replacement in failure.items():
            monkeypatch.setattr(checkpoints.torch, name, replacement)
        with contextlib.suppress(OSError):  # raising is fine; replacing the earlier file with half a file is not
            io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, target)
        # the earlier checkpoint or the new one, whole
        assert torch.load(target, weights_only=True)["epoch"] == (0 if failure else 1)
        assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp file left behind


def _structured_args(emotion_dir, model_dir, *configs, extra=()):
    """structured_prune.yaml (+ ``configs``) shrunk by tiny.yaml: units scored on 1 batch, removed at step 1."""
    overlays = [arg for name in ("trainer/default.yaml", "overlays/quantize.yaml", *configs, "recipes/structured_prune.yaml", "overlays/tiny.yaml")
                for arg in ("-c", CONFIGS / name)]
    return [*overlays, "--data.data", emotion_dir, "--model.model_name", model_dir,
            "--trainer.callbacks.init_args.start_step", 1, "--trainer.callbacks.init_args.score_batches", 1,
            "--data.class_weighting", "none", "--trainer.max_epochs", 2, "--trainer.precision", "32-true", *extra]


@pytest.mark.slow
def test_structured_prune_ddp_two_cpu_processes_match_one(emotion_dir, tiny_model_dir, tmp_path):
    # Taylor scores averaged across ranks: 2 processes x batch 4 remove the same heads and neurons as 1 process x
    # batch 8, although only the single process rebuilds at once (DDP holds masks until the end of training).
    from emocompress.models import pretrained, structure

    _ok(run_cli("fit", *_structured_args(emotion_dir, tiny_model_dir, extra=("--data.batch_size", 8)), cwd=tmp_path))
    _ok(run_cli("fit", *_structured_args(emotion_dir, tiny_model_dir, extra=(
        "--data.batch_size", 4, "--trainer.devices", 2, "--trainer.strategy", "ddp")), cwd=tmp_path))
    runs = tmp_path / "logs" / "tiny"
    one, two = (pretrained.load_model(str(runs / v / "hf_model")) for v in ("version_0", "version_1"))
    assert structure.shape(two) == structure.shape(one)
    assert sum(s["heads"] for s in structure.shape(one)) == 2 and sum(s["ffn"] for s in structure.shape(one)) == 32
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    reports = [json.loads((runs / v / "test_metrics.json").read_text()) for v in ("version_0", "version_1")]
    assert reports[0]["confusion_matrix"] == reports[1]["confusion_matrix"]
    assert json.loads((runs / "version_1" / "int8" / "artifact.json").read_text())["backend"] == "onnxruntime"
    with pytest.raises(ValueError, match="emocompress.models.pretrained.load_model"):
        AutoModelForSequenceClassification.from_pretrained(runs / "version_0" / "hf_model")
    # the pruned export is a model like any other for the next command: test it as model.model_name
    _ok(run_cli("test", *tiny_args(emotion_dir, runs / "version_0" / "hf_model"), cwd=tmp_path))
    assert json.loads((runs / "version_2" / "test_metrics.json").read_text())["confusion_matrix"] == \
        reports[0]["confusion_matrix"]


@pytest.mark.slow
def test_structured_prune_recovers_under_distillation(emotion_dir, tiny_teacher_dir, tmp_path):
    from emocompress.models import pretrained, structure

    args = _structured_args(emotion_dir, tiny_teacher_dir, "recipes/distill.yaml", extra=(
        "-c", CONFIGS / "recipes/structured_prune_distill.yaml", "--model.model_name", tiny_teacher_dir,
        "--model.teacher", tiny_teacher_dir, "--model.logits_cache", tmp_path / "cache"))
    _ok(run_cli("fit", *args, cwd=tmp_path))
    student = pretrained.load_model(str(tmp_path / "logs" / "structured_prune_distill" / "version_0" / "hf_model"))
    assert sum(s["heads"] for s in structure.shape(student)) == 2
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)  # never pruned
    assert structure.shape(teacher) == [{"heads": 2, "ffn": 32}] * 2


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--trainer.max_epochs", "-2", "trainer: `max_epochs` must be a non-negative integer or -1"),
    ("--trainer.devices", "-3", "trainer: `devices` selected with `CPUAccelerator` should be an int > 0"),
    ("--trainer.limit_train_batches", "-1", "trainer: You have passed invalid value -1 for limit_train_batches"),
    ("--trainer.accumulate_grad_batches", "0", "trainer.accumulate_grad_batches must be at least 1, got 0"),
])
def test_trainer_settings_lightning_refuses_are_one_line(emotion_dir, tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                         option, value, message):
    # Lightning's MisconfigurationException, TypeError and (accumulate 0) ZeroDivisionError were tracebacks
    err = _refused(["fit", *tiny_args(emotion_dir, tiny_model_dir, option, value)], capsys, monkeypatch, tmp_path)
    assert f"emocompress: error: {message}" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_run_folder_in_or_under_a_file_is_refused_before_loading(emotion_dir, tiny_model_dir, tmp_path, capsys,
                                                                   monkeypatch):
    # a FileExistsError/NotADirectoryError traceback once the model and the data had been loaded
    (tmp_path / "notes.txt").write_text("mine")
    for extra, key in ((("--trainer.logger.init_args.save_dir", "notes.txt"), "trainer.logger.init_args.save_dir"),
                       (("--trainer.logger", "false", "--trainer.default_root_dir", "notes.txt/runs"),
                        "trainer.default_root_dir")):
        err = _refused(["fit", *tiny_args(emotion_dir, tiny_model_dir, *extra)], capsys, monkeypatch, tmp_path)
        assert f"emocompress: error: {key} {extra[-1]}: {tmp_path / 'notes.txt'} is a file, so the folder cannot " \
               "be made there" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emotion", "notes.txt"]
