"""Paired comparison: DeLong against its defining structural components, bootstrap p-values."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from evaluation.bootstrap import resample_counts
from evaluation.calibration import calibration_report
from evaluation.compare import (bootstrap_difference, delong_test, holm, paired_auroc_comparison,
                                paired_calibration_comparison)


def _delong_by_definition(truth, score_a, score_b):
    """DeLong 1988 written out: psi(x, y) = 1 if x > y, 1/2 if equal, over all positive-negative pairs."""
    pos, neg = truth.astype(bool), ~truth.astype(bool)
    v10, v01, aucs = [], [], []
    for s in (score_a, score_b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))
    cov = s10 / pos.sum() + s01 / neg.sum()
    z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return aucs, cov, z, 2 * norm.sf(abs(z))


def test_delong_matches_the_definition_with_ties():
    rng = np.random.default_rng(5)
    truth = rng.random(400) < 0.35
    a = np.round(rng.normal(truth * 1.0, 1.0), 1)
    b = np.round(a * 0.5 + rng.normal(truth * 0.4, 1.0), 1)
    result = delong_test(truth, a, b)
    aucs, cov, z, p = _delong_by_definition(truth, a, b)
    assert result["auroc_a"] == pytest.approx(roc_auc_score(truth, a)) == pytest.approx(aucs[0])
    assert result["auroc_b"] == pytest.approx(aucs[1])
    assert result["variance_a"] == pytest.approx(cov[0, 0]) and result["covariance"] == pytest.approx(cov[0, 1])
    assert result["z"] == pytest.approx(z) and result["p_value"] == pytest.approx(p)


def test_delong_edge_cases():
    truth = np.array([0, 0, 1, 1, 0, 1])
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert delong_test(truth, score, score)["p_value"] == 1.0
    assert delong_test(np.zeros(6), score, score)["p_value"] is None


def test_delong_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(0)
    p_values = []
    for _ in range(300):
        truth = rng.random(150) < 0.4
        shared = rng.normal(truth * 0.8, 1.0)
        p_values.append(delong_test(truth, shared + rng.normal(0, 0.5, 150), shared + rng.normal(0, 0.5, 150))["p_value"])
    assert 0.02 <= np.mean(np.array(p_values) < 0.05) <= 0.09


def test_clustered_delong_counts_patients_not_images():
    """Three identical copies of every image: the clustered (Obuchowski) variance is that of the
    originals; the image-level variance shrinks threefold as if the copies were new patients."""
    rng = np.random.default_rng(2)
    truth = rng.random(300) < 0.4
    a, b = rng.normal(truth * 1.0, 1.0), rng.normal(truth * 0.8, 1.0)
    original = delong_test(truth, a, b)
    copies = np.repeat(np.arange(300), 3)
    clustered = delong_test(truth[copies], a[copies], b[copies], clusters=copies)
    naive = delong_test(truth[copies], a[copies], b[copies])
    assert clustered["auroc_a"] == pytest.approx(original["auroc_a"])
    for key in ("variance_a", "variance_b", "covariance"):  # I/(I-1) against m/(m-1), n/(n-1): within 1%
        assert clustered[key] == pytest.approx(original[key], rel=0.01)
        assert naive[key] == pytest.approx(original[key] / 3, rel=0.01)
    assert clustered["p_value"] == pytest.approx(original["p_value"], rel=0.05) and naive["p_value"] < clustered["p_value"]
    assert "Obuchowski" in clustered["variance"] and "ignores clustering" in naive["variance"]


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, None]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_bootstrap_difference_p_values():
    assert bootstrap_difference(np.full(100, 0.8), np.full(100, 0.7), 0.1)["p_value"] == pytest.approx(2 / 101)
    same = bootstrap_difference(np.full(100, 0.8), np.full(100, 0.8), 0.0)
    assert same["p_value"] == 1.0 and same["p_a_not_better"] == 1.0
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, 1000)
    assert bootstrap_difference(noise, np.zeros(1000), 0.0)["p_value"] > 0.8


def test_paired_comparison_detects_a_better_model_and_not_a_copy():
    rng = np.random.default_rng(3)
    truth = rng.random((600, 2)) < 0.3
    good = rng.normal(truth * 1.5, 1.0)
    poor = good * 0.3 + rng.normal(0, 1.0, good.shape)
    weights = resample_counts(600, 500, seed=0)
    result = paired_auroc_comparison(truth, good, poor, ["a", "b"], weights)
    for label in ("a", "b"):
        boot = result["labels"][label]["bootstrap"]
        assert boot["difference"] > 0.1 and boot["ci95"][0] > 0 and boot["p_value"] < 0.01
        assert result["labels"][label]["delong"]["p_value"] < 0.001
    assert result["auroc_mean"]["ci95"][0] > 0
    copy = paired_auroc_comparison(truth, good, good.copy(), ["a", "b"], weights)
    assert copy["auroc_mean"]["difference"] == 0 and copy["auroc_mean"]["p_value"] == 1.0


def test_paired_calibration_flags_an_over_confident_model_and_not_a_copy():
    """The same ranking pushed towards 0 and 1 (logits x 3) against the true risks: a positive Brier
    and ECE difference whose interval excludes 0; a copy: 0, its interval on 0; a rare label: the reason."""
    rng = np.random.default_rng(4)
    patients = np.repeat(np.arange(300), 2)
    risk = rng.uniform(0.05, 0.95, (600, 3))
    truth = (rng.random((600, 3)) < risk).astype(float)
    truth[:, 2] = 0
    truth[:3, 2] = 1  # 3 positives: not estimable
    truth[10:20, 0] = np.nan  # unlabelled images are left out
    over = expit(3 * logit(risk))
    weights = resample_counts(600, 300, seed=0, clusters=patients)
    labels = ["a", "b", "rare"]
    result = paired_calibration_comparison(truth, over, risk, labels, weights, bins=10)
    own = calibration_report(truth, over, labels, weights, bins=10)  # A's values are its calibration report's
    for entry, mine in [(result["labels"]["a"], own["labels"]["a"]["metrics"]), (result["labels"]["b"], None),
                        (result["mean"], own["mean"])]:
        for name in ("brier", "ece"):
            d = entry[name]
            assert d["difference"] == pytest.approx(d["a"] - d["b"]) and d["difference"] > 0.01
            assert 0 < d["ci95"][0] < d["difference"] < d["ci95"][1]
            if mine:
                assert d["a"] == pytest.approx(mine[name]["value"])
    assert result["labels"]["rare"]["brier"]["difference"] is None
    assert "3 positive" in result["labels"]["rare"]["ece"]["reason"]
    copy = paired_calibration_comparison(truth, over, over.copy(), labels, weights, bins=10)
    for name in ("brier", "ece"):
        assert copy["mean"][name]["difference"] == 0 and copy["mean"][name]["ci95"] == [0, 0]
    assert "no p-values" in result["note"]


def test_compare_command_writes_paired_results_and_refuses_mismatches(tiny_config, capsys):
    import json

    import pandas as pd

    from conftest import assert_report
    from main_2D_DP import main

    path = tiny_config(training={"epochs": 1})
    root = path.parent / "experiments"
    assert main(["train", "--config", str(path), "--name", "dp"]) == 0
    assert main(["train", "--config", str(path), "--name", "nodp", "--set", "dp.enabled=false"]) == 0
    capsys.readouterr()
    assert main(["compare", str(root / "dp"), str(root / "nodp")]) == 0
    out = root / "comparisons" / "dp__vs__nodp__test"
    printed = capsys.readouterr().out
    assert f"wrote {out}: comparison.json, comparison.csv, report.html" in printed
    assert "(private, epsilon " in printed and "(not private" in printed
    comparison = json.loads((out / "comparison.json").read_text())
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["label"]) == ["mean (primary endpoint)", *comparison["labels"]]
    assert comparison["bootstrap"]["unit"] == "patient" and comparison["bootstrap"]["paired"]
    assert "Holm" in comparison["endpoints"]["secondary"]
    mean = comparison["auroc_mean"]
    assert mean["difference"] == pytest.approx(comparison["auroc_mean_a"] - comparison["auroc_mean_b"])
    assert mean["ci95"][0] <= mean["difference"] <= mean["ci95"][1] and 0 <= mean["p_value"] <= 1
    for label, m in comparison["labels"].items():
        assert "Obuchowski" in m["delong"]["variance"] and 0 <= m["delong_image_level"]["p_value"] <= 1
        assert m["bootstrap"]["p_holm"] >= m["bootstrap"]["p_value"] > 0
    for name in ("brier", "ece"):  # calibration A - B on the same resamples, intervals only
        d = comparison["calibration"]["mean"][name]
        assert d["difference"] == pytest.approx(d["a"] - d["b"]) and d["ci95"][0] <= d["difference"] <= d["ci95"][1]
        assert table[f"{name}_difference"][0] == pytest.approx(d["difference"]) and "p_value" not in d
    assert "calibration, A - B with 95% intervals" in printed
    assert_report(out / "report.html", ["The two models", "AUROC differences", "Forest plot",
                                        "Calibration differences", "ROC curves"], min_figures=2)
    report = (out / "report.html").read_text()
    assert "<b>A</b> = dp: private, epsilon" in report and "<b>B</b> = nodp: not private" in report
    assert "p (paired bootstrap)" in report and "p_bootstrap" not in report  # words, not field names
    assert "ECE A - B [95% CI]" in report and "ece_difference" not in report
    assert main(["predict", str(root / "dp")]) == 0
    metrics = json.loads((root / "dp" / "results" / "test_metrics.json").read_text())
    assert comparison["auroc_mean_a"] == pytest.approx(metrics["auroc_mean"])
    for name in ("brier", "ece"):  # A's own calibration results
        assert comparison["calibration"]["mean"][name]["a"] == pytest.approx(metrics["calibration_mean"][name]["value"])
    patients = pd.read_csv(root / "dp" / "private" / "predictions" / "test.csv")["patient_id"].nunique()
    assert comparison["bootstrap"]["units"] == metrics["bootstrap"]["units"] == patients < comparison["n_images"]

    # a different label set, and different test images, are refused
    assert main(["train", "--config", str(path), "--name", "labels", "--set", "data.labels=[cardiomegaly]"]) == 0
    assert main(["train", "--config", str(path), "--name", "public", "--set", "data.site=all"]) == 0
    capsys.readouterr()
    assert main(["compare", str(root / "dp"), str(root / "labels")]) == 2
    assert "predicts" in capsys.readouterr().err
    assert main(["compare", str(root / "dp"), str(root / "public")]) == 2
    assert "the test splits differ" in capsys.readouterr().err
