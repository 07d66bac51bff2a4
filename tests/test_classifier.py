import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    recall_score,
)

from emocompress.models.classifier import EmotionClassifier, classification_metrics, confusion_figure, metrics_report

ID2LABEL = {0: "anger", 1: "joy", 2: "love"}


def _sklearn_report(target, preds):
    return {
        "accuracy": accuracy_score(target, preds),
        "macro_f1": f1_score(target, preds, average="macro"),
        "balanced_accuracy": balanced_accuracy_score(target, preds),
        "cohen_kappa": cohen_kappa_score(target, preds),
        "f1_per_class": f1_score(target, preds, average=None),
        "accuracy_per_class": recall_score(target, preds, average=None),
        "confusion": confusion_matrix(target, preds),
    }


def _assert_report_matches(report, expected, id2label):
    for name in ("accuracy", "macro_f1", "balanced_accuracy", "cohen_kappa"):
        assert report[name] == pytest.approx(expected[name], abs=1e-6), name
    for i, label in id2label.items():
        assert report["per_class"][label]["f1"] == pytest.approx(expected["f1_per_class"][i], abs=1e-6)
        assert report["per_class"][label]["accuracy"] == pytest.approx(expected["accuracy_per_class"][i], abs=1e-6)
    assert report["confusion_matrix"] == expected["confusion"].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_on_random_predictions(seed):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 6, (500,), generator=generator)
    # mostly right, with an imbalance in what is predicted, so the metrics differ from each other
    preds = torch.where(torch.rand(500, generator=generator) < 0.6, target,
                        torch.randint(0, 3, (500,), generator=generator))
    id2label = dict(enumerate("abcdef"))
    metrics = classification_metrics(6)
    for chunk_t, chunk_p in zip(target.split(64), preds.split(64)):  # batched updates, like an epoch
        metrics.update(chunk_p, chunk_t)
    confusion = torch.tensor(confusion_matrix(target, preds))
    report = metrics_report(metrics.compute(), confusion, id2label)
    _assert_report_matches(report, _sklearn_report(target, preds), id2label)
    assert report["per_class"]["a"]["support"] == int((target == 0).sum())


def test_model_trains_with_dropout_on(tiny_model_dir):
    model = EmotionClassifier(tiny_model_dir, ID2LABEL)
    assert all(module.training for module in model.model.modules())
    assert model.model.config.id2label == ID2LABEL
    assert model.model.config.num_labels == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"id2label": {0: "joy"}}, "at least two labels"),
    ({"lr": 0.0}, "model.lr must be positive"),
    ({"warmup_ratio": 1.0}, r"model.warmup_ratio must be in \[0, 1\)"),
    ({"freeze_layers": -1}, "model.freeze_layers must be 0 or more"),
    ({"freeze_layers": 3}, "model.freeze_layers is 3, but .* has 2 layers"),
])
def test_bad_settings_fail_at_construction(tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmotionClassifier(tiny_model_dir, **{"id2label": ID2LABEL, **kwargs})


@pytest.fixture
def trainer(tiny_trainer):
    """``trainer(**overrides)``: the shared tiny Trainer without ModelCheckpoint (a test that needs one saves it)."""
    return lambda **overrides: tiny_trainer(enable_checkpointing=False, **overrides)


def test_fit_uses_class_weights_from_the_datamodule(make_datamodule, tiny_model_dir, trainer):
    dm = make_datamodule(oversample_to=None, batch_size=4)
    model = EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer(max_epochs=1).fit(model, datamodule=dm)
    torch.testing.assert_close(model.class_weights, torch.tensor([15 / 24, 15 / 12, 15 / 9]))
    assert any(not torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    # the logged training loss is the class-weighted cross-entropy
    batch = next(iter(dm.train_dataloader()))
    model.eval()
    with torch.no_grad():
        logits = model(batch)
    weighted = F.cross_entropy(logits, batch["labels"], weight=model.class_weights)
    plain = F.cross_entropy(logits, batch["labels"])
    assert not torch.isclose(weighted, plain)


@pytest.mark.parametrize(("kwargs", "trained_layers"), [
    ({"freeze_embeddings": True}, [0, 1]),
    ({"freeze_layers": 1}, [1]),  # implies the embeddings
])
def test_frozen_parts_do_not_change_and_stay_out_of_the_optimizer(make_datamodule, tiny_model_dir, trainer,
                                                                  kwargs, trained_layers):
    dm = make_datamodule(batch_size=4)
    model = EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2, **kwargs)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=dm)
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("bert.embeddings.") for k in changed)
    for i in range(2):
        layer_changed = any(k.startswith(f"bert.encoder.layer.{i}.") for k in changed)
        assert layer_changed == (i in trained_layers), i
    assert {"classifier.weight", "classifier.bias"} <= changed
    in_optimizer = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert model.model.get_input_embeddings().weight.grad is None


