"""ONNX deployment: fp32 export of every kind of model, INT8 agreement, and the torch-free server."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import prune
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.benchmark.variants import load_for_benchmark
from emocompress.callbacks.export import OnnxExport
from emocompress.compression.export import export_onnx, quantize
from emocompress.deploy import serve
from emocompress.deploy.serve import ArtifactPredictor, main
from emocompress.models.classifier import EmotionClassifier
from emocompress.models.loading import OrtClassifier, load_artifact
from emocompress.models.students import SmallEncoderClassifier, SmallEncoderConfig, keep_layers
from tests.conftest import write_split

# fp32 ONNX Runtime vs PyTorch logits: the same maths in another kernel order and fused ops (~1e-6 seen).
ATOL = 1e-4

# Run the server as a deployment would: importing torch, transformers or lightning raises.
_BLOCKED_SERVE = """
import runpy, sys
for name in ("torch", "transformers", "lightning"):
    sys.modules[name] = None
sys.argv = ["emocompress.deploy.serve", *sys.argv[1:]]
runpy.run_module("emocompress.deploy.serve", run_name="__main__")
"""


def _test_texts(emotion_dir) -> list[str]:
    return [line.rsplit(";", 1)[0] for line in (emotion_dir / "test.txt").read_text().splitlines()]


def _logits(model, tokenizer, texts, max_length=None):
    batch = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _train(model, tokenizer, train_file, steps: int = 60):
    """Full-batch Adam steps on a train split. Trained logits are O(1), so ATOL and argmax agreement
    mean something: a random head's logits differ by about 1e-3 between texts (1e-6 for the BiLSTM)."""
    rows = [line.rsplit(";", 1) for line in train_file.read_text().splitlines()]
    batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([model.config.label2id[label] for _, label in rows])
    torch.manual_seed(0)  # the BiLSTM's dropout
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    # Tensors this small gain nothing from a second thread, and on a busy machine lose 10x waiting for it.
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(**batch).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tiny_teacher_dir, tmp_path_factory):
    """(trained tiny BERT, {"bilstm": trained tiny BiLSTM, "cnn": trained tiny CNN}, tokenizer), trained once
    for this file on emotion_dir's train split. Tests copy before changing them."""
    train_file = write_split(tmp_path_factory.mktemp("emotion") / "train.txt", {"anger": 8, "joy": 4, "love": 2},
                             seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    bert = _train(AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir), tokenizer, train_file)
    students = {}
    for encoder in ("bilstm", "cnn"):
        torch.manual_seed(0)
        config = SmallEncoderConfig(vocab_size=len(tokenizer), embedding_dim=8, hidden_size=6, encoder=encoder,
                                    pad_token_id=tokenizer.pad_token_id, id2label=bert.config.id2label,
                                    label2id=bert.config.label2id)
        students[encoder] = _train(SmallEncoderClassifier(config), tokenizer, train_file)
    return bert, students, tokenizer


@pytest.fixture
def teacher(trained):
    """(the trained tiny BERT, its tokenizer)"""
    return trained[0], trained[2]


def _pruned(bert):
    model = copy.deepcopy(bert)
    linears = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(linears, prune.L1Unstructured, amount=0.5)
    for module, name in linears:
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in linears)
    assert zeros == round(0.5 * sum(m.weight.numel() for m, _ in linears))
    return model


_VARIANTS = {"bert": lambda bert, students: bert,
             "pruned_50": lambda bert, students: _pruned(bert),  # half of all Linear weights zeroed, no recovery
             "layer_cut": lambda bert, students: keep_layers(bert, [1]),  # a copy: the teacher keeps its layers
             "bilstm": lambda bert, students: students["bilstm"],
             "cnn": lambda bert, students: students["cnn"]}
