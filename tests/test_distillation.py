import pytest
import torch
import torch.nn.functional as F

from emocompress.compression.distillation import Distiller, Teacher, distillation_losses, patient_loss
from emocompress.models.classifier import EmotionClassifier
from emocompress.models.students import SmallEncoderClassifier

ID2LABEL = {0: "anger", 1: "joy", 2: "love"}


@pytest.fixture
def trainer(tiny_trainer):
    """``trainer(**overrides)``: the shared tiny Trainer, training only (no validation, no ModelCheckpoint)."""
    return lambda **overrides: tiny_trainer(enable_checkpointing=False, limit_val_batches=0, **overrides)


@pytest.fixture
def fit(make_datamodule, trainer, tiny_teacher_dir):
    """``fit(max_steps=2, precision="32-true", **distiller_kwargs) -> (model, trainer, dm)``: a Distiller of the
    tiny teacher, fitted."""
    def fit(max_steps=2, precision="32-true", **kwargs):
        dm = make_datamodule(tiny_teacher_dir, batch_size=4)
        model = Distiller(teacher=tiny_teacher_dir, model_name=tiny_teacher_dir, id2label=dm.id2label, lr=1e-2,
                          **kwargs)
        fitted = trainer(max_steps=max_steps, precision=precision)
        fitted.fit(model, datamodule=dm)
        return model, fitted, dm

    return fit


# ---- the loss ----
def _kl(teacher, student, temperature):
    p = (teacher / temperature).softmax(-1)
    return (p * (p.log() - (student / temperature).log_softmax(-1))).sum(-1).mean()


def test_alpha_one_is_weighted_cross_entropy_and_alpha_zero_is_soft_label_kd():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
    labels, weights = torch.randint(0, 3, (8,), generator=generator), torch.tensor([0.5, 1.0, 2.0])
    hard = distillation_losses(student, teacher, labels, weights, alpha=1.0, temperature=3.0)
    assert sum(hard.values()) == pytest.approx(F.cross_entropy(student, labels, weight=weights).item(), abs=1e-6)
    for temperature in (1.0, 2.0, 4.0):
        soft = distillation_losses(student, teacher, labels, weights, alpha=0.0, temperature=temperature)
        assert soft["ce"] == 0
        # the T^2 factor, checked against KL written out by hand
        assert sum(soft.values()) == pytest.approx(temperature**2 * _kl(teacher, student, temperature).item(), rel=1e-5)
    mixed = distillation_losses(student, teacher, labels, weights, alpha=0.25, temperature=2.0, mse_weight=0.5)
    assert mixed["ce"] == pytest.approx(0.25 * hard["ce"].item())
    assert mixed["kd"] == pytest.approx(0.75 * 4 * _kl(teacher, student, 2.0).item(), rel=1e-5)
    assert mixed["mse"] == pytest.approx(0.5 * ((student - teacher) ** 2).mean().item(), rel=1e-6)


def test_patient_loss_compares_normalised_first_token_states_of_mapped_layers():
    teacher = tuple(torch.randn(2, 5, 4) for _ in range(3))  # embeddings + 2 layers
    student = (teacher[0], 3 * teacher[2])  # student layer 0 = teacher layer 1, scaled: same direction
    assert patient_loss(student, teacher, [1]).item() == pytest.approx(0, abs=1e-6)
    expected = (F.normalize(teacher[2][:, 0], dim=-1) - F.normalize(teacher[1][:, 0], dim=-1)).pow(2).sum(-1).mean()
    assert patient_loss(student, teacher, [0]).item() == pytest.approx(expected.item(), rel=1e-6)


# ---- the teacher ----
def test_teacher_is_frozen_outside_the_checkpoint_and_the_student_learns(make_datamodule, tiny_teacher_dir, trainer):
    dm = make_datamodule(tiny_teacher_dir, batch_size=4)
    model = Distiller(teacher=tiny_teacher_dir, model_name=tiny_teacher_dir, id2label=dm.id2label, lr=1e-2,
                      student_layers=[1])
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer(max_steps=3).fit(model, datamodule=dm)
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not any(m.training for m in model.teacher.modules())
    assert any(not torch.equal(v, student_before[k]) for k, v in model.model.state_dict().items())
    assert all(p.requires_grad for p in model.model.parameters())
    assert not any(key.startswith("teacher") for key in model.state_dict())
    teacher_params = {id(p) for p in model.teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}


