"""Calibration metrics against scikit-learn and direct computations, their intervals on calibrated and
over-confident simulations, recalibration, decision curves and refused input."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from config import InputError
from evaluation.bootstrap import resample_counts
from evaluation.calibration import (CLIP, apply_recalibration, calibration_report, clipped_logit, decision_curve,
                                    describe_map, fit_recalibration, label_calibration, logistic_fit, map_thresholds,
                                    reliability_bins, stored_map, subgroup_calibration)
from privacy.release import bundle_map, calibration_words

EDGES = [0, 30, 60, 70, 80, 100]


def _simulate(n: int, seed: int, sharpen: float = 1.0, labels: int = 1):
    """Outcomes drawn from true probabilities expit(z); scores expit(sharpen * z): calibrated at
    sharpen 1, over-confident above 1 (true slope 1 / sharpen)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, size=(n, labels))
    truth = (rng.random((n, labels)) < expit(z)).astype(np.float64)
    return truth, expit(sharpen * z)


def _ml_slope(y, p, sample_weight=None):
    """(intercept, slope) of logit P(y) = a + b logit(p) by scikit-learn, unpenalised."""
    model = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000)
    model.fit(clipped_logit(p)[:, None], y, sample_weight=sample_weight)
    return model.intercept_[0], model.coef_[0, 0]


def _ml_offset_intercept(y, p, sample_weight=None):
    """a of logit P(y) = a + logit(p): the root of the score equation sum w (y - expit(a + x)) = 0."""
    x, w = clipped_logit(p), np.ones(len(y)) if sample_weight is None else sample_weight
    return brentq(lambda a: np.sum(w * (y - expit(a + x))), -20, 20, xtol=1e-14)


def test_metrics_equal_scikit_learn_and_direct_fits():
    truth, scores = _simulate(800, seed=1, sharpen=1.6)
    truth[::17, 0] = np.nan  # unlabelled images are left out
    y, p = truth[np.isfinite(truth[:, 0]), 0], scores[np.isfinite(truth[:, 0]), 0]
    report = calibration_report(truth, scores, ["x"], resample_counts(800, 50, 0), bins=10)
    m = report["labels"]["x"]["metrics"]
    assert report["labels"]["x"]["n"] == len(y)
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert m["observed_expected"]["value"] == pytest.approx(y.sum() / p.sum(), rel=1e-12)
    _, b = _ml_slope(y, p)
    assert m["slope"]["value"] == pytest.approx(b, abs=1e-6)
    assert m["intercept"]["value"] == pytest.approx(_ml_offset_intercept(y, p), abs=1e-9)
    # ECE from scikit-learn's quantile reliability curve and the bin counts
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    counts = [row["n"] for row in report["labels"]["x"]["reliability"]["bins"]]
    assert m["ece"]["value"] == pytest.approx(np.sum(np.array(counts) / len(y) * np.abs(observed - predicted)),
                                              abs=1e-12)
    assert report["mean"]["slope"]["value"] == m["slope"]["value"] and report["mean"]["slope"]["labels"] == 1


def test_reliability_bins_equal_scikit_learn_quantile_curve_with_ties():
    rng = np.random.default_rng(2)
    p = np.round(rng.beta(2, 5, 500), 2)  # rounding ties scores, so some quantile bins come out empty
    p[:60] = 0.5
    y = (rng.random(500) < p).astype(float)
    for bins in (2, 7, 20):
        out = reliability_bins(y, p, bins)
        observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="quantile")
        rows = out["bins"]
        assert [r["observed"] for r in rows] == pytest.approx(observed, abs=1e-12)
        assert [r["mean_predicted"] for r in rows] == pytest.approx(predicted, abs=1e-12)
        assert sum(r["n"] for r in rows) == 500 and len(rows) + out["empty_bins"] == bins
        for r in rows:  # Wilson's interval holds the observed fraction
            assert r["observed_ci95"][0] <= r["observed"] <= r["observed_ci95"][1] and r["ci_method"] == "wilson"
    assert reliability_bins(y, p, 20)["empty_bins"] > 0