_RECURRENT = ("bilstm", "cnn")  # no token type ids, no position limit


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_fp32_onnx_matches_pytorch_logits(trained, emotion_dir, tmp_path, variant):
    model, tokenizer = _VARIANTS[variant](*trained[:2]), trained[2]
    texts = _test_texts(emotion_dir)  # 2 to 10 words: padded batches
    folder = export_onnx(model, tmp_path / "onnx", tokenizer, max_length=1024)
    reference = _logits(model, tokenizer, texts)

    ort_model = load_artifact(folder)  # the benchmark's loader reads fp32 folders too
    assert isinstance(ort_model, OrtClassifier)
    torch.testing.assert_close(_logits(ort_model, tokenizer, texts), reference, rtol=0, atol=ATOL)

    # the server tokenizes with tokenizers alone: same probabilities as PyTorch on HF-tokenized input
    predictor = ArtifactPredictor(folder)
    served = torch.tensor([list(p["probs"].values()) for p in predictor.predict(texts)], dtype=torch.float32)
    torch.testing.assert_close(served, reference.softmax(-1), rtol=0, atol=ATOL)
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["precision"] == "fp32" and meta["backend"] == "onnxruntime"
    graph_inputs = [i.name for i in predictor.runtime.session.get_inputs()]
    assert meta["input_names"] == graph_inputs
    assert ("token_type_ids" in graph_inputs) == (variant not in _RECURRENT)
    # 1,024 asked: lowered to the tiny BERT's 512 positions; a BiLSTM or CNN has no position limit
    assert meta["max_length"] == (1024 if variant in _RECURRENT else 512)


@pytest.mark.parametrize("variant", ["bert", "bilstm", "cnn"])
def test_int8_onnx_agrees_with_fp32_argmax(trained, emotion_dir, tmp_path, variant):
    model, tokenizer = _VARIANTS[variant](*trained[:2]), trained[2]
    texts = _test_texts(emotion_dir)
    int8 = quantize(model, "onnxruntime", include_embeddings=True, out_dir=tmp_path / "int8", tokenizer=tokenizer)
    fp32_logits = _logits(model, tokenizer, texts)
    reference = fp32_logits.argmax(-1).tolist()
    # INT8 moves logits, so a near-tie may flip: every text whose fp32 winner leads by more than twice the
    # largest INT8 shift keeps its label, and most texts are that clear. Measured on an AVX2-only AMD EPYC (no
    # VNNI): the largest logit shift is 0.02-0.08 with the per-channel 7-bit weights that `quantize` writes, and
    # was 1.6 for the tiny BERT with 8-bit per-tensor weights (int16 saturation), which failed CI. ONNX Runtime
    # picks other INT8 kernels on other CPUs (VNNI, AMX), so the bounds keep a wide margin.
    int8_logits = _logits(int8, tokenizer, texts)
    top2 = fp32_logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    clear = (margins > 1.0).tolist()
    shift = (int8_logits - fp32_logits).abs().max()
    report = f"fp32 margins {[round(m, 2) for m in margins.tolist()]}, largest INT8 logit shift {shift:.2f}"
    assert shift < 0.5, report
    assert sum(clear) >= len(texts) / 2, report
    int8_labels = int8_logits.argmax(-1).tolist()
    assert [a for a, c in zip(int8_labels, clear) if c] == [r for r, c in zip(reference, clear) if c], report
    # the server reads INT8 folders too, with the same metadata
    served = ArtifactPredictor(tmp_path / "int8").predict(texts)
    assert [p["label"] for p in served] == [model.config.id2label[i] for i in int8_labels]
    meta_file = tmp_path / "int8" / "artifact.json"
    assert json.loads(meta_file.read_text())["precision"] == "int8"
    # folders written before the metadata grew: labels and padding come from config.json
    meta_file.write_text(json.dumps({"backend": "onnxruntime", "include_embeddings": True}))
    assert ArtifactPredictor(tmp_path / "int8").predict(texts) == served


@pytest.mark.parametrize(("include_embeddings", "int8_ops"), [(False, {"ConvInteger"}),
                                                                 (True, {"ConvInteger", "DynamicQuantizeLinear"})])
def test_cnn_int8_quantizes_its_convolutions(trained, tmp_path, include_embeddings, int8_ops):
    import onnx

    quantize(trained[1]["cnn"], "onnxruntime", include_embeddings=include_embeddings, out_dir=tmp_path / "int8",
             tokenizer=trained[2])
    graph = onnx.load(tmp_path / "int8" / "model.onnx").graph
    ops = {node.op_type for node in graph.node}
    assert int8_ops <= ops and "Conv" not in ops  # all three kernel widths in INT8
    quantized = {t.name for t in graph.initializer if t.name.endswith("_quantized")}
    assert {f"convolutions.{i}.weight_quantized" for i in range(3)} <= quantized
    # the embedding table (UINT8 for ONNX Runtime's Gather) only with include_embeddings
    assert ("embeddings.weight_quantized" in quantized) == include_embeddings


