"""The OpenVINO backend: fp32 and NNCF INT8 folders against torch, their checks, the server on them, and the
predictor's length-sorted batches."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.compression.export import export_onnx
from emocompress.compression.openvino import convert, export_openvino, macro_f1, quantize_ir
from emocompress.compression.quantization import Int8Quantization
from emocompress.deploy.format import read_metadata
from emocompress.deploy.serve import ArtifactPredictor, main
from emocompress.models.classifier import EmotionClassifier
from emocompress.models.loading import OrtClassifier, load_artifact
from emocompress.models.students import SmallEncoderClassifier, SmallEncoderConfig
from tests.conftest import REPO, write_split
from tests.test_deploy import _BLOCKED_SERVE, ATOL, _logits, _test_texts, _train

ov = pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino package")
pytest.importorskip("nncf", reason="OpenVINO INT8 needs the nncf package")


@pytest.fixture(scope="module")
def bert(tiny_teacher_dir, tmp_path_factory):
    """(trained tiny BERT, its tokenizer)"""
    train_file = write_split(tmp_path_factory.mktemp("emotion") / "train.txt", {"anger": 8, "joy": 4, "love": 2},
                             seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    return _train(AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir), tokenizer, train_file), tokenizer


@pytest.fixture(scope="module")
def ov_fp32(bert, tmp_path_factory):
    return export_openvino(bert[0], tmp_path_factory.mktemp("ov") / "fp32", bert[1])


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    write_split(folder / "test.txt", {"anger": 6, "joy": 6, "love": 5}, seed=3)
    return _test_texts(folder)


def test_fp32_folder_matches_torch_and_serves(bert, ov_fp32, texts):
    model, tokenizer = bert
    meta = read_metadata(ov_fp32)
    assert (meta.backend, meta.precision, meta.labels) == ("openvino", "fp32", ["anger", "joy", "love"])
    assert {p.name for p in ov_fp32.iterdir()} >= {"model.xml", "model.bin", "tokenizer.json", "config.json"}
    reference = _logits(model, tokenizer, texts)
    loaded = load_artifact(ov_fp32)
    assert isinstance(loaded, OrtClassifier) and loaded.session is None
    torch.testing.assert_close(_logits(loaded, tokenizer, texts), reference, rtol=0, atol=ATOL)
    served = ArtifactPredictor(ov_fp32).predict(texts)
    probs = torch.tensor([list(p["probs"].values()) for p in served], dtype=torch.float32)
    torch.testing.assert_close(probs, reference.softmax(-1), rtol=0, atol=ATOL)


def test_length_sorted_batches_answer_in_input_order(ov_fp32, texts):
    texts = texts + ["", "happy " * 40]  # an empty text and a long one, among the short ones
    one_by_one = ArtifactPredictor(ov_fp32, batch_size=1).predict(texts)
    consecutive = ArtifactPredictor(ov_fp32, batch_size=4, sort_by_length=False)
    by_length = ArtifactPredictor(ov_fp32, batch_size=4)
    for predictor in (consecutive, by_length):
        answers = predictor.predict(texts)
        assert [a["label"] for a in answers] == [a["label"] for a in one_by_one]
        for a, b in zip(answers, one_by_one):
            assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
    assert by_length.padding_stats["texts"] == consecutive.padding_stats["texts"] == len(texts)
    assert by_length.padding_stats["tokens"] == consecutive.padding_stats["tokens"]
    assert by_length.padding_stats["padded_tokens"] < consecutive.padding_stats["padded_tokens"]
    assert by_length.padding_stats["padded_tokens_per_text"] == by_length.padding_stats["padded_tokens"] / len(texts)


def test_float_parts_in_f32_by_default_and_in_openvinos_choice_on_request(ov_fp32, texts, capsys):
    import openvino as ov

    f32, auto = ArtifactPredictor(ov_fp32), ArtifactPredictor(ov_fp32, inference_precision=None)
    assert f32.runtime.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    # OpenVINO's own choice: bf16 on CPUs with AVX512-BF16 or AMX, f32 elsewhere
    assert auto.runtime.compiled.get_property("INFERENCE_PRECISION_HINT") == \
        ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    for a, b in zip(auto.predict(texts), f32.predict(texts)):
        assert a["probs"] == pytest.approx(b["probs"], abs=0.05)  # bf16 moves probabilities a little
    with pytest.raises(SystemExit) as exit_info:
        main([str(ov_fp32), "--inference_precision", "fp64"])
    assert exit_info.value.code == 2 and "--inference_precision" in capsys.readouterr().err


def _edited(folder, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def _four_labels(folder):
    meta = json.loads((folder / "artifact.json").read_text())
    meta["id2label"]["3"] = "fear"
    (folder / "artifact.json").write_text(json.dumps(meta))
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = meta["id2label"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (_four_labels, r"artifact.json: 4 labels .* but its model.xml outputs 3 classes; re-export"),
    (lambda f: (f / "model.xml").write_text("<net>"), r"model.xml: OpenVINO cannot load it .*; re-export"),
    (lambda f: (f / "model.xml").unlink(), r"model.xml.*(not a servable openvino artifact|Could not open).*; re-export"),
], ids=["labels", "corrupt", "missing"])
def test_bad_openvino_folders_are_refused_in_one_line(ov_fp32, tmp_path, edit, message):
    folder = _edited(ov_fp32, tmp_path, edit)
    for reader in (ArtifactPredictor, load_artifact):
        with pytest.raises(ValueError, match=message) as error:
            reader(folder)
        assert "\n" not in str(error.value)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder)])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_int8_agrees_with_torch_and_keeps_macro_f1_within_the_budget(bert, texts, tmp_path):
    model, tokenizer = bert
    labels = [model.config.label2id[x] for x in ["anger"] * 6 + ["joy"] * 6 + ["love"] * 5]
    folder = export_openvino(model, tmp_path / "int8", tokenizer, precision="int8", calibration_texts=texts,
                             validation=(texts, labels), max_drop=0.0)
    assert read_metadata(folder).precision == "int8"
    int8 = _logits(load_artifact(folder), tokenizer, texts)
    fp32 = _logits(model, tokenizer, texts)
    assert (int8.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.8
    # max_drop 0: what NNCF returns scores at least the float model's macro F1 on the validation texts
    assert macro_f1(labels, int8.argmax(-1), 3) >= macro_f1(labels, fp32.argmax(-1), 3) - 1e-9


def _inputs_and_predictions(model, tokenizer, texts: list[str]) -> tuple[list[dict], list[int]]:
    """Each text as OpenVINO inputs (name -> (1, T) int64), and the float model's class for it."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    inputs = [{n: a.numpy() for n, a in tokenizer(t, return_tensors="pt").items() if n in names} for t in texts]
    return inputs, [int(model(**{n: torch.from_numpy(a) for n, a in x.items()}).logits.argmax()) for x in inputs]