def test_weighted_values_equal_the_metrics_of_each_explicit_resample():
    truth, scores = _simulate(300, seed=3, sharpen=2.0)
    y, p = truth[:, 0], scores[:, 0]
    counts = resample_counts(300, 8, seed=5)
    point, boot = label_calibration(y, p, counts, bins=6)
    ones = label_calibration(y, p, np.ones((1, 300), np.float32), bins=6)[1]
    for name in ("brier", "ece", "observed_expected", "intercept", "slope"):  # all-ones weights = the data
        assert ones[name][0] == pytest.approx(point[name][0], rel=1e-5, abs=1e-6)
    edges = np.percentile(p, np.linspace(0, 100, 7))  # resamples keep the data's bins
    for b in range(len(counts)):
        idx = np.repeat(np.arange(300), counts[b].astype(int))
        yb, pb = y[idx], p[idx]
        assert boot["brier"][b] == pytest.approx(brier_score_loss(yb, pb), rel=1e-5)
        assert boot["observed_expected"][b] == pytest.approx(yb.sum() / pb.sum(), rel=1e-5)
        ids = np.searchsorted(edges[1:-1], pb)
        ece = sum(abs(np.sum(pb[ids == k] - yb[ids == k])) for k in range(6)) / len(idx)
        assert boot["ece"][b] == pytest.approx(ece, abs=1e-5)
        assert boot["slope"][b] == pytest.approx(_ml_slope(yb, pb)[1], abs=1e-4)
        assert boot["intercept"][b] == pytest.approx(_ml_offset_intercept(yb, pb), abs=1e-4)


def test_newton_converges_from_a_poor_start_and_refuses_separated_classes():
    truth, scores = _simulate(2000, seed=4, sharpen=3.0)  # slope 1/3: a full step from b = 1 overshoots
    y, x = truth[:, 0], clipped_logit(scores[:, 0])
    fit = logistic_fit(y, x, np.ones((1, 2000)), slope=True)[0]
    assert fit == pytest.approx(_ml_slope(y, scores[:, 0]), abs=1e-6)
    separated = np.r_[np.zeros(50), np.ones(50)]
    assert np.isnan(logistic_fit(separated, np.linspace(-2, 2, 100), np.ones((1, 100)), slope=True)).all()
    assert np.isfinite(logistic_fit(separated, np.linspace(-2, 2, 100), np.ones((1, 100)), slope=False)).all()
    report = calibration_report(separated[:, None], expit(np.linspace(-2, 2, 100))[:, None], ["x"],
                                resample_counts(100, 20, 0))
    assert report["labels"]["x"]["metrics"]["slope"]["reason"] == (
        "not estimable: no finite logistic fit (the scores separate the classes)")


def test_a_calibrated_model_has_intervals_around_the_ideal():
    truth, scores = _simulate(1500, seed=11)
    m = calibration_report(truth, scores, ["x"], resample_counts(1500, 400, 0))["labels"]["x"]["metrics"]
    assert m["slope"]["ci95"][0] <= 1 <= m["slope"]["ci95"][1]
    assert m["intercept"]["ci95"][0] <= 0 <= m["intercept"]["ci95"][1]
    assert m["observed_expected"]["ci95"][0] <= 1 <= m["observed_expected"]["ci95"][1]
    assert m["ece"]["ci95"][0] == 0.0 and m["ece"]["ci95"][1] < 0.08  # the band reaches 0
    assert m["ece"]["ci_method"].startswith("simultaneous bootstrap band")


def test_an_over_confident_model_is_flagged():
    truth, scores = _simulate(1500, seed=11, sharpen=3.0)
    m = calibration_report(truth, scores, ["x"], resample_counts(1500, 400, 0))["labels"]["x"]["metrics"]
    assert m["slope"]["ci95"][1] < 1 and m["slope"]["value"] == pytest.approx(1 / 3, abs=0.05)
    assert m["ece"]["ci95"][0] > 0.03