@pytest.mark.slow
def test_server_runs_without_torch_and_answers_every_line(teacher, emotion_dir, tmp_path):
    model, tokenizer = teacher
    folder = export_onnx(model, tmp_path / "onnx", tokenizer)
    long_text = " ".join(["i", "feel", "so", "happy", "furious", "today"] * 834)  # 5004 words, 5006 tokens
    texts = [*_test_texts(emotion_dir), "", "   ", long_text]
    raw = "\n".join(texts).encode() + b"\ni feel \xff\xfe so angry\n"  # last line is not UTF-8
    done = subprocess.run([sys.executable, "-c", _BLOCKED_SERVE, str(folder)], input=raw, capture_output=True,
                          check=True)
    lines = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]

    decoded = [*texts, "i feel \ufffd\ufffd so angry"]
    assert [r["line"] for r in lines] == list(range(1, len(decoded) + 1))
    assert [r["text"] for r in lines] == decoded
    labels = list(model.config.id2label.values())
    expected = _logits(model, tokenizer, decoded, max_length=128).argmax(-1).tolist()
    assert [r["label"] for r in lines] == [labels[i] for i in expected]
    for record in lines:
        assert list(record["probs"]) == labels
        assert sum(record["probs"].values()) == pytest.approx(1.0, abs=1e-6)

    # the same through files, in this process
    (tmp_path / "in.txt").write_bytes(raw)
    main([str(folder), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl"),
          "--batch_size", "4"])
    from_files = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in from_files] == [r["label"] for r in lines]


def test_server_truncates_at_the_side_the_tokenizer_truncated_in_training(teacher, tmp_path):
    model, tokenizer = teacher
    left = AutoTokenizer.from_pretrained(tokenizer.name_or_path, truncation_side="left")  # keeps a text's end
    folder = export_onnx(model, tmp_path / "onnx", left, max_length=6)
    texts = ["i am so very furious and mad today but happy glad cheerful delighted", "happy"]
    reference = _logits(model, left, texts, max_length=6).softmax(-1)
    right = _logits(model, tokenizer, texts[:1], max_length=6).softmax(-1)
    assert (right[0] - reference[0]).abs().max() > 0.1  # so the check below tells the two sides apart
    served = torch.tensor([list(p["probs"].values()) for p in ArtifactPredictor(folder).predict(texts)])
    torch.testing.assert_close(served, reference, rtol=0, atol=ATOL, check_dtype=False)


def test_server_pads_on_the_side_the_tokenizer_padded_in_training(teacher, tmp_path):
    import onnx

    model, tokenizer = teacher
    left = AutoTokenizer.from_pretrained(tokenizer.name_or_path, padding_side="left")
    folder = export_onnx(model, tmp_path / "onnx", left)
    # attention fused, as OnnxExport writes it, with the (B, T) mask: its default mask assumes right padding
    assert any(node.op_type == "Attention" for node in onnx.load(folder / "model.onnx").graph.node)
    texts = ["happy", "i am so very furious and mad today", "glad cheerful"]  # one batch, three lengths
    reference = _logits(model, left, texts).softmax(-1)  # (3, C), padded on the left
    right = _logits(model, tokenizer, texts).softmax(-1)
    assert (right - reference).abs().max() > 10 * ATOL  # absolute positions: the padding side shows
    predictor = ArtifactPredictor(folder, batch_size=len(texts), sort_by_length=False)
    served = torch.tensor([list(p["probs"].values()) for p in predictor.predict(texts)])
    torch.testing.assert_close(served, reference, rtol=0, atol=ATOL, check_dtype=False)


def test_text_without_tokens_gets_an_error_line(teacher, tmp_path):
    folder = export_onnx(teacher[0], tmp_path / "onnx", teacher[1])
    # a tokenizer that adds no [CLS]/[SEP]: an empty text is then no tokens at all
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    empty, happy = ArtifactPredictor(folder).predict(["", "happy"])
    assert "no tokens" in empty["error"] and "label" not in empty
    assert happy["label"] in teacher[0].config.id2label.values()


def test_predict_refuses_one_string_instead_of_answering_each_character(onnx_folder):
    with pytest.raises(TypeError, match=r"predict takes a list of texts, got one str \('i feel happy'\); pass \[text\]"):
        ArtifactPredictor(onnx_folder).predict("i feel happy")