def test_cached_teacher_logits_equal_live_ones_and_are_reused(fit, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    model, trainer, dm = fit(max_steps=1, logits_cache=str(cache))
    [cache_file] = cache.glob("teacher-*.pt")
    texts = dm.texts("train")
    with torch.no_grad():  # live: the teacher on small padded batches, in data order
        live = torch.cat([model.teacher(**model._teacher.encode(texts[i:i + 3])).logits for i in range(0, len(texts), 3)])
    torch.testing.assert_close(model.cached_logits, live, atol=1e-5, rtol=1e-5)
    stored = torch.load(cache_file, weights_only=True)
    assert len(stored["keys"]) == len(set(texts)) and stored["logits"].shape == (len(set(texts)), 3)

    # training on cached logits gives the loss of training on live ones
    cached_loss = trainer.callback_metrics["train/loss"]
    _, live_trainer, _ = fit(max_steps=1)
    assert live_trainer.callback_metrics["train/loss"].item() == pytest.approx(cached_loss.item(), abs=1e-5)

    # a second run with the same teacher reads the cache and never runs the teacher over the data
    monkeypatch.setattr(Teacher, "logits", lambda self, texts: pytest.fail("teacher ran again"))
    again, _, _ = fit(max_steps=1, logits_cache=str(cache))
    torch.testing.assert_close(again.cached_logits, model.cached_logits)


def test_logits_cached_in_another_precision_are_not_reused(fit, tmp_path):
    cache = tmp_path / "cache"
    fp32, _, _ = fit(max_steps=1, logits_cache=str(cache))
    bf16, _, _ = fit(max_steps=1, logits_cache=str(cache), precision="bf16-mixed")
    assert len(list(cache.glob("teacher-*.pt"))) == 2  # one entry per precision
    # the bf16 run's logits are the teacher's under bf16 autocast, not the fp32 run's
    assert not torch.equal(bf16.cached_logits, fp32.cached_logits)
    torch.testing.assert_close(bf16.cached_logits, fp32.cached_logits, atol=0.1, rtol=0.1)


def test_corrupt_cache_is_a_clear_error(fit, tmp_path):
    cache = tmp_path / "cache"
    model, _, _ = fit(max_steps=1, logits_cache=str(cache))
    next(cache.glob("teacher-*.pt")).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.logits_cache: cannot read .* delete it to recompute"):
        fit(max_steps=1, logits_cache=str(cache))


def test_alpha_one_control_never_runs_the_teacher(make_datamodule, tiny_teacher_dir, trainer, monkeypatch):
    dm = make_datamodule(tiny_teacher_dir, batch_size=4)
    model = Distiller(teacher=tiny_teacher_dir, model_name=tiny_teacher_dir, id2label=dm.id2label, alpha=1.0)
    monkeypatch.setattr(model.teacher, "forward", lambda *a, **k: pytest.fail("the teacher ran"))
    fitted = trainer(max_steps=2)
    fitted.fit(model, datamodule=dm)
    assert fitted.callback_metrics["train/kd"] == 0
    assert fitted.callback_metrics["train/loss"] == fitted.callback_metrics["train/ce"]


def test_hidden_state_loss_and_mse_are_trained(fit):
    model, trainer, _ = fit(student_layers=[0], hidden_weight=1.0, mse_weight=0.1)
    assert model.layer_map == [0]
    metrics = trainer.callback_metrics
    assert metrics["train/hidden"] > 0 and metrics["train/mse"] > 0
    total = sum(metrics[f"train/{k}"] for k in ("ce", "kd", "mse", "hidden"))
    assert metrics["train/loss"].item() == pytest.approx(total.item(), rel=1e-5)


@pytest.mark.parametrize("student", ["bilstm", "meanpool", "cnn"])
def test_small_encoder_student_distils(fit, student):
    model, trainer, dm = fit(student=student, embedding_dim=8, hidden_size=8)
    assert isinstance(model.model, SmallEncoderClassifier)
    assert model.model.config.vocab_size == len(dm.tokenizer)
    assert model.model.config.id2label == ID2LABEL
    assert trainer.callback_metrics["train/kd"] > 0


def test_pretrained_student_with_its_own_tokenizer(make_datamodule, tiny_teacher_dir, tiny_model_dir, trainer):
    # the student reads the data module's tokens; the teacher tokenizes the raw texts itself
    dm = make_datamodule(tiny_model_dir, batch_size=4)
    model = Distiller(teacher=tiny_teacher_dir, student="pretrained", model_name=tiny_model_dir,
                      id2label=dm.id2label, hidden_weight=0.5)
    assert model.layer_map == [0, 1]  # as deep as the teacher: layer to layer
    fitted = trainer(max_steps=2)
    fitted.fit(model, datamodule=dm)
    assert fitted.callback_metrics["train/kd"] > 0


@pytest.mark.parametrize("student", ["layers", "bilstm", "pretrained"])
def test_each_tokenizer_is_read_once(tiny_teacher_dir, monkeypatch, student):
    # model.model_name is the teacher here: its tokenizer serves the teacher and the student
    from transformers import AutoTokenizer

    read, original = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: read.append(a[0]) or original(*a, **k))
    Distiller(teacher=tiny_teacher_dir, model_name=tiny_teacher_dir, id2label=ID2LABEL, student=student,
              embedding_dim=8, hidden_size=8)
    assert read == [tiny_teacher_dir]