def test_freeze_layers_needs_a_known_encoder(tiny_model_dir, monkeypatch):
    from emocompress.models import structure

    monkeypatch.setattr(structure, "_FAMILIES", {})  # as for an encoder family the project does not map
    with pytest.raises(ValueError, match="model.freeze_layers: .*no attention heads"):
        EmotionClassifier(tiny_model_dir, ID2LABEL, freeze_layers=1)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_works_with_the_fused_optimizer(make_datamodule, tiny_model_dir, trainer, precision):
    def weight_change(clip):
        torch.manual_seed(0)
        dm = make_datamodule(batch_size=4)
        model = EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2)
        before = model.model.base_model.encoder.layer[0].intermediate.dense.weight.detach().clone()
        trainer(max_steps=2, limit_val_batches=0, precision=precision,
                gradient_clip_val=clip).fit(model, datamodule=dm)
        assert model.trainer.optimizers[0].defaults["fused"]
        return (model.model.base_model.encoder.layer[0].intermediate.dense.weight - before).abs().max()

    # Adam's step is about lr whatever the gradient's scale, unless the gradient is clipped far below
    # its eps (1e-8): then the step shrinks by orders of magnitude.
    assert weight_change(clip=1e-12) < 0.01 * weight_change(clip=None)


def test_logged_validation_metrics_equal_sklearn(make_datamodule, tiny_model_dir, trainer):
    dm = make_datamodule(eval_batch_size=3)
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    logged = trainer().validate(model, datamodule=dm)[0]
    # independent predictions over the same split
    model.eval()
    preds, target = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            preds.append(model(batch).argmax(-1))
            target.append(batch["labels"])
    preds, target = torch.cat(preds), torch.cat(target)
    expected = _sklearn_report(target, preds)
    assert len(target) == 7
    for name in ("accuracy", "macro_f1", "balanced_accuracy", "cohen_kappa"):
        assert logged[f"val/{name}"] == pytest.approx(expected[name], abs=1e-6)
    for i, label in dm.id2label.items():
        assert logged[f"val/f1/{label}"] == pytest.approx(expected["f1_per_class"][i], abs=1e-6)
        assert logged[f"val/accuracy/{label}"] == pytest.approx(expected["accuracy_per_class"][i], abs=1e-6)


def test_predict_returns_probabilities_per_text(make_datamodule, tiny_model_dir, trainer):
    dm = make_datamodule()
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    records = [r for batch in trainer().predict(model, datamodule=dm) for r in batch]
    assert sorted(r["line"] for r in records) == list(range(1, 10))  # in batches by length (the writer sorts back)
    for record in records:
        assert set(record["probs"]) == {"anger", "joy", "love"}
        assert sum(record["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert record["label"] == max(record["probs"], key=record["probs"].get)


def test_predict_batches_texts_by_length_and_writes_them_in_input_order(make_datamodule, tiny_model_dir, trainer,
                                                                          tmp_path):
    import json

    from emocompress.callbacks.predictions import JsonlPredictionWriter
    from emocompress.data.sampling import padding_per_text, sort_by_length

    dm = make_datamodule(eval_batch_size=4)
    model = EmotionClassifier(tiny_model_dir, dm.id2label).eval()
    batches = trainer(callbacks=[JsonlPredictionWriter(str(tmp_path / "p.jsonl"))]).predict(model, datamodule=dm)
    lengths = dm.splits["predict"]["length"]
    in_order = [lengths[r["line"] - 1] for batch in batches for r in batch]
    assert in_order == sorted(lengths, reverse=True)  # longest first: each batch pads little
    assert padding_per_text(lengths, sort_by_length(lengths), 4) < padding_per_text(lengths, range(len(lengths)), 4)
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 10))
    texts = dm.texts("test")
    with torch.no_grad():  # each text alone, unpadded: what the sorted, padded batches must equal
        alone = [model.model(**dm.tokenizer(t, return_tensors="pt")).logits.softmax(-1)[0].tolist() for t in texts]
    for record, text, probs in zip(records, texts, alone):
        assert record["text"] == text
        assert list(record["probs"].values()) == pytest.approx(probs, abs=1e-5)