def test_hf_export_cuts_texts_where_training_did_and_a_later_run_may_take_more(make_datamodule, tiny_model_dir,
                                                                              tiny_trainer, tmp_path):
    from transformers import pipeline

    from emocompress.callbacks.export import HFExport
    from emocompress.models.loading import trained_max_length

    dm = make_datamodule(batch_size=4, max_length=8)
    trainer = tiny_trainer(max_steps=1, callbacks=[HFExport()], enable_checkpointing=False)
    trainer.fit(EmotionClassifier(tiny_model_dir, dm.id2label), datamodule=dm)
    folder = tmp_path / "hf_model"
    long_text = "i feel so very happy today " * 6  # 30 words, over 8 tokens
    # a transformers user cuts at the trained max_length (8), not at the tokenizer's 512/unset limit
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 8 == trained_max_length(folder)
    classify = pipeline("text-classification", model=str(folder), top_k=None)
    assert classify.preprocess(long_text, truncation=True)["input_ids"].shape == (1, 8)
    scores = {s["label"]: s["score"] for s in classify([long_text], truncation=True)[0]}
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    cut = _logits(model, AutoTokenizer.from_pretrained(tiny_model_dir), [long_text], max_length=8).softmax(-1)[0]
    assert [scores[model.config.id2label[i]] for i in range(len(cut))] == pytest.approx(cut.tolist(), abs=1e-6)
    # fine-tuning from the folder may still take a longer max_length, up to the model's 512 positions
    longer = make_datamodule(model_dir=folder, batch_size=4, max_length=32)
    with pytest.raises(ValueError, match="at most 512 tokens"):
        make_datamodule(model_dir=folder, max_length=513)
    again = tiny_trainer(max_steps=1, callbacks=[HFExport("again")], enable_checkpointing=False)
    again.fit(EmotionClassifier(str(folder), longer.id2label), datamodule=longer)
    assert AutoTokenizer.from_pretrained(tmp_path / "again").model_max_length == 32


def test_onnx_export_callback_writes_the_best_model(make_datamodule, emotion_dir, tiny_model_dir, tiny_trainer,
                                                    tmp_path):
    dm = make_datamodule(batch_size=4)
    torch.manual_seed(0)  # the fresh head
    module = EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2)
    # "best" = the earliest step: the first epoch's weights, so best and final weights differ
    best_ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="step", mode="min")
    trainer = tiny_trainer(max_epochs=2, limit_train_batches=2, callbacks=[best_ckpt, OnnxExport()])
    trainer.fit(module, datamodule=dm)
    folder = tmp_path / "onnx"
    assert {"model.onnx", "config.json", "tokenizer.json", "artifact.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "int8.json").exists()
    assert not (tmp_path / "onnx.tmp").exists()
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["id2label"] == {str(i): label for i, label in dm.id2label.items()}
    assert meta["max_length"] == 128  # data.max_length, within the tiny BERT's 512 positions

    assert "epoch=0" in best_ckpt.best_model_path
    texts = _test_texts(emotion_dir)
    served = torch.tensor([list(p["probs"].values()) for p in ArtifactPredictor(folder).predict(texts)])
    best = copy.deepcopy(module.model)
    state = torch.load(best_ckpt.best_model_path, weights_only=True)["state_dict"]
    best.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    reference = _logits(best.eval(), dm.tokenizer, texts).softmax(-1)
    torch.testing.assert_close(served, reference, rtol=0, atol=ATOL, check_dtype=False)
    final = _logits(module.model.eval(), dm.tokenizer, texts).softmax(-1)
    assert (final - reference).abs().max() > 10 * ATOL  # so the check above tells best from final

    model, _, weights = load_for_benchmark(folder)  # `emocompress benchmark` measures the folder
    assert isinstance(model, OrtClassifier) and weights == folder / "model.onnx"


def test_bad_folders_are_clear_errors(teacher, tmp_path, capsys):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'missing'}: not a folder; re-export with .*OnnxExport"):
        ArtifactPredictor(tmp_path / "missing")
    hf_model = tmp_path / "hf_model"
    teacher[0].save_pretrained(hf_model)
    with pytest.raises(ValueError, match=rf"{hf_model}: no artifact.json, so not an INT8 model folder or ONNX export; "
                                         r".*OnnxExport"):
        ArtifactPredictor(hf_model)
    quantize(teacher[0], "torch", out_dir=tmp_path / "int8_torch", tokenizer=teacher[1])
    with pytest.raises(ValueError, match=r"'torch' INT8 folder holds no ONNX graph; .*backend='onnxruntime'"):
        ArtifactPredictor(tmp_path / "int8_torch")
    export_onnx(teacher[0], tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match=r"no_tokenizer: no tokenizer.json, .*with the datamodule's tokenizer"):
        ArtifactPredictor(tmp_path / "no_tokenizer")
    with pytest.raises(SystemExit) as exit_info:
        main([str(hf_model)])
    assert exit_info.value.code == 2
    assert f"{hf_model}: no artifact.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="OnnxExport.dirname must be a plain folder name"):
        OnnxExport(dirname="a/b")


