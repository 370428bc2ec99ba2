"""Subgroups and fairness metrics against hand-computed values and fairlearn/scikit-learn; calibration gaps
joined into the fairness report, its q-values, table and report."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.metrics import accuracy_score, roc_auc_score

from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from artifacts import Layout
from config import InputError, validate
from conftest import assert_report
from evaluation.bootstrap import resample_counts, resampling
from evaluation.calibration import subgroup_calibration
from evaluation.fairness import _fairness_entries, age_bins, fairness_report, fairness_table, join_calibration
from evaluation.report import page, subgroup_calibration_section
from Prediction_DP import Scored, write_predictions

EDGES = [0, 30, 60, 70, 80, 100]


def test_age_bins_follow_the_study():
    ages = np.array([0, 29.9, 30, 59, 60, 70, 79, 80, 100, 101, np.nan])
    assert list(age_bins(ages, EDGES)) == ["[0,30)", "[0,30)", "[30,60)", "[30,60)", "[60,70)", "[70,80)",
                                           "[70,80)", "[80,100]", "[80,100]", "", ""]


def _table():
    """12 images: 6 women aged 20-50, 6 men aged 65-85, one label, threshold 0.5."""
    truth = np.array([1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0], dtype=bool)[:, None]
    scores = np.array([.9, .4, .2, .6, .1, .7, .8, .3, .6, .7, .4, .2])[:, None]
    sex = np.array(["F"] * 6 + ["M"] * 6)
    age = np.array([20, 25, 40, 45, 50, 35, 65, 66, 68, 75, 85, 90])
    return truth, scores, sex, age


def test_fairness_metrics_match_hand_computed_values():
    truth, scores, sex, age = _table()
    report = fairness_report(truth, scores, ["x"], {"x": 0.5}, sex, age, EDGES, resample_counts(12, 200, 0),
                             min_size=2, min_positives=1, min_negatives=1, permutations=200)
    pred = scores[:, 0] >= 0.5
    f, m = sex == "F", sex == "M"
    acc_f, acc_m = accuracy_score(truth[f, 0], pred[f]), accuracy_score(truth[m, 0], pred[m])
    sex_fair = report["fairness"]["sex"]["labels"]["x"]["metrics"]
    assert sex_fair["statistical_parity_difference:F-M"]["value"] == pytest.approx(acc_f - acc_m)
    # demographic parity: |P(pred | F) - P(pred | M)|; equalized odds: max of the TPR and FPR gaps (fairlearn's)
    groups = sex
    assert sex_fair["demographic_parity_difference"]["value"] == pytest.approx(
        demographic_parity_difference(truth[:, 0], pred, sensitive_features=groups))
    assert sex_fair["equalized_odds_difference"]["value"] == pytest.approx(
        equalized_odds_difference(truth[:, 0], pred, sensitive_features=groups))
    auroc = {g: roc_auc_score(truth[mask, 0], scores[mask, 0]) for g, mask in (("F", f), ("M", m))}
    assert sex_fair["auroc_gap"]["value"] == pytest.approx(abs(auroc["F"] - auroc["M"]))
    assert sex_fair["worst_group_auroc"]["value"] == pytest.approx(min(auroc.values()))
    for name in ("demographic_parity_difference", "equalized_odds_difference", "auroc_gap"):
        entry = sex_fair[name]  # every gap has an interval, a permutation p-value (never 0) and a q-value
        assert entry["ci95"] is not None and 1 / 201 <= entry["p_value"] <= 1 and entry["q_value"] >= entry["p_value"]
    assert sex_fair["worst_group_auroc"]["p_value"] is None  # a level, not a gap
    # underdiagnosis: abnormal images called normal, per group
    under = report["underdiagnosis"]["sex"]["groups"]
    assert under["F"]["underdiagnosis"]["value"] == pytest.approx(1 / 3)  # 0.4 of 3 positives
    assert under["M"]["underdiagnosis"]["value"] == pytest.approx(1 / 3)
    assert under["F"]["overdiagnosis"]["value"] == pytest.approx(1 / 3)  # 0.6 of 3 negatives
    assert under["F"]["underdiagnosis"]["ci_method"] == "wilson"  # 3 abnormal images: the bootstrap cannot tell
    entry = report["subgroups"]["sex"]["F"]["x"]
    assert entry["n"] == 6 and entry["prevalence"] == pytest.approx(0.5)
    assert entry["metrics"]["auroc"]["value"] == pytest.approx(auroc["F"])
    lo, hi = entry["metrics"]["accuracy"]["ci95"]
    assert lo <= acc_f <= hi and hi > lo


def test_age_spd_against_the_size_weighted_rest():
    truth, scores, sex, age = _table()
    report = fairness_report(truth, scores, ["x"], {"x": 0.5}, sex, age, EDGES, resample_counts(12, 50, 0),
                             min_size=3, permutations=0)
    bins, pred = age_bins(age, EDGES), scores[:, 0] >= 0.5
    acc = {g: accuracy_score(truth[bins == g, 0], pred[bins == g]) for g in ("[30,60)", "[60,70)")}
    spd = report["fairness"]["age"]["labels"]["x"]["metrics"]["statistical_parity_difference:[30,60)"]
    assert spd["value"] == pytest.approx(acc["[30,60)"] - acc["[60,70)"]) and spd["p_value"] is None


def test_small_or_one_class_subgroups_are_not_estimable():
    truth, scores, sex, age = _table()
    report = fairness_report(truth, scores, ["x"], {"x": 0.5}, sex, age, EDGES, resample_counts(12, 50, 0),
                             min_size=3, permutations=50)
    # ages: [0,30) 2 images, [30,60) 4, [60,70) 3, [70,80) 1, [80,100] 2
    assert report["subgroups"]["age"]["[60,70)"]["x"]["estimable"]
    for group in ("[0,30)", "[70,80)", "[80,100]"):
        entry = report["subgroups"]["age"][group]["x"]
        assert not entry["estimable"] and "minimum subgroup size 3" in entry["reason"]
    empty = report["subgroups"]["sex_age"]["F [80,100]"]["x"]
    assert empty["n"] == 0 and not empty["estimable"]
    # only [30,60) and [60,70) enter the age comparisons; no AUROC has 10 positives and 10 negatives
    age_fair = report["fairness"]["age"]["labels"]["x"]
    assert age_fair["groups"]["size"] == ["[30,60)", "[60,70)"] and age_fair["groups"]["auroc"] == []
    assert "auroc_gap" not in age_fair["metrics"] and "needs 10 / 10" in age_fair["left_out"]["[30,60)"]
    under = report["underdiagnosis"]["age"]["groups"]["[30,60)"]  # 4 images, 1 abnormal, 3 normal
    assert under["underdiagnosis"]["value"] is None and "1 abnormal images < minimum subgroup size 3" in \
        under["underdiagnosis"]["reason"]
    assert under["overdiagnosis"]["value"] is not None
    table = fairness_table(report)
    assert table["value"].isna().sum() > 0 and (table["note"].fillna("") != "").any()
    assert str(table["n"].dtype) == "Int64"  # counts stay integers in the CSV
    json.dumps(report, allow_nan=False, default=str)  # no NaN anywhere


def test_one_class_subgroup_has_named_missing_metrics():
    truth = np.array([0] * 12, dtype=bool)[:, None]
    truth[:3, 0] = True  # all positives among the women
    scores = np.linspace(0, 1, 12)[:, None]
    sex = np.array(["F"] * 6 + ["M"] * 6)
    report = fairness_report(truth, scores, ["x"], {"x": 0.5}, sex, np.full(12, 50), EDGES,
                             resample_counts(12, 50, 0), min_size=2, min_positives=1, min_negatives=1)
    men = report["subgroups"]["sex"]["M"]["x"]["metrics"]
    assert men["auroc"]["value"] is None and "0 positive / 6 negative" in men["auroc"]["reason"]
    assert men["sensitivity"]["value"] is None and men["specificity"]["value"] is not None
    # the men have no positive: no TPR, so they leave the equalized odds comparison instead of counting as 0
    sex_fair = report["fairness"]["sex"]["labels"]["x"]
    assert sex_fair["groups"]["rates"] == ["F"] and "no positive" in sex_fair["left_out"]["M"]
    assert "equalized_odds_difference" not in sex_fair["metrics"]


def _population(n_patients, rng, gap=0.0):
    """Patients with 1-3 images; the model separates the classes less well for women by ``gap``."""
    patients = np.repeat(np.arange(n_patients), rng.integers(1, 4, n_patients))
    sex = np.array(["F", "M"])[rng.integers(0, 2, n_patients)][patients]
    age = rng.uniform(20, 95, n_patients)[patients]
    truth = (rng.random((len(patients), 2)) < 0.3)
    shift = np.where(sex == "F", 1.5 - gap, 1.5)[:, None]
    scores = 1 / (1 + np.exp(-rng.normal(truth * shift - 0.7, 1.0)))
    return patients, sex, age, truth, scores


def test_a_real_gap_is_detected_and_a_chance_gap_is_not():
    rng = np.random.default_rng(11)
    thresholds = {"a": 0.5, "b": 0.5}
    patients, sex, age, truth, scores = _population(500, rng, gap=1.3)
    weights, units, _ = resampling(patients, 300, 0, "patient")
    real = fairness_report(truth, scores, ["a", "b"], thresholds, sex, age, EDGES, weights, clusters=units,
                           permutations=300)["fairness"]["sex"]["mean"]["auroc_gap"]
    assert real["value"] > 0.15 and real["ci95"][0] > 0.05 and real["p_value"] < 0.01
    shuffled = rng.permutation(sex)  # groups unrelated to anything: whatever gap appears is chance
    chance = fairness_report(truth, scores, ["a", "b"], thresholds, shuffled, age, EDGES, weights, clusters=units,
                             permutations=300)
    gap = chance["fairness"]["sex"]["mean"]["auroc_gap"]
    assert gap["value"] < 0.1 and gap["p_value"] > 0.05
    # a gap's interval holds its estimate and reaches 0 when the groups do not differ (a percentile interval
    # of a range sits above the estimate and never covers 0)
    assert gap["ci95"][0] == 0.0 <= gap["value"] <= gap["ci95"][1] and "simultaneous" in gap["ci_method"]
    assert all(m["q_value"] >= m["p_value"] for *_, m in _fairness_entries(chance) if m.get("p_value") is not None)
    assert chance["multiplicity"]["tests"] > 10


def test_calibration_gaps_join_the_fairness_report_its_q_values_table_and_report(tmp_path):
    """Women's scores of label a are shifted up on purpose: its calibration-in-the-large gap by sex is
    found (interval above 0, small p); label b, calibrated alike in both groups, is not flagged. The
    gaps join the Benjamini-Hochberg set, the subgroups' metrics, the CSV rows and the report."""
    rng = np.random.default_rng(5)
    patients, sex, age, truth, scores = _population(500, rng)
    women = sex == "F"
    scores[women, 0] = expit(logit(scores[women, 0]) + 1.0)
    weights, units, _ = resampling(patients, 300, 0, "patient")
    report = fairness_report(truth, scores, ["a", "b"], {"a": 0.5, "b": 0.5}, sex, age, EDGES, weights,
                             clusters=units, permutations=300)
    before = report["multiplicity"]["tests"]
    auroc_gap = dict(report["fairness"]["sex"]["labels"]["a"]["metrics"]["auroc_gap"])
    join_calibration(report, subgroup_calibration(truth, scores, ["a", "b"], sex, age, EDGES, weights,
                                                  clusters=units, permutations=300))
    by_sex = report["fairness"]["sex"]["labels"]
    shifted = by_sex["a"]["metrics"]["calibration_in_the_large_gap"]
    assert shifted["ci95"][0] > 0 and shifted["p_value"] < 0.01 and shifted["q_value"] < 0.05
    assert by_sex["b"]["metrics"]["calibration_in_the_large_gap"]["p_value"] > 0.05
    assert report["multiplicity"]["tests"] == before + 12  # 2 gaps x (2 labels + their mean) x (sex, age)
    assert all("q_value" in m for *_, m in _fairness_entries(report) if m.get("p_value") is not None)
    kept = by_sex["a"]["metrics"]["auroc_gap"]
    assert {k: kept[k] for k in auroc_gap if k != "q_value"} == {k: v for k, v in auroc_gap.items() if k != "q_value"}
    assert {"auroc", "calibration_in_the_large", "ece"} <= set(report["subgroups"]["sex"]["F"]["a"]["metrics"])
    assert "ece_gap" in report["definitions"] and report["calibration"] == {"bins": 10}
    table = fairness_table(report)
    row = table[(table["metric"] == "calibration_in_the_large_gap") & (table["attribute"] == "sex")
                & (table["label"] == "a")]
    assert len(row) == 1 and row["q_value"].iloc[0] == shifted["q_value"]
    assert ((table["metric"] == "ece") & (table["group"] == "F")).sum() == 2
    section = subgroup_calibration_section(report, ["a", "b"])
    assert re.search(r"<td>F over-predicts by [0-9.]+, M by [0-9.]+: beyond chance", section)  # label a
    assert "within chance" in section
    path = tmp_path / "report.html"
    path.write_text(page("calibration", [("Calibration by subgroup", section)]))
    assert_report(path, ["Calibration by subgroup"], min_figures=2)  # a figure per attribute
    json.dumps(report)