def test_confusion_figure_shows_counts_and_row_percentages():
    fig = confusion_figure(torch.tensor([[3, 1], [0, 2]]), ["joy", "sadness"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["3\n75.0%", "1\n25.0%", "0\n0.0%", "2\n100.0%"]


def test_init_checkpoint_starts_from_a_fine_tuned_network(make_datamodule, tiny_model_dir, trainer, tmp_path):
    dm = make_datamodule(batch_size=4)
    tuned = EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2)
    fitted = trainer(max_steps=2, limit_val_batches=0)
    fitted.fit(tuned, datamodule=dm)
    fitted.save_checkpoint(tmp_path / "tuned.ckpt")
    started = EmotionClassifier(tiny_model_dir, dm.id2label, init_checkpoint=str(tmp_path / "tuned.ckpt"))
    for name, value in tuned.model.state_dict().items():
        assert torch.equal(started.model.state_dict()[name], value), name
    assert started.model.training  # and it fine-tunes with dropout on


def test_init_checkpoint_errors(emotion_dir, tiny_model_dir, tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.init_checkpoint: cannot read a Lightning checkpoint"):
        EmotionClassifier(tiny_model_dir, ID2LABEL, init_checkpoint=str(tmp_path / "junk.ckpt"))
    torch.save({"state_dict": {"model.classifier.weight": torch.zeros(5, 16)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="does not fit"):
        EmotionClassifier(tiny_model_dir, ID2LABEL, init_checkpoint=str(tmp_path / "other.ckpt"))


def test_planted_pickle_is_refused_without_running(tiny_model_dir, malicious_checkpoint):
    path, marker = malicious_checkpoint
    with pytest.raises(ValueError, match="model.init_checkpoint: refused to load .* could run code"):
        EmotionClassifier(tiny_model_dir, ID2LABEL, init_checkpoint=str(path))
    assert not marker.exists()


def test_model_folder_code_does_not_run_without_trust_remote_code(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForSequenceClassification": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = EmotionClassifier(str(folder), ID2LABEL)
        assert type(model.model).__name__ == "BertForSequenceClassification"  # the library's own code
    except ValueError as err:  # or transformers refuses outright
        assert "trust_remote_code" in str(err)
    assert not marker.exists()


@pytest.mark.parametrize("predicted", [False, True], ids=["never_predicted", "predicted"])
def test_a_class_absent_from_the_split_is_reported_as_absent_not_zero(predicted):
    # class "d" has no text in the split; "predicted": the model still predicts it once
    target = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    preds = torch.tensor([0, 1, 1, 1, 2, 0, 2, 3 if predicted else 0])
    id2label = dict(enumerate("abcd"))
    metrics = classification_metrics(4)
    metrics.update(preds, target)
    report = metrics_report(metrics.compute(), torch.tensor(confusion_matrix(target, preds, labels=range(4))),
                            id2label)
    assert report["per_class"]["d"] == {"f1": None, "accuracy": None, "support": 0}
    assert report["absent_classes"] == ["d"]
    f1 = f1_score(target, preds, average=None, labels=[0, 1, 2])
    assert [report["per_class"][label]["f1"] for label in "abc"] == pytest.approx(f1.tolist(), abs=1e-6)
    # macro F1: as sklearn's default (the classes in the split or predicted): a prediction of "d" costs a 0
    assert report["macro_f1"] == pytest.approx(f1_score(target, preds, average="macro"), abs=1e-6)
    assert report["macro_f1"] == pytest.approx(f1.sum() / (4 if predicted else 3), abs=1e-6)