@pytest.fixture(scope="module")
def onnx_folder(trained, tmp_path_factory):
    """One fp32 ONNX export of the trained tiny BERT for this file (exporting costs seconds); copy it to change it."""
    return export_onnx(trained[0], tmp_path_factory.mktemp("export") / "onnx", trained[2])


def _with_meta(onnx_folder, tmp_path, **changes):
    """A copy of ``onnx_folder`` whose artifact.json has ``changes`` (a None value removes the key)."""
    folder = shutil.copytree(onnx_folder, tmp_path / "onnx")
    meta = json.loads((folder / "artifact.json").read_text())
    meta.update(changes)
    (folder / "artifact.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return folder


_BAD_META = {  # artifact.json changes -> what the message says (after the file's path)
    "labels_differ": ({"id2label": {"0": "anger", "1": "joy", "2": "sadness"}},
                      r"id2label .* differs from .*config\.json"),
    "label_gap": ({"id2label": {"0": "anger", "1": "joy", "3": "love"}}, r"id2label must map the class ids 0 to 2"),
    "label_not_int": ({"id2label": {"0": "anger", "1": "joy", "x": "love"}}, r"id2label must map the class ids"),
    "max_length_0": ({"max_length": 0}, r"max_length 0 is not an integer from 1 to the model's 512 positions"),
    "max_length_negative": ({"max_length": -1}, r"max_length -1 is not an integer"),
    "max_length_huge": ({"max_length": 10**9}, r"max_length 1000000000 is not an integer"),
    "max_length_above_positions": ({"max_length": 513}, r"max_length 513 is not an integer"),
    "max_length_text": ({"max_length": "64"}, r"max_length '64' is not an integer"),
    "pad_id_past_vocab": ({"pad_id": 28}, r"pad_id 28 is not a token id of .*tokenizer\.json \(28 tokens\)"),
    "pad_id_negative": ({"pad_id": -1}, r"pad_id -1 is not a token id"),
    "unknown_backend": ({"backend": "tensorrt"}, r"unknown backend 'tensorrt'"),
    "unknown_precision": ({"precision": "int4"}, r"unknown precision 'int4'"),
}


@pytest.mark.parametrize("reader", [ArtifactPredictor, load_artifact], ids=["serve", "load_artifact"])
@pytest.mark.parametrize("case", list(_BAD_META))
def test_bad_metadata_is_refused_naming_the_file(onnx_folder, tmp_path, reader, case):
    changes, message = _BAD_META[case]
    folder = _with_meta(onnx_folder, tmp_path, **changes)
    with pytest.raises(ValueError, match=re.escape(str(folder / "artifact.json")) + ": " + message + ".*re-export with"):
        reader(folder)


def test_metadata_of_older_folders_falls_back_to_config(onnx_folder, tmp_path):
    # INT8 folders written before the metadata grew: only backend and include_embeddings, in int8.json
    folder = _with_meta(onnx_folder, tmp_path, include_embeddings=False, precision=None, input_names=None,
                        max_length=None, id2label=None, pad_token=None, pad_id=None)
    (folder / "artifact.json").rename(folder / "int8.json")
    assert set(json.loads((folder / "int8.json").read_text())) == {"backend", "include_embeddings"}
    predictor = ArtifactPredictor(folder)
    assert predictor.labels == ["anger", "joy", "love"]  # config.json's id2label
    assert predictor.max_length == 128  # the default, within the tiny BERT's 512 positions
    assert isinstance(load_artifact(folder), OrtClassifier)


def _old_named(folder):
    """``folder`` as written before its metadata file was renamed: ``int8.json``, no ``artifact.json``."""
    (folder / "artifact.json").rename(folder / "int8.json")
    return folder


def test_folders_with_the_old_metadata_name_load_serve_and_are_replaced(trained, onnx_folder, emotion_dir, tmp_path,
                                                                         caplog, recwarn):
    texts = _test_texts(emotion_dir)
    folder = _old_named(shutil.copytree(onnx_folder, tmp_path / "onnx"))
    expected = ArtifactPredictor(onnx_folder).predict(texts)
    caplog.clear()
    recwarn.clear()
    # served, loaded and benchmarked as before, and nothing is said about the old name
    assert ArtifactPredictor(folder).predict(texts) == expected
    torch.testing.assert_close(_logits(load_artifact(folder), trained[2], texts),
                               _logits(load_artifact(onnx_folder), trained[2], texts), rtol=0, atol=0)
    model, _, weights = load_for_benchmark(folder)
    assert isinstance(model, OrtClassifier) and weights == folder / "model.onnx"
    assert not caplog.records and not [w for w in recwarn if "int8" in str(w.message)]
    # a torch INT8 folder of then loads too
    torch_int8 = tmp_path / "int8_torch"
    quantize(trained[0], "torch", out_dir=torch_int8, tokenizer=trained[2])
    old_torch_int8 = _old_named(shutil.copytree(torch_int8, tmp_path / "old_int8_torch"))
    torch.testing.assert_close(_logits(load_artifact(old_torch_int8), trained[2], texts),
                               _logits(load_artifact(torch_int8), trained[2], texts), rtol=0, atol=0)
    # its metadata is checked the same, naming the old file
    (folder / "int8.json").write_text(json.dumps({"backend": "tensorrt"}))
    with pytest.raises(ValueError, match=re.escape(str(folder / "int8.json")) + ": unknown backend 'tensorrt'"):
        ArtifactPredictor(folder)
    # an export over it replaces it (it is an artifact folder) and writes only the new name
    export_onnx(trained[0], folder, trained[2])
    assert (folder / "artifact.json").is_file() and not (folder / "int8.json").exists()
    assert ArtifactPredictor(folder).predict(texts) == expected


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_serve_refuses_to_write_over_its_input(onnx_folder, tmp_path, capsys, spelling):
    text_file = tmp_path / "texts.txt"
    text_file.write_text("i feel so happy\nfurious\n")
    output = {"same": str(text_file), "dotted": f"{tmp_path}/./texts.txt",
              "symlink": str(tmp_path / "link.txt")}[spelling]
    if spelling == "symlink":
        (tmp_path / "link.txt").symlink_to(text_file)
    with pytest.raises(SystemExit) as exit_info:
        main([str(onnx_folder), "--input", str(text_file), "--output", output])
    assert exit_info.value.code == 2
    assert "is the --input file" in capsys.readouterr().err
    assert text_file.read_text() == "i feel so happy\nfurious\n"


def test_serve_crash_midway_keeps_the_earlier_output(onnx_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "SORT_WINDOW", 1)  # a file read one batch at a time, as stdin is
    text_file, out_file = tmp_path / "texts.txt", tmp_path / "out.jsonl"
    text_file.write_text("i feel so happy\nfurious\nloving\nglad\nmad\n")
    main([str(onnx_folder), "--input", str(text_file), "--output", str(out_file), "--batch_size", "2"])
    earlier = out_file.read_text()
    assert len(earlier.splitlines()) == 5

    predict, calls = serve.ArtifactPredictor.predict, []

    def fail_after_first_chunk(self, texts):
        calls.append(len(texts))
        if len(calls) > 1:
            raise RuntimeError("killed midway")
        return predict(self, texts)

    monkeypatch.setattr(serve.ArtifactPredictor, "predict", fail_after_first_chunk)
    with pytest.raises(RuntimeError, match="killed midway"):
        main([str(onnx_folder), "--input", str(text_file), "--output", str(out_file), "--batch_size", "2"])
    assert calls == [2, 2]  # the first chunk was written (to the temporary file) before the crash
    assert out_file.read_text() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "texts.txt"]  # no temporary file left