@pytest.mark.slow
def test_accuracy_control_reverts_layers_to_meet_a_small_budget(bert, texts):
    # Validation labels are the float model's own predictions (macro F1 1.0), and 4 calibration texts give coarse
    # ranges: plain INT8 flips many labels, so meeting a 0.1 budget takes reverting layers to float.
    model, tokenizer = bert
    inputs, reference = _inputs_and_predictions(model, tokenizer, texts)
    plain = quantize_ir(convert(model), inputs[:4], None, 3)

    def fake_quantize(ov_model):
        return sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ops())

    def f1(ov_model):
        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return macro_f1(reference, [int(compiled(x)[0].argmax()) for x in inputs], 3)

    assert f1(plain) < 0.9
    try:
        controlled = quantize_ir(convert(model), inputs[:4], (inputs, reference), 3, max_drop=0.1)
    except ValueError as error:
        # Whether reverting suffices depends on the CPU's INT8 kernels: on an AVX2 EPYC it did, on a Zen 4 with
        # VNNI the quantizers NNCF keeps cost more than 0.1 after every revert. Then the budget is refused, never
        # shipped.
        assert "could not keep the validation macro-F1 drop within max_drop 0.1" in str(error)
        return
    assert f1(controlled) >= 0.9
    assert 0 < fake_quantize(controlled) < fake_quantize(plain)


def test_a_budget_nncf_cannot_meet_is_refused_not_shipped(bert, texts, monkeypatch):
    # NNCF only logs when it cannot reach max_drop and returns its best model anyway: stand in for that with a
    # model that predicts one class, and check that quantize_ir measures what it got back and refuses it.
    import nncf

    model, tokenizer = bert
    inputs, reference = _inputs_and_predictions(model, tokenizer, texts)
    with torch.no_grad():  # a copy whose head always answers class 0
        broken = copy.deepcopy(model)
        broken.classifier.weight.zero_()
        broken.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", lambda *args, **kwargs: convert(broken))
    with pytest.raises(ValueError, match=r"could not keep the validation macro-F1 drop within max_drop 0.01 \(it is "):
        quantize_ir(convert(model), inputs[:4], (inputs, reference), 3, max_drop=0.01)


