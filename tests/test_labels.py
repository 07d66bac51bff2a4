"""Labels bound to weights (issue 28, case 1): the labels stored with a model (checkpoint, ``config.json``, ONNX
metadata, teacher) are the truth. The same labels in another order are mapped by name, to exactly the numbers of
the original order; another label set is refused in one line naming the file and both lists."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.benchmark.run import benchmark
from emocompress.benchmark.variants import measure
from emocompress.compression.distillation import Teacher
from emocompress.compression.export import export_onnx
from emocompress.deploy.serve import ArtifactPredictor
from emocompress.models.classifier import EmotionClassifier
from emocompress.models.loading import load_artifact

from .conftest import write_split
from .test_cli import _refused as _cli_refused
from .test_cli import _run_in_process, tiny_args

LABELS = ["anger", "joy", "love"]  # the data's own order (sorted train labels)
ORDER = ["love", "anger", "joy"]  # the same labels in another order
COLUMNS = [2, 0, 1]  # LABELS' id of each of ORDER
RENAMED = ["amazement", "anger", "joy"]  # "love" renamed in the data
TEXTS = ["i feel so happy today", "furious and mad", "loving and tender", "the day was quite fond"]


def _data(folder: Path, rename: dict[str, str] | None = None, extra: dict[str, int] | None = None) -> Path:
    """train/val/test files like conftest's ``emotion_dir``, with labels renamed or extra rows of other labels."""
    folder.mkdir(parents=True)
    for name, counts, seed in (("train", {"anger": 8, "joy": 4, "love": 3}, 0),
                               ("val", {"anger": 3, "joy": 2, "love": 2}, 1),
                               ("test", {"anger": 4, "joy": 3, "love": 2}, 2)):
        path = write_split(folder / f"{name}.txt", counts, seed)
        lines = path.read_text().splitlines()
        for old, new in (rename or {}).items():
            lines = [line.replace(f";{old}", f";{new}") for line in lines]
        lines += [f"i feel odd {i};{label}" for label, n in (extra or {}).items() for i in range(n)]
        path.write_text("\n".join(lines) + "\n")
    return folder


def _refused(args, cwd, monkeypatch, capsys) -> str:
    """The one line of the error that the command stopped with (exit 2, no traceback)."""
    err = _cli_refused(args, capsys, monkeypatch, cwd)
    [line] = [line for line in err.splitlines() if line.startswith("emocompress: error:")]
    return line


def _newest_run(cwd: Path) -> Path:
    return max((cwd / "logs" / "tiny").glob("version_*"), key=lambda p: int(p.name.removeprefix("version_")))


def _same_report(a: dict, b: dict):
    """Two test_metrics.json reports with the same numbers, per class by name."""
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "cohen_kappa"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert a["per_class"].keys() == b["per_class"].keys()
    for label, values in b["per_class"].items():
        assert a["per_class"][label] == pytest.approx(values, abs=1e-6), label