def test_export_never_replaces_a_folder_it_did_not_write(teacher, tmp_path):
    model, tokenizer = teacher
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes: exists and is not an artifact folder \(no artifact\.json\)"):
        export_onnx(model, mine, tokenizer)
    assert (mine / "todo.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    folder = export_onnx(model, tmp_path / "onnx", tokenizer)
    assert export_onnx(model, folder, tokenizer) == folder  # an earlier export is replaced


def test_server_answers_with_a_structurally_pruned_model(teacher, emotion_dir, tmp_path):
    # uneven layers (1 head and 20 neurons, then 2 heads and 9): exported, optimized and served without torch
    from emocompress.models import structure

    model, tokenizer = copy.deepcopy(teacher[0]), teacher[1]
    structure.layers(model)[0].keep(heads=torch.tensor([1]), ffn=torch.arange(20))
    structure.layers(model)[1].keep(ffn=torch.arange(0, 27, 3))
    structure.record(model)
    folder = export_onnx(model, tmp_path / "onnx", tokenizer)
    texts = _test_texts(emotion_dir)
    done = subprocess.run([sys.executable, "-c", _BLOCKED_SERVE, str(folder)], input="\n".join(texts).encode(),
                          capture_output=True, check=True)
    served = [json.loads(line)["label"] for line in done.stdout.decode("utf-8").splitlines()]
    labels = list(model.config.id2label.values())
    assert served == [labels[i] for i in _logits(model.eval(), tokenizer, texts).argmax(-1).tolist()]


# ---- issue 28 cases 8 and 9 (serve): texts between \n's, physical lines, one-line errors, co-process use ----
def test_serve_splits_on_newlines_only_and_numbers_physical_lines(onnx_folder, tmp_path):
    texts = ["one\rtext", "crlf", "cr before crlf\r", "", "line\u2028separator \x0b\x0c\x1c\x85 kept", "last"]
    (tmp_path / "in.txt").write_bytes("one\rtext\ncrlf\r\ncr before crlf\r\r\n\r\nline\u2028separator \x0b\x0c\x1c\x85 "
                                      "kept\nlast".encode())
    main([str(onnx_folder), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n")[:-1]]
    assert [r["text"] for r in records] == texts
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["label"] for r in records] == [p["label"] for p in ArtifactPredictor(onnx_folder).predict(texts)]


def test_serve_max_padding_cuts_calls_not_answers(onnx_folder, tmp_path, monkeypatch, capsys):
    """--max_padding (0.25 by default) cuts a sorted batch into calls; the answers are those of whole batches."""
    texts = ["a", "so happy", "i am so angry at you right now because you never listen to me at all", "b", "ok"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    calls = []
    feeds = serve.ArtifactPredictor._feeds
    monkeypatch.setattr(serve.ArtifactPredictor, "_feeds", lambda self, enc: calls.append(len(enc)) or feeds(self, enc))
    answers = {}
    for flag in ([], ["--max_padding", "0.25"], ["--max_padding", "100"]):
        calls.clear()
        main([str(onnx_folder), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl"), *flag])
        answers[tuple(flag)] = [json.loads(line)["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        answers[tuple(flag) + ("calls",)] = list(calls)
    assert answers[()] == answers[("--max_padding", "0.25")] == answers[("--max_padding", "100")]
    assert answers[("calls",)] == answers[("--max_padding", "0.25", "calls")] and len(answers[("calls",)]) > 1
    assert answers[("--max_padding", "100", "calls")] == [5]  # one call: no padding bound
    with pytest.raises(SystemExit) as exit_info:
        main([str(onnx_folder), "--input", str(tmp_path / "in.txt"), "--max_padding", "-1"])
    assert exit_info.value.code == 2 and "max_padding must be at least 0" in capsys.readouterr().err


def _more_tokens(spec: dict) -> None:
    """Token ids past the tiny BERT's embedding table (28 rows): the tokenizer of another model."""
    size = len(spec["model"]["vocab"])
    spec["model"]["vocab"] |= {f"extra{i}": size + i for i in range(5)}


_UNUSABLE = {  # case -> (file, its new bytes or a change to the tokenizer's JSON, the message)
    "tokenizer_not_json": ("tokenizer.json", b"\x00garbage", r"tokenizer\.json: cannot read it .*re-export"),
    "tokenizer_not_a_tokenizer": ("tokenizer.json", lambda spec: spec["model"].update(type="NoSuchModel"),
                                  r"tokenizer\.json: not a tokenizers file .*re-export"),
    "model_not_onnx": ("model.onnx", b"not a protobuf at all", r"model\.onnx: onnxruntime cannot load it .*re-export"),
    "vocab_too_big": ("tokenizer.json", _more_tokens, r"model\.onnx: fails on token id 32, the last of "
                                                      r"tokenizer\.json's 33 tokens .*not the model's: re-export with"),
}


@pytest.mark.parametrize("case", list(_UNUSABLE))
def test_serve_refuses_unusable_files_in_one_line(onnx_folder, tmp_path, capsys, case):
    name, change, message = _UNUSABLE[case]
    folder = shutil.copytree(onnx_folder, tmp_path / "onnx")
    if isinstance(change, bytes):
        (folder / name).write_bytes(change)
    else:
        spec = json.loads((folder / name).read_text())
        change(spec)
        (folder / name).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=message):
        ArtifactPredictor(folder).predict(["extra4 happy"])
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--input", os.devnull])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(folder) in error and "Traceback" not in error


def test_serve_without_the_folders_runtime_names_the_package_in_one_line(onnx_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # a server with only openvino installed
    with pytest.raises(SystemExit) as exit_info:
        main([str(onnx_folder), "--input", os.devnull])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"{onnx_folder / 'model.onnx'}: running it needs the onnxruntime package, which is not installed; "
        "pip install onnxruntime")


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "{tmp}/missing.txt"], r"--input .*missing\.txt does not exist; give a text file"),
    (["--input", "{tmp}"], r"--input .* is a folder; give a text file"),
    (["--input", "{tmp}/in.txt", "--output", "{tmp}"], r"--output .* is a folder; give the path of the JSON-lines"),
    (["--input", "{tmp}/in.txt", "--output", "{tmp}/in.txt/sub/out.jsonl"],
     r"--output .*/in\.txt/sub/out\.jsonl: .*/in\.txt/sub: .*/in\.txt is a file, so the folder cannot be made there"),
])
def test_serve_refuses_bad_input_and_output_paths_in_one_line(onnx_folder, tmp_path, capsys, args, message):
    (tmp_path / "in.txt").write_text("happy\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(onnx_folder), *(a.format(tmp=tmp_path) for a in args)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def _serve_shell(folder, redirect: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = f'"{sys.executable}" -c "$SERVE" "{folder}" --batch_size 1 {redirect}'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"SERVE": _BLOCKED_SERVE}
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_serve_closed_streams_and_early_reader_exit(onnx_folder, tmp_path):
    for redirect, what in (("<&-", "stdin is closed; pipe the texts in or give --input FILE"),
                           (f"--input {os.devnull} >&-", "stdout is closed; give --output FILE")):
        done = _serve_shell(onnx_folder, redirect)
        assert done.returncode == 2, done.stderr
        assert done.stderr.decode().strip().splitlines()[-1].endswith(what)
    (tmp_path / "many.txt").write_text("i feel happy\n" * 5000)
    # the reader stops after one answer: the server ends quietly (no traceback, no "Exception ignored")
    done = _serve_shell(onnx_folder, f'< "{tmp_path / "many.txt"}" | head -1; exit "${{PIPESTATUS[0]}}"')
    assert json.loads(done.stdout)["line"] == 1
    assert done.stderr == b"" and done.returncode == 141


@pytest.mark.slow
def test_serve_answers_each_line_as_it_arrives_with_batch_size_1(onnx_folder):
    import select

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a deployment runs
    server = subprocess.Popen([sys.executable, "-c", _BLOCKED_SERVE, str(onnx_folder), "--batch_size", "1"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        for line_no, text in enumerate(["i feel happy", "one\rtext", "furious"], start=1):
            server.stdin.write(f"{text}\n".encode())
            server.stdin.flush()  # the pipe stays open: the answer must come before the next line or EOF
            ready, _, _ = select.select([server.stdout], [], [], 60)
            assert ready, f"no answer to line {line_no} within 60 s"
            answer = json.loads(server.stdout.readline())
            assert answer["line"] == line_no and answer["text"] == text and "label" in answer
        server.stdin.close()
        assert server.wait(timeout=60) == 0 and server.stdout.read() == b""
    finally:
        server.kill()
