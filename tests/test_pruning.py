import warnings

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import prune

from emocompress.compression.pruning import MagnitudePruning, sparsity
from emocompress.models.checkpoints import load_network
from emocompress.models.classifier import EmotionClassifier


@pytest.fixture
def model(make_datamodule, tiny_model_dir):
    """A fresh classifier for ``emotion_dir``'s labels, to change before it is fitted."""
    return EmotionClassifier(tiny_model_dir, make_datamodule(batch_size=4).id2label, lr=1e-2)


@pytest.fixture
def fit(make_datamodule, tiny_trainer, tiny_model_dir):
    """``fit(callbacks, ckpt_path=None, model=None, **trainer_kwargs) -> (model, trainer)``: a short CPU fit of
    ``model`` (by default a fresh classifier) at batch size 4."""
    def fit(callbacks, ckpt_path=None, model=None, **trainer_kwargs):
        dm = make_datamodule(batch_size=4)
        model = model or EmotionClassifier(tiny_model_dir, dm.id2label, lr=1e-2)
        trainer = tiny_trainer(callbacks=callbacks, **trainer_kwargs)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, trainer

    return fit


def _linear_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


class _MasksHold(Callback):
    """After every optimizer step: pruned weights are exactly zero, and the optimizer did move the rest."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for module in pl_module.model.modules():
            if hasattr(module, "weight_mask"):
                assert torch.all(module.weight[module.weight_mask == 0] == 0)
                self.checked += 1


def test_one_shot_reaches_the_target_to_the_weight(fit):
    holds = _MasksHold()
    model, _ = fit([MagnitudePruning(amount=0.37), holds], max_epochs=2)
    weights = _linear_weights(model.model)
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.37 * total)
    assert holds.checked > 0
    # masks made permanent: plain parameters, no hooks, no *_orig / *_mask
    assert not any(prune.is_pruned(m) for m in model.model.modules())
    assert not [k for k in model.model.state_dict() if k.endswith(("_orig", "_mask"))]


def test_pruned_weights_stay_zero_while_recovery_trains_the_rest(fit, model):
    before = {n: w.detach().clone() for n, w in model.model.named_parameters()}
    model, _ = fit([MagnitudePruning(amount=0.5), _MasksHold()], model=model, max_epochs=3)
    after = dict(model.model.named_parameters())
    moved = [n for n, w in before.items() if n.endswith("weight") and not torch.equal(after[n], w)]
    kept = [after[n][after[n] != 0] for n in moved]
    assert moved and all(k.numel() > 0 for k in kept)


def test_head_and_other_modules_are_left_alone(fit, model):
    model.teacher = nn.Linear(16, 16)  # stands in for a distillation teacher: never pruned
    model, _ = fit([MagnitudePruning(amount=0.5, include_classifier=False)], model=model, max_epochs=1)
    assert sparsity(model.teacher) == 0
    assert sparsity(model.model.classifier) == 0
    assert sparsity(model.model.base_model) == pytest.approx(0.5, abs=1e-3)


def test_embeddings_can_be_included(fit):
    model, _ = fit([MagnitudePruning(amount=0.5, include_embeddings=True)], max_steps=1)
    word = model.model.base_model.embeddings.word_embeddings.weight
    assert (word == 0).float().mean() > 0.1


class _SparsityPerStep(Callback):
    """``seen[t]``: the model's sparsity after optimizer step ``t``."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append(sparsity(pl_module.model))


def test_cubic_schedule_rises_to_the_target(fit):
    record = _SparsityPerStep()
    pruning = MagnitudePruning(amount=0.6, schedule="cubic", start_step=1, end_step=7, every_n_steps=2)
    fit([pruning, record], max_steps=10)
    seen = record.seen
    assert seen[0] == 0  # before start_step
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:]))
    assert 0 < seen[3] < 0.6
    assert seen[-1] == pytest.approx(0.6, abs=1e-3)


def test_cubic_schedule_reaches_the_target_at_an_end_step_off_its_grid(fit):
    # Pruning steps 0, 2, 4 and end_step 5 (the rule of PruningSchedule, as StructuredPruning); before the
    # schedule object this callback pruned on the grid only and reached the target at step 6.
    record = _SparsityPerStep()
    fit([MagnitudePruning(amount=0.6, schedule="cubic", start_step=0, end_step=5, every_n_steps=2), record],
        max_steps=7)
    assert record.seen[4] == pytest.approx(0.6 * (1 - (1 / 5) ** 3), abs=1e-3)  # 0.595
    assert record.seen[5] == pytest.approx(0.6, abs=1e-3)