def test_teacher_from_a_classifier_checkpoint(make_datamodule, tiny_teacher_dir, trainer, tmp_path):
    dm = make_datamodule(tiny_teacher_dir, batch_size=4)
    tuned = EmotionClassifier(tiny_teacher_dir, dm.id2label, lr=1e-2)
    fitted = trainer(max_steps=2)
    fitted.fit(tuned, datamodule=dm)
    fitted.save_checkpoint(tmp_path / "teacher.ckpt")
    model = Distiller(teacher=str(tmp_path / "teacher.ckpt"), model_name=tiny_teacher_dir, id2label=dm.id2label)
    for name, value in tuned.model.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], value), name


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"alpha": 1.5}, r"model.alpha must be in \[0, 1\]"),
    ({"temperature": 0.0}, "model.temperature must be positive"),
    ({"mse_weight": -1.0}, "model.mse_weight must be >= 0"),
    ({"student": "bilstm", "hidden_weight": 1.0}, "model.hidden_weight needs a transformer student"),
    ({"hidden_weight": 1.0, "logits_cache": "x"}, "set model.logits_cache to null"),
    ({"student_layers": [5]}, "model.student_layers must be increasing"),
    ({"id2label": {0: "joy", 1: "anger", 2: "fear"}},  # another label set (another order is mapped by name)
     r"model.teacher: .*config.json: the model was trained on the labels \['anger', 'joy', 'love'\]"),
])
def test_bad_settings_fail_at_construction(tiny_teacher_dir, kwargs, message):
    args = {"teacher": tiny_teacher_dir, "model_name": tiny_teacher_dir, "id2label": ID2LABEL, **kwargs}
    with pytest.raises(ValueError, match=message):
        Distiller(**args)


def test_layers_student_needs_the_teachers_tokenizer(tiny_teacher_dir, tmp_path):
    from transformers import AutoTokenizer, BertTokenizerFast

    vocab = AutoTokenizer.from_pretrained(tiny_teacher_dir).get_vocab()
    BertTokenizerFast(vocab={**vocab, "extra": len(vocab)}).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="set model.model_name to the teacher"):
        Distiller(teacher=tiny_teacher_dir, model_name=str(tmp_path / "other"), id2label=ID2LABEL)


def test_teacher_checkpoint_errors(tiny_teacher_dir, tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="model.teacher: cannot read a Lightning checkpoint"):
        Distiller(teacher=str(tmp_path / "junk.ckpt"), model_name=tiny_teacher_dir, id2label=ID2LABEL)
    torch.save({"state_dict": {}, "hyper_parameters": {"teacher": "x", "model_name": "y", "id2label": ID2LABEL}},
               tmp_path / "student.ckpt")
    with pytest.raises(ValueError, match="not an EmotionClassifier checkpoint"):
        Distiller(teacher=str(tmp_path / "student.ckpt"), model_name=tiny_teacher_dir, id2label=ID2LABEL)


def test_planted_pickles_are_refused_as_teacher_and_as_cache(fit, tiny_teacher_dir, tmp_path, malicious_checkpoint):
    path, marker = malicious_checkpoint
    with pytest.raises(ValueError, match="model.teacher: refused to load .* could run code"):
        Distiller(teacher=str(path), model_name=tiny_teacher_dir, id2label=ID2LABEL)
    cache = tmp_path / "cache"
    model, _, _ = fit(max_steps=1, logits_cache=str(cache))
    cache_file = next(cache.glob("teacher-*.pt"))
    cache_file.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="model.logits_cache: cannot read"):
        fit(max_steps=1, logits_cache=str(cache))
    assert not marker.exists()
