"""The student vocabulary: a WordPiece tokenizer trained on the train split, used by a small-encoder student
in training, in its exports and in the torch-free server."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from emocompress.cli import main
from emocompress.compression.distillation import Distiller
from emocompress.compression.export import export_onnx, quantize
from emocompress.data.vocabulary import build_tokenizer, train_vocabulary
from emocompress.deploy.serve import ArtifactPredictor
from emocompress.models.students import SmallEncoderClassifier


def test_vocabulary_is_learned_from_the_train_split_only(emotion_dir, tmp_path):
    (emotion_dir / "test.txt").write_text("zyxwvut quixotically;anger\n" * 5)  # words only the test split has
    out = train_vocabulary(str(emotion_dir), str(tmp_path / "vocab"), vocab_size=100, min_frequency=1)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert 60 < len(tokenizer) <= 100
    assert tokenizer.pad_token_id == 0 and tokenizer.mask_token == "[MASK]"
    train_words = {w for line in (emotion_dir / "train.txt").read_text().splitlines()
                   for w in line.rsplit(";", 1)[0].split()}
    vocab = tokenizer.get_vocab()
    assert "quixotically" not in vocab and "zyxwvut" not in vocab
    # the frequent train words are whole entries
    assert sum(w in vocab for w in train_words) >= 0.5 * len(train_words)
    info = json.loads((out / "vocabulary.json").read_text())
    assert info["train_texts"] == len((emotion_dir / "train.txt").read_text().splitlines())
    assert info["unk_rate"] == 0  # every train character is in the alphabet
    # the teacher's special tokens are split out of raw text: an augmented copy's [MASK] is one token
    assert tokenizer.tokenize("i feel [MASK]") == ["i", "feel", "[MASK]"]


def test_vocab_subcommand_and_its_errors(emotion_dir, tmp_path, capsys):
    out = tmp_path / "vocab"
    main(["vocab", "--data", str(emotion_dir), "--out_dir", str(out), "--vocab_size", "120"])
    assert (out / "tokenizer.json").is_file()
    # a model trained on it reads its ids: a new training would not reproduce them, so it stays
    with pytest.raises(SystemExit):
        main(["vocab", "--data", str(emotion_dir), "--out_dir", str(out), "--vocab_size", "150"])
    assert "already holds a vocabulary" in capsys.readouterr().err
    assert json.loads((out / "vocabulary.json").read_text())["lowercase"] is True
    main(["vocab", "--data", str(emotion_dir), "--out_dir", str(out), "--lowercase", "false", "--overwrite", "true"])
    assert json.loads((out / "vocabulary.json").read_text())["lowercase"] is False
    with pytest.raises(SystemExit):
        main(["vocab", "--data", str(emotion_dir), "--out_dir", str(tmp_path / "v2"), "--vocab_size", "10"])
    assert "vocab_size must be at least 100" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["vocab", "--data", str(emotion_dir), "--out_dir", str(notes)])
    assert "is not a vocabulary folder" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "keep me"


def test_small_encoder_student_reads_its_own_vocabulary_end_to_end(emotion_dir, tiny_teacher_dir, make_datamodule,
                                                                tiny_trainer, tmp_path):
    vocab = train_vocabulary(str(emotion_dir), str(tmp_path / "vocab"), vocab_size=100, min_frequency=1)
    dm = make_datamodule(vocab, batch_size=4)
    model = Distiller(teacher=tiny_teacher_dir, student="bilstm", model_name=str(vocab), id2label=dm.id2label,
                      embedding_dim=8, hidden_size=8, lr=1e-2)
    assert isinstance(model.model, SmallEncoderClassifier)
    assert model.model.config.vocab_size == len(dm.tokenizer) <= 100  # not the teacher's vocabulary
    trainer = tiny_trainer(max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["train/kd"] > 0

    # exports carry the student's tokenizer; the server tokenizes with it and agrees with PyTorch
    texts = [line.rsplit(";", 1)[0] for line in (emotion_dir / "test.txt").read_text().splitlines()]
    student = model.model.eval()
    with torch.no_grad():
        reference = student(**dm.tokenizer(texts, padding=True, return_tensors="pt")).logits
    folder = export_onnx(student, tmp_path / "onnx", dm.tokenizer)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == dm.tokenizer.get_vocab()
    served = ArtifactPredictor(folder).predict(texts)
    torch.testing.assert_close(torch.tensor([list(p["probs"].values()) for p in served]), reference.softmax(-1),
                               rtol=0, atol=1e-4)
    int8 = quantize(student, "onnxruntime", include_embeddings=True, out_dir=tmp_path / "int8", tokenizer=dm.tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "int8").get_vocab() == dm.tokenizer.get_vocab()
    assert int8(**dm.tokenizer(texts, padding=True, return_tensors="pt")).logits.shape == reference.shape


def test_build_tokenizer_keeps_case_when_asked():
    tokenizer = build_tokenizer(["Happy Day", "happy day"], vocab_size=100, min_frequency=1, lowercase=False)
    assert tokenizer.tokenize("Happy") == ["Happy"] and tokenizer.tokenize("happy") == ["happy"]