def test_a_best_checkpoint_from_before_the_final_sparsity_is_warned_about(fit, tmp_path):
    # HFExport and the test after fit use the best checkpoint: chosen before end_step, it is less sparse than
    # the run reports (prune/sparsity 0.6); keeping the first epoch's (the lowest loss) stands in for that choice.
    first = ModelCheckpoint(dirpath=tmp_path, monitor="epoch", mode="min")
    with pytest.warns(UserWarning, match=r"best checkpoint .* step 4, before the end of the pruning schedule \(step 6\)"):
        fit([MagnitudePruning(amount=0.6, schedule="cubic", start_step=0, end_step=6, every_n_steps=2), first],
            max_epochs=3, limit_train_batches=4)
    with warnings.catch_warnings(record=True) as caught:  # ended within the first epoch: every checkpoint is final
        warnings.simplefilter("always")
        fit([MagnitudePruning(amount=0.6, schedule="cubic", start_step=0, end_step=3, every_n_steps=2),
             ModelCheckpoint(dirpath=tmp_path / "ok", monitor="epoch", mode="min")], max_epochs=3, limit_train_batches=4)
    assert not [w for w in caught if "best checkpoint" in str(w.message)]


def test_checkpoint_is_plain_and_resume_keeps_the_masks(fit, tmp_path):
    model, trainer = fit([MagnitudePruning(amount=0.5)], max_steps=4)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert not [k for k in state["state_dict"] if k.endswith(("_orig", "_mask"))]
    assert state["callbacks"]["MagnitudePruning"] == {"sparsity": 0.5}
    zero_before = {k: v == 0 for k, v in state["state_dict"].items() if k.endswith("weight") and v.ndim == 2}

    holds = _MasksHold()
    resumed, _ = fit([MagnitudePruning(amount=0.5), holds], ckpt_path=ckpt, max_steps=12)
    assert holds.checked > 0  # masks were rebuilt on resume and held through the extra steps
    after = resumed.state_dict()
    for key, was_zero in zero_before.items():
        if key.startswith("model.") and "embeddings" not in key:
            assert torch.all(after[key][was_zero] == 0), key


class _SaveWeightsAt(Callback):
    """Saves a weights-only checkpoint (as ``ModelCheckpoint(save_weights_only=True)``) after step ``step``."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path, weights_only=True)


def test_a_weights_only_checkpoint_is_plain_too(fit, tmp_path):
    # Lightning skips the callbacks' on_save_checkpoint for weights-only checkpoints: they held
    # weight_orig/weight_mask, which no loader of the project reads (test --ckpt_path, HFExport failed).
    ckpt = tmp_path / "weights.ckpt"
    model, _ = fit([MagnitudePruning(amount=0.5), _SaveWeightsAt(2, ckpt)], max_steps=3)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    fresh = EmotionClassifier(model.hparams.model_name, model.id2label).model
    load_network(fresh, str(ckpt))
    assert sparsity(fresh) == pytest.approx(0.5, abs=1e-3)
    assert not [k for k in model.model.state_dict() if k.endswith(("_orig", "_mask"))]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"amount": 0.99}, r"amount must be in \[0, 0.95\]"),
    ({"amount": -0.1}, r"amount must be in \[0, 0.95\]"),
    ({"schedule": "cubic"}, "end_step must be set"),
])
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


def test_a_model_with_only_a_head_to_prune_is_refused_before_training():
    # A BiLSTM student's only nn.Linear is its head: pruning would cut the head alone and report success.
    from types import SimpleNamespace

    from emocompress.models.students import SmallEncoderClassifier, SmallEncoderConfig

    bilstm = SmallEncoderClassifier(SmallEncoderConfig(vocab_size=20, embedding_dim=4, hidden_size=4, num_labels=3))
    callback = MagnitudePruning(amount=0.5)
    with pytest.raises(ValueError, match=r"MagnitudePruning: SmallEncoderClassifier has no prunable layers outside its "
                                         r"classification head \(targets: \['classifier'\]\)"):
        callback.setup(None, SimpleNamespace(model=bilstm), "fit")
    # its embedding table is prunable when asked for; a mean-pool student has a feed-forward layer
    MagnitudePruning(amount=0.5, include_embeddings=True).setup(None, SimpleNamespace(model=bilstm), "fit")
    meanpool = SmallEncoderClassifier(SmallEncoderConfig(vocab_size=20, embedding_dim=4, hidden_size=4, num_labels=3,
                                                         encoder="meanpool"))
    callback.setup(None, SimpleNamespace(model=meanpool), "fit")