def test_a_label_with_few_positives_is_not_estimable_and_left_out_of_the_mean():
    truth, scores = _simulate(400, seed=6, labels=2)
    truth[:, 1] = 0
    truth[:5, 1] = 1
    report = calibration_report(truth, scores, ["a", "b"], resample_counts(400, 50, 0), min_positives=10)
    for entry in report["labels"]["b"]["metrics"].values():
        assert entry["value"] is None
        assert entry["reason"] == "not estimable: 5 positive / 395 negative images (needs 10 / 10)"
    assert report["mean"]["brier"]["labels"] == 1
    assert report["mean"]["brier"]["value"] == report["labels"]["a"]["metrics"]["brier"]["value"]
    assert report["labels"]["b"]["reliability"]["bins"]  # the diagram can still be drawn


def test_decision_curve_equals_a_direct_computation():
    truth, scores = _simulate(600, seed=7)
    y, p = truth[:, 0], scores[:, 0]
    y[::13] = np.nan
    counts = resample_counts(600, 30, seed=2)
    thresholds = [0.05, 0.1, 0.2, 0.35, 0.5]
    curve = decision_curve(y, p, thresholds, counts)
    known = np.isfinite(y)

    def net_benefit(yy, pp, t):
        n, treated = len(yy), pp >= t
        return np.sum(treated & (yy == 1)) / n - np.sum(treated & (yy == 0)) / n * t / (1 - t)

    yk, pk = y[known], p[known]
    for j, t in enumerate(thresholds):
        model, prevalence = net_benefit(yk, pk, t), yk.mean()
        assert curve["model"]["value"][j] == pytest.approx(model, abs=1e-12)
        assert curve["treat_all"]["value"][j] == pytest.approx(prevalence - (1 - prevalence) * t / (1 - t), abs=1e-12)
        assert curve["model_minus_treat_all"]["value"][j] == pytest.approx(
            model - curve["treat_all"]["value"][j], abs=1e-12)
        lo, hi = curve["model"]["ci95"][j]
        resampled = []
        for b in range(30):
            idx = np.repeat(np.arange(600), counts[b].astype(int))
            idx = idx[known[idx]]
            resampled.append(net_benefit(y[idx], p[idx], t))
        assert [lo, hi] == pytest.approx(list(np.percentile(resampled, [2.5, 97.5])), abs=1e-6)
    assert curve["treat_none"] == 0.0 and curve["n"] == known.sum()
    assert len(decision_curve(y, p, None, counts)["thresholds"]) == 99


def test_recalibration_on_one_split_improves_another_and_keeps_the_ranking():
    valid_truth, valid_scores = _simulate(1500, seed=8, sharpen=3.0, labels=2)
    test_truth, test_scores = _simulate(1500, seed=9, sharpen=3.0, labels=2)
    test_scores = test_scores.astype(np.float32)  # as the model gives them
    valid_truth[:, 1] = 0  # no positives on the validation split: identity
    labels = ["over_confident", "no_positives"]
    weights = resample_counts(1500, 200, 0)
    before = calibration_report(test_truth, test_scores, labels, weights)["labels"]["over_confident"]["metrics"]
    for method in ("temperature", "platt"):
        maps = fit_recalibration(valid_truth, valid_scores, labels, method=method)
        assert maps["no_positives"] == {"method": "identity", "reason": "not fitted: 0 positive / 1500 negative "
                                                                        "images (needs 10 / 10)"}
        assert maps["over_confident"]["method"] == method
        recalibrated = apply_recalibration(test_scores, labels, maps)
        assert np.array_equal(recalibrated[:, 1], test_scores[:, 1])
        for i in range(2):  # a strictly increasing map: AUROC exactly the same
            assert roc_auc_score(test_truth[:, i], recalibrated[:, i]) == roc_auc_score(test_truth[:, i],
                                                                                       test_scores[:, i])
        after = calibration_report(test_truth, recalibrated, labels, weights)["labels"]["over_confident"]["metrics"]
        assert after["brier"]["value"] < before["brier"]["value"] - 0.01
        assert after["ece"]["value"] < before["ece"]["value"] / 2
        assert abs(after["slope"]["value"] - 1) < 0.25 < abs(before["slope"]["value"] - 1)  # about 1/3 before
    maps = fit_recalibration(valid_truth, valid_scores, labels, method="temperature")
    y, x = valid_truth[:, 0], clipped_logit(valid_scores[:, 0])
    expected = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12).fit(x[:, None], y).coef_[0, 0]
    assert maps["over_confident"]["temperature"] == pytest.approx(1 / expected, rel=1e-5)
    assert maps["over_confident"]["temperature"] == pytest.approx(3.0, rel=0.15)


