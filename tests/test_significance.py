import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, recall_score
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score

from emocompress.evaluation import metrics as metrics_module
from emocompress.evaluation.significance import (
    bootstrap_indices,
    confusion_matrices,
    mcnemar_exact,
    paired_class_differences,
    paired_difference,
    percentile_interval,
    resampled_metrics,
)
from emocompress.models.classifier import classification_metrics


@pytest.mark.parametrize("seed", range(4))
def test_resampled_metrics_are_trainings_and_sklearns_on_each_resample(seed):
    rng = np.random.default_rng(seed)
    num_classes = 4
    target = rng.integers(0, num_classes, 60)
    preds = np.where(rng.random(60) < 0.6, target, rng.integers(0, num_classes, 60))
    if seed == 3:  # class 3 neither true nor predicted: torchmetrics leaves it out of macro averages
        target, preds = target % 3, preds % 3
    idx = bootstrap_indices(60, resamples=5, seed=seed)
    samples = resampled_metrics(target, preds, num_classes, idx)
    for r in range(5):
        t, p = target[idx[r]], preds[idx[r]]
        metrics = classification_metrics(num_classes)  # what training and the benchmark report
        metrics.update(torch.from_numpy(p), torch.from_numpy(t))
        ours = {name: values[r] for name, values in samples.items()}
        absent = np.bincount(t, minlength=num_classes) == 0  # per class: None in the report, NaN here
        for name, value in metrics.compute().items():
            expected = np.where(absent, np.nan, value.numpy()) if value.ndim else value.numpy()
            np.testing.assert_allclose(ours[name], expected, atol=1e-6, err_msg=name)
        labels = sorted(set(t) | set(p))
        assert ours["accuracy"] == pytest.approx(accuracy_score(t, p))
        assert ours["macro_f1"] == pytest.approx(f1_score(t, p, average="macro", labels=labels))
        assert ours["cohen_kappa"] == pytest.approx(cohen_kappa_score(t, p))
        assert ours["balanced_accuracy"] == pytest.approx(
            recall_score(t, p, average="macro", labels=labels, zero_division=0))
        if set(p) <= set(t):  # sklearn's balanced accuracy leaves out classes predicted but absent
            assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(t, p))


def test_the_bootstrap_follows_the_one_definition(monkeypatch):
    # a change of definition in evaluation/metrics.py (here: weighted F1) reaches the bootstrap unchanged
    def weighted(num_classes):
        return MetricCollection({"macro_f1": MulticlassF1Score(num_classes, average="weighted")})
    monkeypatch.setattr(metrics_module, "classification_metrics", weighted)
    rng = np.random.default_rng(0)
    target, preds = rng.integers(0, 3, 80), rng.integers(0, 3, 80)
    idx = bootstrap_indices(80, resamples=3, seed=0)
    samples = resampled_metrics(target, preds, 3, idx)
    assert list(samples) == ["macro_f1"]
    for r in range(3):
        assert samples["macro_f1"][r] == pytest.approx(f1_score(target[idx[r]], preds[idx[r]], average="weighted"))
    monkeypatch.setattr(metrics_module, "classification_metrics",
                        lambda num_classes: MetricCollection({"auroc": MulticlassAUROC(num_classes)}))
    with pytest.raises(ValueError, match="no bootstrap for MulticlassAUROC"):
        resampled_metrics(target, preds, 3, idx)


def test_kappa_of_a_one_class_resample_is_nan():
    # observed and chance agreement both 1: kappa is undefined, and the intervals skip it
    target = np.zeros(5, int)
    samples = resampled_metrics(target, target.copy(), 2, bootstrap_indices(5, resamples=4, seed=0))
    assert np.isnan(samples["cohen_kappa"]).all()
    assert samples["macro_f1"].tolist() == samples["accuracy"].tolist() == [1.0] * 4


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


def test_a_rare_class_missed_by_some_resamples_keeps_a_perfect_models_f1_interval():
    # 3 texts of 100: about 5% of resamples hold none; their F1 is undefined (NaN), not torchmetrics' 0,
    # so a perfect model's interval stays [1, 1] and its change against itself [0, 0] on the other resamples
    target = np.r_[np.zeros(50, int), np.ones(47, int), np.full(3, 2)]
    samples = resampled_metrics(target, target.copy(), 4, bootstrap_indices(100, 1000, seed=0))
    f1 = samples["f1_per_class"]
    assert 0 < np.isnan(f1[:, 2]).sum() < 100 and np.isnan(f1[:, 3]).all()  # class 3: absent from the split
    np.testing.assert_array_equal(np.isnan(samples["accuracy_per_class"]), np.isnan(f1))
    low, high = percentile_interval(f1)
    np.testing.assert_array_equal(low, [1.0, 1.0, 1.0, np.nan])
    np.testing.assert_array_equal(high, [1.0, 1.0, 1.0, np.nan])
    diffs = paired_class_differences(f1, f1)
    assert diffs[2] == {"low": 0.0, "high": 0.0, "p": 1.0} and diffs[3] == dict.fromkeys(("low", "high", "p"))


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