@pytest.mark.slow
def test_server_runs_openvino_without_torch_and_reloads_in_a_fresh_process(bert, ov_fp32, texts, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-c", _BLOCKED_SERVE, str(ov_fp32), "--input", str(tmp_path / "in.txt"),
                             "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = ArtifactPredictor(ov_fp32).predict(texts)
    assert [r["label"] for r in records] == [e["label"] for e in expected]
    # load_artifact in a fresh process: the same logits as in this one
    script = ("import sys, json, torch; from emocompress.models.loading import load_artifact; "
              "m = load_artifact(sys.argv[1]); ids = torch.tensor([[2, 7, 3]]); "
              "print(json.dumps(m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.tolist()))")
    fresh = subprocess.run([sys.executable, "-c", script, str(ov_fp32)], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    ids = torch.tensor([[2, 7, 3]])
    here = load_artifact(ov_fp32)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert np.allclose(json.loads(fresh.stdout), here.numpy(), atol=1e-6)


@pytest.mark.slow
def test_overlay_quantizes_with_openvino_when_test_starts(make_datamodule, tiny_model_dir, tiny_trainer, tmp_path):
    init = yaml.safe_load((REPO / "configs/overlays/openvino.yaml").read_text())["trainer"]["callbacks+"][0]
    assert init["class_path"].endswith("Int8Quantization")
    dm = make_datamodule()
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    trainer = tiny_trainer(callbacks=[Int8Quantization(**init["init_args"])])
    logged = trainer.test(model, datamodule=dm)[0]
    folder = tmp_path / init["init_args"]["dirname"]
    assert isinstance(model.model, OrtClassifier) and model.model.path == str(folder / "model.xml")
    assert read_metadata(folder).backend == "openvino" and logged["quant/size_mb"] > 0


def test_openvino_folders_without_openvino_are_refused_in_one_line(ov_fp32, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # a server with only onnxruntime installed
    message = (f"{ov_fp32 / 'model.xml'}: running it needs the openvino package, which is not installed; "
               "pip install openvino")
    with pytest.raises(SystemExit) as exit_info:
        main([str(ov_fp32), "--input", os.devnull])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_artifact(ov_fp32)


def test_onnx_folders_serve_through_the_same_predictor(bert, ov_fp32, texts, tmp_path):
    onnx, openvino = ArtifactPredictor(export_onnx(bert[0], tmp_path / "onnx", bert[1])), ArtifactPredictor(ov_fp32)
    assert (onnx.backend, openvino.backend) == ("onnxruntime", "openvino")
    for a, b in zip(onnx.predict(texts), openvino.predict(texts)):
        assert a["label"] == b["label"] and a["probs"] == pytest.approx(b["probs"], abs=1e-5)


def test_benchmark_loads_and_sizes_openvino_folders(ov_fp32, bert):
    from emocompress.benchmark.variants import count_parameters, load_for_benchmark

    model, _, weights = load_for_benchmark(ov_fp32)
    assert isinstance(model, OrtClassifier) and weights == ov_fp32 / "model.bin"
    total, nonzero = count_parameters(model)
    # the IR's constants: every weight of the torch model, plus a few shape constants
    assert total >= sum(p.numel() for p in bert[0].parameters()) and 0 < nonzero <= total


def test_benchmark_times_openvino_folders_at_each_precision_asked(bert, ov_fp32, emotion_dir, tmp_path):
    from emocompress.benchmark.run import benchmark

    onnx = export_onnx(bert[0], tmp_path / "onnx", bert[1])
    out = tmp_path / "report"
    rows = benchmark({"ov": str(ov_fp32), "onnx": str(onnx)}, data=str(emotion_dir), out_dir=str(out),
                     latency_samples=2, warmup=1, rounds=1, energy=False, openvino_precisions=["f32", "auto"])
    # a row per precision for the OpenVINO folder only; the first precision keeps the model's name
    assert [row["model"] for row in rows] == ["ov", "ov, auto", "onnx"]
    environment = json.loads((out / "environment.json").read_text())
    assert environment["openvino_precisions"] == {"ov": "f32", "ov, auto": "auto"}
    picks = json.loads((out / "fastest.json").read_text())
    assert picks["overall"]["model"] in {"ov", "ov, auto", "onnx"}
    for precisions, message in ([["f32", "f32"]], "each once"), ([["fp64"]], "one of .*'auto'.*got 'fp64'"):
        with pytest.raises(ValueError, match=message):
            benchmark({"ov": str(ov_fp32)}, data=str(emotion_dir), out_dir=str(tmp_path / "bad"),
                      openvino_precisions=precisions[0])
    assert not (tmp_path / "bad").exists()


def test_a_bilstm_student_quantizes_to_an_int8_ir_that_loads(bert, texts, tmp_path):
    # the recurrent layers stay float (openvino.quantize_ir). On the real BiLSTM student (reports/compress_search)
    # NNCF's quantized LSTM weights made the CPU plugin refuse the IR; this tiny one did not reproduce that refusal,
    # so this checks the path (INT8 IR of a BiLSTM, loaded, close to torch), not the refusal itself
    _, tokenizer = bert
    config = SmallEncoderConfig(vocab_size=len(tokenizer), embedding_dim=32, hidden_size=32, encoder="bilstm",
                                num_labels=3, id2label={0: "anger", 1: "joy", 2: "love"})
    student = SmallEncoderClassifier(config).eval()
    folder = export_openvino(student, tmp_path / "int8", tokenizer, precision="int8", calibration_texts=texts)
    assert read_metadata(folder).precision == "int8"
    reference = _logits(student, tokenizer, texts)
    torch.testing.assert_close(_logits(load_artifact(folder), tokenizer, texts), reference, rtol=0, atol=0.05)
