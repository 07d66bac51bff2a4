import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.compression.vocabulary_pruning import VocabularyPruning, coverage, prune_vocabulary, trim_positions

# Train texts that use only part of the tiny BERT's words ("furious", "tender", "today", ... stay out).
TRAIN = ["i feel happy", "i feel so glad", "the day was mad", "i am angry", "really very cheerful"]
IN_VOCAB = ["i feel so happy", "the day was angry", "i am really glad"]


@pytest.fixture(scope="module")
def pruned(tiny_teacher_dir):
    """(original model, original tokenizer, pruned model, pruned tokenizer, stats)."""
    original = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir).eval()
    model, small, stats = prune_vocabulary(model, tokenizer, TRAIN)
    return original, tokenizer, model, small, stats


def _logits(model, tokenizer, texts):
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_pruning_keeps_the_logits_of_in_vocabulary_texts(pruned):
    original, tokenizer, model, small, stats = pruned
    words = {w for t in TRAIN for w in t.split()}
    assert stats["kept_tokens"] == len(words) + 5 == len(small) == model.config.vocab_size  # + the 5 special tokens
    assert model.get_input_embeddings().weight.shape[0] == stats["kept_tokens"] < stats["vocab_size_before"]
    assert stats["params_before"] - stats["params_after"] == (stats["vocab_size_before"] - stats["kept_tokens"]) * 16
    assert small.pad_token_id == 0 and small.convert_ids_to_tokens(small("happy")["input_ids"]) == \
        ["[CLS]", "happy", "[SEP]"]
    torch.testing.assert_close(_logits(model, small, IN_VOCAB), _logits(original, tokenizer, IN_VOCAB))


def test_saved_pruned_model_and_tokenizer_json_agree_after_reload(pruned, tmp_path):
    from emocompress.models.pretrained import load_model, load_tokenizer

    original, tokenizer, model, small, stats = pruned
    model.save_pretrained(tmp_path)
    small.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert len(spec["model"]["vocab"]) == stats["kept_tokens"]
    assert spec["post_processor"]["special_tokens"]["[CLS]"]["ids"] == [spec["model"]["vocab"]["[CLS]"]]
    reloaded, retok = load_model(str(tmp_path)).eval(), load_tokenizer(str(tmp_path))
    assert reloaded.config.vocab_size == len(retok) == stats["kept_tokens"]
    assert retok.get_vocab() == small.get_vocab()
    torch.testing.assert_close(_logits(reloaded, retok, IN_VOCAB), _logits(original, tokenizer, IN_VOCAB))


def test_pruned_model_exports_to_onnx_and_serves(pruned, tmp_path):
    from emocompress.compression.export import export_onnx
    from emocompress.deploy.serve import ArtifactPredictor

    original, tokenizer, model, small, _ = pruned
    export_onnx(model, tmp_path / "onnx", small)
    predictor = ArtifactPredictor(tmp_path / "onnx")  # also runs the tokenizer's last id through the graph
    probs = torch.tensor([[p["probs"][label] for label in predictor.labels] for p in predictor.predict(IN_VOCAB)])
    expected = _logits(original, tokenizer, IN_VOCAB).softmax(-1)
    torch.testing.assert_close(probs, expected, atol=1e-4, rtol=1e-4)


def test_coverage_counts_test_tokens_outside_the_kept_set(pruned):
    _, tokenizer, _, small, _ = pruned
    # "furious" and "today" are in the tiny vocabulary but not in TRAIN; "zzz" is unknown to both tokenizers.
    report = coverage(tokenizer, small, ["i am furious today", "i feel happy", "zzz glad"])
    assert report == {"texts": 3, "tokens": 9, "outside_tokens": 2, "outside_rate": 2 / 9, "texts_changed": 1,
                      "unk_before": 1, "unk_after": 3}


def test_extra_texts_and_min_count_choose_the_kept_tokens(tiny_teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    _, small, stats = prune_vocabulary(model, tokenizer, ["i feel happy", "i feel"], extra_texts=["tender"],
                                       min_count=2)
    assert set(small.get_vocab()) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "feel", "tender"}
    assert stats["extra_texts"] == 1 and stats["min_count"] == 2


def test_trimmed_positions_keep_the_logits_of_texts_within_the_length(tiny_teacher_dir, tmp_path):
    from emocompress.compression.export import quantize
    from emocompress.models.pretrained import load_model, load_tokenizer

    original = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir).eval()
    params = sum(p.numel() for p in model.parameters())
    assert trim_positions(model, tokenizer, 8) == (512 - 8) * 16
    assert sum(p.numel() for p in model.parameters()) == params - (512 - 8) * 16
    assert model.config.max_position_embeddings == 8 == tokenizer.model_max_length
    assert trim_positions(model, tokenizer, 8) == 0  # already that short
    texts = ["i feel so happy", "the day was angry and mad"]  # 6 and 8 tokens with [CLS] and [SEP]
    expected = _logits(original, tokenizer, texts)
    torch.testing.assert_close(_logits(model, tokenizer, texts), expected)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    retok = load_tokenizer(str(tmp_path / "hf"))
    assert retok.model_max_length == 8 and len(retok("i feel so happy and glad today", truncation=True)["input_ids"]) == 8
    torch.testing.assert_close(_logits(load_model(str(tmp_path / "hf")).eval(), retok, texts), expected)
    int8 = quantize(model, "onnxruntime", include_embeddings=True, out_dir=tmp_path / "int8", tokenizer=tokenizer,
                    max_length=8)
    torch.testing.assert_close(_logits(int8, tokenizer, texts), expected, atol=0.05, rtol=0.05)


