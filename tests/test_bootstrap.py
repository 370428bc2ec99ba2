"""Vectorised bootstrap: exact per-resample metrics, nominal coverage, not-estimable handling."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from evaluation.bootstrap import (bootstrap_intervals, format_p, p_value, percentile_interval, proportion_interval,
                                  resample_counts, resampling, two_sided_p, weighted_auroc,
                                  weighted_threshold_metrics)
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


def test_patient_resampling_draws_whole_patients():
    patients = np.repeat(np.arange(40), [1, 2, 3, 4] * 10)
    counts = resample_counts(len(patients), 300, seed=5, clusters=patients)
    for p in range(40):  # every image of a patient is drawn as often as its patient
        assert (counts[:, patients == p] == counts[:, patients == p][:, :1]).all()
    per_patient = counts[:, np.unique(patients, return_index=True)[1]]
    assert (per_patient.sum(axis=1) == 40).all()  # 40 patients drawn per resample, not len(patients) images


def test_duplicated_images_do_not_narrow_the_patient_interval():
    """Three identical copies of every image carry no more information: the patient bootstrap gives the
    interval of the originals exactly; the image bootstrap pretends to know more."""
    rng = np.random.default_rng(8)
    truth = rng.random((150, 1)) < 0.3
    scores = rng.normal(truth * 1.0, 1.0)
    copies = np.repeat(np.arange(150), 3)
    original = bootstrap_intervals(truth, scores, ["x"], {"x": 0.5}, resample_counts(150, 500, 1))
    weights, _, info = resampling(copies, 500, 1, "patient")
    tripled = bootstrap_intervals(truth[copies], scores[copies], ["x"], {"x": 0.5}, weights)
    assert info == {"resamples": 500, "seed": 1, "level": 0.95, "unit": "patient", "units": 150}
    assert tripled["labels"]["x"]["ci95"]["auroc"] == pytest.approx(original["labels"]["x"]["ci95"]["auroc"], abs=1e-12)
    image_level, _, _ = resampling(copies, 500, 1, "image")
    naive = bootstrap_intervals(truth[copies], scores[copies], ["x"], {"x": 0.5}, image_level)["labels"]["x"]["ci95"]
    width = np.diff(original["labels"]["x"]["ci95"]["auroc"])[0]
    assert np.diff(naive["auroc"])[0] < 0.7 * width  # about 1/sqrt(3) of the honest width


def test_p_values_are_never_zero_and_print_as_bounds():
    assert two_sided_p(np.full(100, 0.1)) == pytest.approx(2 / 101)
    assert two_sided_p(np.full(100, 0.0)) == 1.0
    assert p_value(np.zeros(999, bool), 999) == pytest.approx(1 / 1000)
    assert format_p(0.0004) == "< 0.001" and format_p(0.0123) == "0.012" and format_p(None) == "n/a"


def test_proportions_with_few_events_get_wilson_intervals():
    truth = np.zeros((200, 1), dtype=bool)
    truth[:2, 0] = True  # two positives, both found: sensitivity 1.0
    scores = np.where(truth, 0.9, np.random.default_rng(0).random((200, 1)) * 0.8)
    result = bootstrap_intervals(truth, scores, ["x"], {"x": 0.7}, resample_counts(200, 400, 0))["labels"]["x"]
    low, high = result["ci95"]["sensitivity"]
    assert result["ci_method"]["sensitivity"] == "wilson" and high == 1.0 and 0.1 < low < 0.5  # not [1, 1]
    assert result["ci_method"]["specificity"] == "percentile"  # about 25 of 198 negatives called positive
    assert result["ci_method"]["auroc"] == "percentile"
    many = proportion_interval(60, 100, np.random.default_rng(1).normal(0.6, 0.05, 500))
    assert many["ci_method"] == "percentile"
    flat = proportion_interval(60, 100, np.full(500, 0.6))  # a degenerate bootstrap falls back too
    assert flat["ci_method"] == "wilson" and flat["ci95"][0] < 0.6 < flat["ci95"][1]
