import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, recall_score

from emocompress.evaluation.significance import (
    bootstrap_indices,
    confusion_matrices,
    mcnemar_exact,
    metrics_from_confusion,
    paired_difference,
    percentile_interval,
    resampled_metrics,
)
from emocompress.models.classifier import classification_metrics


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_torchmetrics_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    num_classes = 4
    target = rng.integers(0, num_classes, 60)
    preds = np.where(rng.random(60) < 0.6, target, rng.integers(0, num_classes, 60))
    if seed == 3:  # class 3 neither true nor predicted: torchmetrics leaves it out of macro averages
        target, preds = target % 3, preds % 3
    ours = {k: v[0] for k, v in metrics_from_confusion(confusion_matrices(target, preds, num_classes)).items()}
    metrics = classification_metrics(num_classes)
    metrics.update(torch.from_numpy(preds), torch.from_numpy(target))
    for name, value in metrics.compute().items():
        np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-6, err_msg=name)
    labels = sorted(set(target) | set(preds))
    assert ours["accuracy"] == pytest.approx(accuracy_score(target, preds))
    assert ours["macro_f1"] == pytest.approx(f1_score(target, preds, average="macro", labels=labels))
    assert ours["cohen_kappa"] == pytest.approx(cohen_kappa_score(target, preds))
    assert ours["balanced_accuracy"] == pytest.approx(
        recall_score(target, preds, average="macro", labels=labels, zero_division=0))
    if seed != 3:
        assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(target, preds))


def test_resampled_confusion_matrices_are_those_of_the_resampled_texts():
    rng = np.random.default_rng(0)
    target, preds = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    idx = bootstrap_indices(50, resamples=7, seed=1)
    batched = confusion_matrices(target, preds, 3, idx)
    for r in range(7):
        np.testing.assert_array_equal(batched[r], confusion_matrices(target[idx[r]], preds[idx[r]], 3)[0])
    np.testing.assert_array_equal(idx, bootstrap_indices(50, resamples=7, seed=1))  # seeded


def test_a_perfect_classifier_has_zero_width_intervals():
    target = np.random.default_rng(0).integers(0, 3, 200)
    samples = resampled_metrics(target, target.copy(), 3, bootstrap_indices(200, 1000, seed=0))
    for name in ("macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy"):
        assert percentile_interval(samples[name]) == (1.0, 1.0), name
    low, high = percentile_interval(samples["f1_per_class"])
    assert low.tolist() == high.tolist() == [1.0, 1.0, 1.0]


def test_identical_predictions_differ_by_exactly_zero_with_p_one():
    rng = np.random.default_rng(0)
    target, preds = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    idx = bootstrap_indices(300, 1000, seed=0)
    a, b = resampled_metrics(target, preds, 3, idx), resampled_metrics(target, preds.copy(), 3, idx)
    assert paired_difference(a["macro_f1"], b["macro_f1"]) == {"low": 0.0, "high": 0.0, "p": 1.0}
    assert mcnemar_exact(preds == target, preds == target) == {"only_model_correct": 0, "only_base_correct": 0,
                                                               "p": 1.0}


def test_mcnemar_hand_worked():
    # 0 texts only the model gets right, 6 only the baseline: p = 2 * 0.5^6 = 0.03125; 2 vs 6: 2 * 37/256
    base = np.ones(10, bool)
    assert mcnemar_exact(np.array([0] * 6 + [1] * 4, bool), base)["p"] == pytest.approx(0.03125)
    model, base = np.array([1, 1] + [0] * 6 + [1, 1], bool), np.array([0, 0] + [1] * 6 + [1, 1], bool)
    result = mcnemar_exact(model, base)
    assert (result["only_model_correct"], result["only_base_correct"]) == (2, 6)
    assert result["p"] == pytest.approx(2 * (1 + 8 + 28) / 256)


def test_accuracy_interval_matches_the_normal_approximation():
    # 2,000 texts at 90% accuracy: standard error sqrt(0.9 * 0.1 / 2000) = 0.0067, 95% half-width 0.0131
    target = np.zeros(2000, int)
    preds = np.r_[np.zeros(1800, int), np.ones(200, int)]
    low, high = percentile_interval(resampled_metrics(target, preds, 2, bootstrap_indices(2000, 2000, 0))["accuracy"])
    assert (high - low) / 2 == pytest.approx(1.96 * np.sqrt(0.09 / 2000), rel=0.1)


def test_a_better_model_has_a_positive_difference_and_small_p_and_seeds_average():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 1000)
    worse = np.where(rng.random(1000) < 0.6, target, (target + 1) % 3)
    better = np.where(rng.random(1000) < 0.9, target, (target + 1) % 3)
    idx = bootstrap_indices(1000, 1000, seed=0)
    a, b = resampled_metrics(target, better, 3, idx), resampled_metrics(target, worse, 3, idx)
    diff = paired_difference(a["macro_f1"], b["macro_f1"])
    assert 0 < diff["low"] < diff["high"] and diff["p"] < 0.01
    both = resampled_metrics(target, [better, worse], 3, idx)  # two runs: the mean of their metrics per resample
    np.testing.assert_allclose(both["macro_f1"], (a["macro_f1"] + b["macro_f1"]) / 2)