def test_a_split_too_small_for_calibration_bins_is_said_not_crashed(tmp_path):
    """predict on one image writes its fairness with the subgroup calibration not estimable and why;
    more calibration bins than scored images is refused naming the setting (as for the whole split)."""
    cfg = validate({"evaluation": {"bootstrap": 20, "permutations": 20}}, source="test")
    labels = cfg.data.labels[:2]
    for n in (1, 3):
        frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k}" for k in range(n)],
                              "sex": ["F", "M", "F"][:n], "age": [40.0, 50.0, 70.0][:n]})
        scored = Scored(cfg, "test", frame, labels, np.ones((n, 2)), np.full((n, 2), 0.7), dict.fromkeys(labels, 0.5),
                        "valid", 1)
        files = Layout(tmp_path / str(n))
        if n == 1:
            write_predictions(files, scored, tmp_path / "best.pt", "tiny")
            fairness = json.loads((files.results / "test_fairness.json").read_text())
            assert fairness["calibration"] == {"bins": None, "reason": "not estimable: 1 scored image"}
            assert "not estimable: 1 scored image" in files.report("test").read_text()
        else:
            with pytest.raises(InputError, match=r"evaluation.calibration_bins\) = 10 is more than the 3 scored"):
                write_predictions(files, scored, tmp_path / "best.pt", "tiny")


