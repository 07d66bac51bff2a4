"""The augmented transfer set: perturbation rules, the datamodule's copies, and their training by the teacher alone."""

import random

import pytest
import torch

from emocompress.compression.distillation import Distiller, distillation_losses
from emocompress.data.augment import Augmentation, augmented_texts, perturb
from emocompress.models.classifier import EmotionClassifier


def test_perturbation_rates_match_the_probabilities():
    words = [f"w{i}" for i in range(20000)]
    out = perturb(words, random.Random(0), ["SWAP"], "[MASK]", Augmentation(p_mask=0.1, p_swap=0.2, p_ngram=0))
    assert len(out) == len(words)
    masked, swapped = out.count("[MASK]") / len(out), out.count("SWAP") / len(out)
    assert masked == pytest.approx(0.1, abs=0.01)
    assert swapped == pytest.approx(0.9 * 0.2, abs=0.01)  # swapping applies to the words left unmasked
    # n-gram sampling keeps a window of consecutive words, 1 to max_ngram long
    lengths = []
    for seed in range(200):
        window = perturb(words[:10], random.Random(seed), ["x"], "[MASK]",
                         Augmentation(p_mask=0, p_swap=0, p_ngram=1, max_ngram=4))
        start = words.index(window[0])
        assert window == words[start:start + len(window)]
        lengths.append(len(window))
    assert set(lengths) == {1, 2, 3, 4}


@pytest.mark.parametrize("kwargs, message", [
    ({"copies": 0}, "data.augment.copies must be a positive integer"),
    ({"p_mask": 1.5}, r"data.augment.p_mask must be in \[0, 1\]"),
    ({"max_ngram": 0}, "data.augment.max_ngram must be a positive integer"),
])
def test_bad_augmentation_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**kwargs)


def test_copies_are_seeded_and_swap_in_words_of_the_texts():
    texts = ["i feel sad today", "so very happy"]
    copies, rows = augmented_texts(texts, Augmentation(copies=50, p_mask=0, p_swap=0.5, p_ngram=0, seed=3), "[MASK]")
    assert rows == [0] * 50 + [1] * 50
    seen = {word for text in texts for word in text.split()}
    assert {word for copy in copies for word in copy.split()} <= seen
    assert copies != augmented_texts(texts, Augmentation(copies=50, p_mask=0, p_swap=0.5, p_ngram=0, seed=4),
                                     "[MASK]")[0]


def test_datamodule_adds_copies_after_the_gold_texts(make_datamodule, tiny_teacher_dir):
    plain = make_datamodule(tiny_teacher_dir, batch_size=4)
    plain.setup("fit")
    dm = make_datamodule(tiny_teacher_dir, batch_size=4, augment=Augmentation(copies=2))
    dm.setup("fit")
    gold = plain.texts("train")
    texts = dm.texts("train")
    assert texts[:len(gold)] == gold and len(texts) == 3 * len(gold)
    assert dm.splits["train"]["gold"] == [1] * len(gold) + [0] * 2 * len(gold)
    assert "[MASK]" in " ".join(texts[len(gold):])
    # copies keep their text's class: oversampling and class weights see the same proportions
    assert dm.counts_before == [3 * n for n in plain.counts_before]
    torch.testing.assert_close(dm.class_weights, plain.class_weights)
    assert len(dm.train_dataloader().sampler) == sum(dm.counts_after)
    batch = next(iter(dm.train_dataloader()))
    assert batch["gold"].shape == batch["labels"].shape
    assert dm.texts("val") == plain.texts("val")  # evaluation is never augmented


def test_gold_labels_only_for_gold_rows():
    student, teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    both = distillation_losses(student, teacher, torch.tensor([0, 1]))
    first = distillation_losses(student[:1], teacher[:1], torch.tensor([0]))
    masked = distillation_losses(student, teacher, torch.tensor([0, -100]))
    assert masked["ce"] == pytest.approx(first["ce"].item()) and masked["kd"] == pytest.approx(both["kd"].item())
    none = distillation_losses(student, teacher, torch.tensor([-100, -100]))
    assert none["ce"] == 0 and not none["ce"].isnan()


def test_distiller_labels_the_copies_with_the_teacher(make_datamodule, tiny_teacher_dir, tiny_trainer, tmp_path,
                                                      monkeypatch):
    dm = make_datamodule(tiny_teacher_dir, batch_size=4, augment=Augmentation(copies=2))
    model = Distiller(teacher=tiny_teacher_dir, student="bilstm", model_name=tiny_teacher_dir, id2label=dm.id2label,
                      embedding_dim=8, hidden_size=8, logits_cache=str(tmp_path / "cache"))
    seen = []
    original = Distiller.training_step
    monkeypatch.setattr(Distiller, "training_step", lambda self, batch, i: seen.append(batch["gold"].clone())
                        or original(self, batch, i))
    trainer = tiny_trainer(max_steps=6, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    texts = dm.texts("train")
    assert model.cached_logits.shape == (len(texts), 3)  # the teacher labelled the copies too
    with torch.no_grad():
        live = model.teacher(**model._teacher.encode(texts[-3:])).logits
    torch.testing.assert_close(model.cached_logits[-3:], live, atol=1e-5, rtol=1e-5)
    assert any((g == 0).any() for g in seen) and any((g == 1).any() for g in seen)
    stored = torch.load(next((tmp_path / "cache").glob("teacher-*.pt")), weights_only=True)
    assert len(stored["keys"]) == len(set(texts))


@pytest.mark.parametrize("build", [
    lambda teacher, id2label: EmotionClassifier(model_name=teacher, id2label=id2label),
    lambda teacher, id2label: Distiller(teacher=teacher, model_name=teacher, id2label=id2label, alpha=1.0),
], ids=["classifier", "alpha_one"])
def test_copies_without_a_teacher_are_refused(make_datamodule, tiny_teacher_dir, tiny_trainer, build):
    dm = make_datamodule(tiny_teacher_dir, batch_size=4, augment=Augmentation(copies=1))
    with pytest.raises(ValueError, match="data.augment adds texts without gold labels"):
        tiny_trainer(max_steps=1).fit(build(tiny_teacher_dir, dm.id2label), datamodule=dm)
