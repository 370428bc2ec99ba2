"""Vectorised bootstrap: exact per-resample metrics, nominal coverage, not-estimable handling."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from evaluation.bootstrap import (bootstrap_intervals, percentile_interval, resample_counts,
                                  weighted_auroc, weighted_threshold_metrics)
from Prediction_DP import auroc, threshold_metrics


def test_counts_are_resamples_with_replacement():
    counts = resample_counts(50, 200, seed=3)
    assert counts.shape == (200, 50) and (counts.sum(axis=1) == 50).all()
    assert np.array_equal(counts, resample_counts(50, 200, seed=3))
    assert not np.array_equal(counts, resample_counts(50, 200, seed=4))
    assert 0.55 < (counts == 0).mean() / np.exp(-1) < 1.45  # P(image not drawn) -> 1/e


def test_weighted_metrics_equal_sklearn_on_each_explicit_resample():
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.3
    score = np.round(rng.normal(truth * 0.8, 1.0), 1)  # rounding creates many ties
    counts = resample_counts(300, 25, seed=1)
    auroc = weighted_auroc(truth, score, counts)
    rates = weighted_threshold_metrics(truth, score >= 0.4, counts)
    for b in range(25):
        idx = np.repeat(np.arange(300), counts[b].astype(int))
        assert auroc[b] == pytest.approx(roc_auc_score(truth[idx], score[idx]), abs=1e-12)
        explicit = threshold_metrics(truth[idx], score[idx], 0.4)
        for name, values in rates.items():
            assert values[b] == pytest.approx(explicit[name], abs=1e-12)


def test_intervals_cover_the_true_value_at_about_the_nominal_rate():
    """Binormal scores: AUROC = Phi(d / sqrt 2), sensitivity at t = 1 - Phi(t - d)."""
    d, t, n, runs = 1.0, 0.5, 300, 200
    true_auroc, true_sens = norm.cdf(d / np.sqrt(2)), 1 - norm.cdf(t - d)
    rng = np.random.default_rng(42)
    hits = {"auroc": 0, "sensitivity": 0}
    for run in range(runs):
        truth = (rng.random(n) < 0.4)[:, None]
        scores = rng.normal(truth * d, 1.0)
        ci = bootstrap_intervals(truth, scores, ["x"], {"x": t}, resample_counts(n, 400, seed=run))["labels"]["x"]["ci95"]
        hits["auroc"] += ci["auroc"][0] <= true_auroc <= ci["auroc"][1]
        hits["sensitivity"] += ci["sensitivity"][0] <= true_sens <= ci["sensitivity"][1]
    for name, count in hits.items():  # 95% nominal; binomial sd over 200 runs is 1.5 points
        assert 0.895 <= count / runs <= 0.99, (name, count / runs)


def test_a_label_with_one_class_is_not_estimable():
    truth = np.zeros((40, 2), dtype=bool)
    truth[::4, 0] = True
    scores = np.random.default_rng(0).random((40, 2))
    result = bootstrap_intervals(truth, scores, ["a", "b"], {"a": 0.5, "b": 0.5}, resample_counts(40, 100, 0))
    assert result["labels"]["b"]["ci95"]["auroc"] is None
    assert result["labels"]["b"]["resamples_without_both_classes"] == 100
    assert result["labels"]["a"]["ci95"]["auroc"] is not None
    assert result["labels"]["b"]["ci95"]["specificity"] is not None  # negatives only: still defined
    assert result["auroc_mean_ci95"] == percentile_interval(
        weighted_auroc(truth[:, 0], scores[:, 0], resample_counts(40, 100, 0)))


def test_unlabelled_images_are_left_out():
    rng = np.random.default_rng(2)
    truth = (rng.random(200) < 0.4).astype(float)
    score = rng.normal(truth, 1.0)
    holes = truth.copy()
    holes[::7] = np.nan
    keep = np.isfinite(holes)
    counts = resample_counts(200, 30, seed=0)
    assert np.allclose(weighted_auroc(holes, score, counts), weighted_auroc(truth[keep], score[keep], counts[:, keep]))
    assert auroc(holes, score) == pytest.approx(roc_auc_score(truth[keep], score[keep]))
    assert threshold_metrics(holes, score, 0.5) == threshold_metrics(truth[keep], score[keep], 0.5)