def test_no_finding_label_defines_underdiagnosis():
    rng = np.random.default_rng(4)
    patients, sex, age, truth, scores = _population(200, rng)
    no_finding = ~truth.any(axis=1)
    labels, thresholds = ["a", "b", "No Finding"], {"a": 0.5, "b": 0.5, "No Finding": 0.6}
    nf_score = 1 - scores.max(axis=1)
    truth3, scores3 = np.column_stack([truth, no_finding]), np.column_stack([scores, nf_score])
    weights = resample_counts(len(patients), 50, 0)
    report = fairness_report(truth3, scores3, labels, thresholds, sex, age, EDGES, weights, permutations=0,
                             no_finding="No Finding")
    women = sex == "F"
    abnormal = women & ~no_finding
    expected = (nf_score[abnormal] >= 0.6).mean()  # FPR of the No Finding output (Seyyed-Kalantari 2021)
    assert report["underdiagnosis"]["sex"]["groups"]["F"]["underdiagnosis"]["value"] == pytest.approx(expected)
    assert "Seyyed-Kalantari" in report["underdiagnosis_definition"]
    composite = fairness_report(truth, scores, labels[:2], thresholds, sex, age, EDGES, weights, permutations=0)
    called_normal = ~(scores[abnormal] >= 0.5).any(axis=1)
    assert composite["underdiagnosis"]["sex"]["groups"]["F"]["underdiagnosis"]["value"] == pytest.approx(
        called_normal.mean())
    assert "composite" in composite["underdiagnosis_definition"]