def test_trim_positions_refuses_a_model_without_a_position_table():
    class NoTable(torch.nn.Module):
        base_model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="NoTable has no absolute position table"):
        trim_positions(NoTable(), None, 8)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_count": 0}, "VocabularyPruning.min_count must be a positive integer"),
    ({"extra_texts_file": "missing.txt"}, "VocabularyPruning.extra_texts_file: missing.txt is not an existing"),
    ({"filename": "../stats.json"}, "VocabularyPruning.filename must be a plain file name"),
    ({"max_positions": 0}, "VocabularyPruning.max_positions must be a positive integer or null"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        VocabularyPruning(**kwargs)
    assert "\n" not in str(err.value)


def test_a_tokenizer_without_wordpiece_is_refused(tiny_teacher_dir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, "[UNK]")),
                                         unk_token="[UNK]")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    with pytest.raises(ValueError, match="has a WordLevel tokenizer; vocabulary pruning rewrites a fast WordPiece"):
        prune_vocabulary(model, word_level, ["a"])


def test_callback_prunes_before_fit_and_writes_its_stats(make_datamodule, tiny_model_dir, tiny_trainer, tmp_path):
    from emocompress.callbacks.export import HFExport
    from emocompress.models.classifier import EmotionClassifier
    from emocompress.models.pretrained import load_model, load_tokenizer

    dm = make_datamodule(batch_size=4)
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    trainer = tiny_trainer(max_steps=2, callbacks=[VocabularyPruning(), HFExport()], enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    stats = json.loads((tmp_path / "vocab_pruning.json").read_text())
    assert stats["kept_tokens"] == len(dm.tokenizer) == model.model.config.vocab_size < stats["vocab_size_before"]
    assert max(max(ids) for ids in dm.splits["train"]["input_ids"]) < stats["kept_tokens"]
    assert stats["test"]["tokens"] > 0 and 0 <= stats["test"]["outside_tokens"] <= stats["test"]["tokens"]
    trainer.test(model, datamodule=dm)  # sets up again: the model is not pruned twice
    assert model.model.config.vocab_size == stats["kept_tokens"]
    exported = load_model(str(tmp_path / "hf_model"))
    assert exported.config.vocab_size == len(load_tokenizer(str(tmp_path / "hf_model"))) == stats["kept_tokens"]


@pytest.mark.slow
def test_cli_fit_with_pruned_vocabulary_exports_serves_and_tests_from_its_checkpoint(emotion_dir, tiny_model_dir,
                                                                                    tmp_path):
    from emocompress.deploy.serve import ArtifactPredictor
    from emocompress.models.pretrained import load_model, load_tokenizer
    from tests.test_cli import CONFIGS, run_cli, tiny_args

    overlays = ["-c", CONFIGS / "overlays/vocab_prune.yaml", "-c", CONFIGS / "overlays/quantize.yaml",
                "-c", CONFIGS / "overlays/energy.yaml"]
    args = [*tiny_args(emotion_dir, tiny_model_dir), *overlays]
    fit = run_cli("fit", *args, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "logs" / "tiny" / "version_0"
    stats = json.loads((run / "vocab_pruning.json").read_text())
    assert load_model(str(run / "hf_model")).config.vocab_size == len(load_tokenizer(str(run / "hf_model"))) \
        == stats["kept_tokens"]
    assert json.loads((run / "test_metrics.json").read_text())["energy"]["fit"]["energy_kwh"] > 0
    assert "energy:" in fit.stderr and "kWh" in fit.stderr  # the end-of-run summary
    assert len(ArtifactPredictor(run / "int8").predict(["i feel happy", "furious"])) == 2
    # a fresh process builds the unpruned network; the callback prunes it to the checkpoint's shape before it loads
    test = run_cli("test", *args, "--ckpt_path", "best", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]


def test_callback_trims_positions_to_at_least_the_data_length(make_datamodule, tiny_model_dir, tiny_trainer, tmp_path):
    from emocompress.callbacks.export import HFExport
    from emocompress.models.classifier import EmotionClassifier
    from emocompress.models.pretrained import load_model

    dm = make_datamodule(batch_size=4, max_length=16)
    too_short = tiny_trainer(max_steps=1, callbacks=[VocabularyPruning(max_positions=8)], enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"max_positions \(8\) is below data.max_length \(16\)"):
        too_short.fit(EmotionClassifier(tiny_model_dir, dm.id2label), datamodule=dm)
    dm = make_datamodule(batch_size=4, max_length=16)
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    trainer = tiny_trainer(max_steps=2, callbacks=[VocabularyPruning(max_positions=16), HFExport()],
                           enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    stats = json.loads((tmp_path / "vocab_pruning.json").read_text())
    exported = load_model(str(tmp_path / "hf_model"))
    assert stats["max_positions"] == exported.config.max_position_embeddings == 16 == dm.tokenizer.model_max_length
    assert stats["params_after"] == sum(p.numel() for p in exported.parameters())