def test_recalibration_never_reverses_a_ranking():
    truth, scores = _simulate(500, seed=10)
    maps = fit_recalibration(truth, 1 - scores, ["x"], method="platt")  # anti-informative scores
    assert maps["x"]["method"] == "identity" and "<= 0" in maps["x"]["reason"]
    separated = fit_recalibration(np.r_[np.zeros(20), np.ones(20)][:, None], np.linspace(0.1, 0.9, 40)[:, None],
                                  ["x"], method="temperature")
    assert separated["x"]["method"] == "identity" and "separate" in separated["x"]["reason"]
    for bad in ({"method": "platt", "a": -1.0, "b": 0.0}, {"method": "temperature", "temperature": 0.0},
                {"method": "isotonic"}):
        with pytest.raises(ValueError, match="recalibration map of 'x'"):
            apply_recalibration(scores, ["x"], {"x": bad})
    with pytest.raises(ValueError, match="no recalibration map"):
        apply_recalibration(scores, ["x"], {})
    edge = apply_recalibration(np.array([[0.0], [CLIP / 10], [CLIP / 5], [1.0]]), ["x"],
                               {"x": {"method": "temperature", "temperature": 2.0}})
    assert edge[0, 0] == 0.0 and edge[3, 0] == 1.0 and edge[1, 0] < edge[2, 0]  # not clipped: no new ties


def test_mapped_thresholds_keep_every_call_and_the_stored_map_says_whom_it_was_fit_on():
    truth, scores = _simulate(400, seed=11, sharpen=3.0, labels=3)
    scores = scores.astype(np.float32)  # as the model gives them, with ties at 1/4 of the images
    scores[::4] = scores[1::4]
    labels = ["temperature", "platt", "identity"]
    maps = {"temperature": {"method": "temperature", "temperature": 2.5},
            "platt": {"method": "platt", "a": 0.4, "b": -1.0}, "identity": {"method": "identity", "reason": "not fitted"}}
    mapped = apply_recalibration(scores, labels, maps)
    for t in (0.0, 1e-9, 0.5, float(scores[7, 0]), float(scores[3, 1]), 1 - 1e-7, 1.0):  # some scores themselves
        thresholds = map_thresholds(dict.fromkeys(labels, t), labels, maps)
        for i, label in enumerate(labels):
            assert np.array_equal(mapped[:, i] >= thresholds[label], scores[:, i] >= t), (label, t)

    assert stored_map(truth, scores, labels, 123, "none") is None
    stored = stored_map(truth, scores, labels, 123, "platt", min_positives=5, min_negatives=5)
    assert stored == {"method": "platt", "split": "valid", "patients": 123, "images": 400,
                      "labels": fit_recalibration(truth, scores, labels, "platt", 5, 5)}
    stored["labels"]["identity"] = maps["identity"]
    assert describe_map(stored) == ("Platt scaling per label, fit on the 123 validation patients (400 images); left "
                                    "unchanged (identity) for identity")
    released = bundle_map(stored)  # the bundle's counts are rounded like the training count
    assert (released["patients"], released["images"], released["counts_rounded"]) == (120, 400, True)
    assert calibration_words(released, private=True) == (
        "Platt scaling per label, fit on about 120 validation patients (about 400 images); left unchanged (identity) "
        "for identity (not protected by the DP guarantee)")
    assert calibration_words(None, private=True) == "none" and bundle_map(None) is None