@pytest.fixture(scope="module")
def run(tiny_teacher_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(folder with the data, best checkpoint of a fit on it in the data's order): fitted once for this file."""
    root = tmp_path_factory.mktemp("labels")
    data = _data(root / "emotion")
    mp = pytest.MonkeyPatch()
    try:
        _run_in_process(["fit", *tiny_args(data, tiny_teacher_dir, "--test_after_fit", "false",
                                           "--trainer.max_epochs", "5", "--model.lr", "1e-2")], mp, root)
    finally:
        mp.undo()
    return data, next((root / "logs" / "tiny" / "version_0" / "checkpoints").glob("best-*.ckpt"))


def _batch(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)(TEXTS, return_tensors="pt", padding=True)


# ---- --ckpt_path: test and predict ----
def test_checkpoint_tested_and_predicted_in_another_label_order_gives_the_same_numbers(run, tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    data, ckpt = run
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    results = {}
    for name, extra in (("data order", []), ("reordered", ["--data.labels", json.dumps(ORDER)])):
        _run_in_process(["test", *tiny_args(data, tiny_model_dir, "--ckpt_path", ckpt, *extra)], monkeypatch, tmp_path)
        report = json.loads((_newest_run(tmp_path) / "test_metrics.json").read_text())
        _run_in_process(["predict", *tiny_args(data, tiny_model_dir, "--ckpt_path", ckpt, "--data.predict_file", texts,
                                               *extra)], monkeypatch, tmp_path)
        records = [json.loads(line) for line in (_newest_run(tmp_path) / "predictions.jsonl").read_text().splitlines()]
        results[name] = report, records
    (report, records), (reordered, reordered_records) = results["data order"], results["reordered"]
    assert reordered["labels"] == ORDER
    _same_report(reordered, report)
    assert len({r["label"] for r in records}) > 1  # a model that tells classes apart: a wrong mapping would show
    for a, b in zip(records, reordered_records):
        assert a["label"] == b["label"]
        assert list(b["probs"]) == ORDER and b["probs"] == pytest.approx(a["probs"], abs=1e-5)


@pytest.mark.parametrize("case", ["renamed", "other_count"])
def test_checkpoint_against_other_labels_is_refused_naming_both_lists(run, tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys, case):
    _, ckpt = run
    if case == "renamed":
        data, labels = _data(tmp_path / "data", rename={"love": "amazement"}), RENAMED
    else:  # case 9: a checkpoint with another label count
        data, labels = _data(tmp_path / "data", extra={"fear": 3}), sorted([*LABELS, "fear"])
    for subcommand in ("test", "predict"):
        err = _refused([subcommand, *tiny_args(data, tiny_model_dir, "--ckpt_path", ckpt)], tmp_path, monkeypatch,
                       capsys)
        assert str(ckpt) in err and str(LABELS) in err and str(labels) in err and "--data.labels" in err


def test_resuming_a_fit_in_another_label_order_is_refused(run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    # the optimizer's state is kept by class id: a resumed fit keeps the order it was trained in
    data, ckpt = run
    err = _refused(["fit", *tiny_args(data, tiny_model_dir, "--ckpt_path", ckpt, "--data.labels", json.dumps(ORDER))],
                   tmp_path, monkeypatch, capsys)
    assert f"{ckpt}: the run was trained with the labels in the order {LABELS}" in err
    assert f"--data.labels {LABELS}" in err


# ---- model.init_checkpoint ----
def test_init_checkpoint_maps_reordered_labels_by_name_and_refuses_others(run, tiny_model_dir):
    _, ckpt = run
    batch = _batch(tiny_model_dir)
    modules = {tuple(labels): EmotionClassifier(tiny_model_dir, dict(enumerate(labels)), init_checkpoint=str(ckpt),
                                                trim_last_layer=False).eval()
               for labels in (LABELS, ORDER)}
    with torch.no_grad():
        torch.testing.assert_close(modules[tuple(ORDER)](batch), modules[tuple(LABELS)](batch)[:, COLUMNS])
    with pytest.raises(ValueError, match=rf"model\.init_checkpoint: {ckpt}: .*{LABELS}.*{RENAMED}"):
        EmotionClassifier(tiny_model_dir, dict(enumerate(RENAMED)), init_checkpoint=str(ckpt))


# ---- an hf_model export as model.model_name ----
def test_export_as_model_name_maps_reordered_labels_by_name_and_refuses_others(tiny_teacher_dir):
    batch = _batch(tiny_teacher_dir)
    modules = {tuple(labels): EmotionClassifier(tiny_teacher_dir, dict(enumerate(labels))).eval()
               for labels in (LABELS, ORDER)}
    assert not modules[tuple(ORDER)].head_is_new
    with torch.no_grad():
        torch.testing.assert_close(modules[tuple(ORDER)](batch), modules[tuple(LABELS)](batch)[:, COLUMNS])
    config = Path(tiny_teacher_dir) / "config.json"
    with pytest.raises(ValueError, match=rf"{config}: .*{LABELS}.*{RENAMED}.*--data\.labels"):
        EmotionClassifier(tiny_teacher_dir, dict(enumerate(RENAMED)))


def test_export_as_model_name_tests_to_the_same_numbers_in_another_order(run, tiny_teacher_dir, tmp_path, monkeypatch,
                                                                          capsys):
    data, _ = run
    reports = []
    for extra in ([], ["--data.labels", json.dumps(ORDER)]):
        _run_in_process(["test", *tiny_args(data, tiny_teacher_dir, *extra)], monkeypatch, tmp_path)
        reports.append(json.loads((_newest_run(tmp_path) / "test_metrics.json").read_text()))
    _same_report(reports[1], reports[0])
    renamed = _data(tmp_path / "renamed", rename={"love": "amazement"})
    err = _refused(["test", *tiny_args(renamed, tiny_teacher_dir)], tmp_path, monkeypatch, capsys)
    assert str(Path(tiny_teacher_dir) / "config.json") in err and str(RENAMED) in err


# ---- a Distiller's teacher ----
@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_teacher_logits_follow_the_data_order_and_other_labels_are_refused(run, tiny_teacher_dir, source):
    teacher = tiny_teacher_dir if source == "export" else str(run[1])
    where = Path(tiny_teacher_dir) / "config.json" if source == "export" else run[1]
    logits = {tuple(labels): Teacher(teacher, dict(enumerate(labels))).logits(TEXTS) for labels in (LABELS, ORDER)}
    torch.testing.assert_close(logits[tuple(ORDER)], logits[tuple(LABELS)][:, COLUMNS])
    with pytest.raises(ValueError, match=rf"model\.teacher: {where}: .*{LABELS}.*{RENAMED}"):
        Teacher(teacher, dict(enumerate(RENAMED)))


# ---- benchmark rows: .ckpt, hf_model, ONNX folders ----
def _reordered_export(source: str, out: Path) -> Path:
    """A copy of the export ``source`` whose classes are stored in ORDER: the same model, other class ids."""
    model = AutoModelForSequenceClassification.from_pretrained(source)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(param[COLUMNS])
    model.config.id2label = dict(enumerate(ORDER))
    model.config.label2id = {name: i for i, name in enumerate(ORDER)}
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def _reordered_checkpoint(ckpt: Path, out: Path) -> Path:
    """A copy of ``ckpt`` as if trained with ``--data.labels ORDER``."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for key in ("model.classifier.weight", "model.classifier.bias"):
        state["state_dict"][key] = state["state_dict"][key][COLUMNS]
    state["hyper_parameters"]["id2label"] = dict(enumerate(ORDER))
    torch.save(state, out)
    return out


def test_benchmark_rows_map_reordered_labels_by_name(run, tiny_teacher_dir, tmp_path):
    data, ckpt = run
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    reordered = _reordered_export(tiny_teacher_dir, tmp_path / "reordered")
    pairs = {
        "ckpt": (ckpt, _reordered_checkpoint(ckpt, tmp_path / "reordered.ckpt")),
        "hf_model": (tiny_teacher_dir, reordered),
        "onnx": (export_onnx(AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir),
                             tmp_path / "onnx", tokenizer),
                 export_onnx(AutoModelForSequenceClassification.from_pretrained(reordered), tmp_path / "onnx_reordered",
                             tokenizer)),
    }
    for kind, (original, other) in pairs.items():
        a, b = (measure(kind, [str(path)], str(data), "test", 2, 4, None) for path in (original, other))
        assert b.id2label == a.id2label == dict(enumerate(LABELS)), kind
        assert (b.preds[0] == a.preds[0]).all() and (b.target == a.target).all(), kind
        _same_report(b.reports[0], a.reports[0])
    # in one report: paired with the original, nothing differs
    rows = benchmark({"original": tiny_teacher_dir, "reordered": str(reordered), "onnx": str(pairs["onnx"][1])},
                     data=str(data), out_dir=str(tmp_path / "report"), latency_samples=2, warmup=1, rounds=1)
    assert rows[1]["macro_f1"] == rows[0]["macro_f1"] and rows[1]["mcnemar_only_model_correct"] == 0


@pytest.mark.parametrize("kind", ["ckpt", "hf_model", "onnx"])
def test_benchmark_row_with_other_labels_is_refused_naming_the_file(run, tiny_teacher_dir, tmp_path, kind):
    data, ckpt = run
    renamed = _data(tmp_path / "renamed", rename={"love": "amazement"})
    path = {"ckpt": lambda: ckpt, "hf_model": lambda: Path(tiny_teacher_dir),
            "onnx": lambda: export_onnx(AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir),
                                        tmp_path / "onnx", AutoTokenizer.from_pretrained(tiny_teacher_dir))}[kind]()
    file = {"ckpt": path, "hf_model": path / "config.json", "onnx": path / "artifact.json"}[kind]
    with pytest.raises(ValueError, match=rf"{file}: .*{LABELS}.*{RENAMED}"):
        measure(kind, [str(path)], str(renamed), "test", 2, 4, None)


# ---- an ONNX folder's labels against its graph's output width ----
@pytest.fixture(scope="module")
def onnx_export(tiny_teacher_dir, tmp_path_factory) -> Path:
    return export_onnx(AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir),
                       tmp_path_factory.mktemp("export") / "onnx", AutoTokenizer.from_pretrained(tiny_teacher_dir))


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("reader", [ArtifactPredictor, load_artifact], ids=["serve", "load_artifact"])
def test_onnx_folder_with_another_label_count_than_its_graph_is_refused(onnx_export, tmp_path, reader, count):
    folder = shutil.copytree(onnx_export, tmp_path / "onnx")
    id2label = {str(i): f"label{i}" for i in range(count)}
    for name in ("artifact.json", "config.json"):  # both agree, so only the graph tells
        content = json.loads((folder / name).read_text())
        content["id2label"] = id2label
        (folder / name).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"{folder / 'artifact.json'}: {count} labels .* model\.onnx .* 3 classes"):
        reader(folder)


def test_match_checkpoint_classes_reorders_head_and_class_weights_and_refuses_a_reordered_resume(tiny_model_dir):
    from emocompress.models.checkpoints import match_checkpoint_classes

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["class_weights"] = torch.tensor([1.0, 2.0, 3.0])
    checkpoint = {"hyper_parameters": {"id2label": dict(enumerate(LABELS))}, "state_dict": state}
    head = state["model.classifier.weight"].clone()
    with pytest.raises(ValueError, match="best.ckpt: the run was trained with the labels in the order"):
        match_checkpoint_classes(model, checkpoint, ORDER, "best.ckpt", resuming=True)
    match_checkpoint_classes(model, checkpoint, ORDER, "best.ckpt")
    columns = [LABELS.index(label) for label in ORDER]
    assert torch.equal(state["model.classifier.weight"], head[columns])
    assert state["class_weights"].tolist() == [3.0, 1.0, 2.0]
    match_checkpoint_classes(model, {"state_dict": {}}, ORDER, "old.ckpt", resuming=True)  # no labels: as it is