def test_subgroup_calibration_values_and_gaps():
    rng = np.random.default_rng(12)
    n = 2000
    sex, age = rng.choice(np.array(["F", "M"]), n), rng.uniform(20, 95, n)
    truth, scores = _simulate(n, seed=12, labels=2)
    women = sex == "F"
    scores[women, 1] = expit(logit(scores[women, 1]) + 1.0)  # label b over-predicts for women only
    report = subgroup_calibration(truth, scores, ["a", "b"], sex, age, EDGES, resample_counts(n, 300, 0),
                                  bins=10, permutations=300, seed=1)
    f = report["subgroups"]["sex"]["F"]["b"]
    assert f["n"] == women.sum()
    assert f["metrics"]["calibration_in_the_large"]["value"] == pytest.approx(
        scores[women, 1].mean() - truth[women, 1].mean(), abs=1e-12)
    assert f["metrics"]["observed_expected"]["value"] == pytest.approx(
        truth[women, 1].sum() / scores[women, 1].sum(), rel=1e-12)
    for i, label in enumerate(["a", "b"]):  # (b's errors all lean one way for women: any binning gives its ECE)
        edges = np.percentile(scores[:, i], np.linspace(0, 100, 11))  # the label's bins, over all images
        ids = np.searchsorted(edges[1:-1], scores[women, i])
        errors = scores[women, i] - truth[women, i]
        assert report["subgroups"]["sex"]["F"][label]["metrics"]["ece"]["value"] == pytest.approx(
            sum(abs(errors[ids == k].sum()) for k in range(10)) / women.sum(), abs=1e-12)
    gaps = report["fairness"]["sex"]["labels"]
    assert gaps["b"]["metrics"]["calibration_in_the_large_gap"]["p_value"] < 0.01  # a real gap
    assert gaps["b"]["metrics"]["calibration_in_the_large_gap"]["ci95"][0] > 0
    assert gaps["a"]["metrics"]["calibration_in_the_large_gap"]["p_value"] > 0.05  # none
    assert gaps["a"]["metrics"]["ece_gap"]["ci95"][0] == 0.0
    assert report["fairness"]["sex"]["mean"]["ece_gap"]["labels"] == 2
    small = report["subgroups"]["age"]["[0,30)"]["a"]
    assert small["n"] >= 10 or small["reason"].startswith("n = ")


def test_a_group_without_predicted_probability_has_no_observed_expected_ratio():
    rng = np.random.default_rng(3)
    sex, age = rng.choice(np.array(["F", "M"]), 200), rng.uniform(20, 95, 200)
    truth, scores = _simulate(200, seed=3)
    scores[sex == "F", 0] = 0.0
    report = subgroup_calibration(truth, scores, ["x"], sex, age, EDGES, resample_counts(200, 20, 0), bins=5,
                                  permutations=10)
    ratio = report["subgroups"]["sex"]["F"]["x"]["metrics"]["observed_expected"]
    assert ratio["value"] is None and ratio["reason"] == "not estimable: no predicted probability above 0"


def test_bad_calibration_settings_are_refused_naming_the_parameter():
    truth, scores = _simulate(30, seed=0)
    weights = resample_counts(30, 10, 0)
    for bins in (1, 0, 31, 2.5):
        with pytest.raises(InputError, match="evaluation.calibration_bins"):
            calibration_report(truth, scores, ["x"], weights, bins=bins)
    assert "more than the 30 scored images" in _message(lambda: calibration_report(truth, scores, ["x"], weights,
                                                                                    bins=31))
    with pytest.raises(InputError, match="evaluation.calibration_bins"):
        reliability_bins(truth[:, 0], scores[:, 0], 1)
    for thresholds in ([0.0, 0.5], [0.5, 1.0], [], [np.nan]):
        with pytest.raises(InputError, match="decision-curve thresholds"):
            decision_curve(truth[:, 0], scores[:, 0], thresholds, weights)
    with pytest.raises(InputError, match="recalibration method 'isotonic'"):
        fit_recalibration(truth, scores, ["x"], method="isotonic")


def _message(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    return str(caught.value)
