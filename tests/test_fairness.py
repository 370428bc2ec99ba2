"""Subgroups and fairness metrics against hand-computed values and fairlearn/scikit-learn."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from evaluation.bootstrap import resample_counts
from evaluation.fairness import age_bins, fairness_report, fairness_table, statistical_parity

EDGES = [0, 30, 60, 70, 80, 100]


def test_age_bins_follow_the_study():
    ages = np.array([0, 29.9, 30, 59, 60, 70, 79, 80, 100, 101, np.nan])
    assert list(age_bins(ages, EDGES)) == ["[0,30)", "[0,30)", "[30,60)", "[30,60)", "[60,70)", "[70,80)",
                                           "[70,80)", "[80,100]", "[80,100]", "", ""]


def test_statistical_parity_difference_by_hand():
    assert statistical_parity({"F": 0.8, "M": 0.7}, {"F": 10, "M": 30}, "sex") == {"F-M": pytest.approx(0.1)}
    spd = statistical_parity({"a": 0.9, "b": 0.6, "c": 0.8}, {"a": 10, "b": 30, "c": 10}, "age")
    assert spd["a"] == pytest.approx(0.9 - (30 * 0.6 + 10 * 0.8) / 40)
    assert spd["b"] == pytest.approx(0.6 - (10 * 0.9 + 10 * 0.8) / 20)


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
                             min_size=2)
    pred = scores[:, 0] >= 0.5
    f, m = sex == "F", sex == "M"
    acc_f, acc_m = accuracy_score(truth[f, 0], pred[f]), accuracy_score(truth[m, 0], pred[m])
    sex_fair = report["fairness"]["sex"]["labels"]["x"]
    assert sex_fair["statistical_parity_difference"]["F-M"] == pytest.approx(acc_f - acc_m)
    # demographic parity: |P(pred | F) - P(pred | M)|; equalized odds: max of the TPR and FPR gaps
    assert sex_fair["demographic_parity_difference"] == pytest.approx(abs(pred[f].mean() - pred[m].mean()))
    tpr = [pred[g & truth[:, 0]].mean() for g in (f, m)]
    fpr = [pred[g & ~truth[:, 0]].mean() for g in (f, m)]
    assert sex_fair["equalized_odds_difference"] == pytest.approx(max(abs(tpr[0] - tpr[1]), abs(fpr[0] - fpr[1])))
    auroc = {g: roc_auc_score(truth[mask, 0], scores[mask, 0]) for g, mask in (("F", f), ("M", m))}
    assert sex_fair["auroc_gap"] == pytest.approx(abs(auroc["F"] - auroc["M"]))
    assert sex_fair["worst_group_auroc"] == pytest.approx(min(auroc.values()))
    # underdiagnosis: abnormal images called normal, per group
    assert report["underdiagnosis"]["sex"]["F"]["rate"] == pytest.approx(1 / 3)  # 0.4 of 3 positives
    assert report["underdiagnosis"]["sex"]["M"]["rate"] == pytest.approx(1 / 3)  # 0.4 of 3 positives
    entry = report["subgroups"]["sex"]["F"]["x"]
    assert entry["n"] == 6 and entry["prevalence"] == pytest.approx(0.5)
    assert entry["metrics"]["auroc"]["value"] == pytest.approx(auroc["F"])
    lo, hi = entry["metrics"]["accuracy"]["ci95"]
    assert lo <= acc_f <= hi
    lo, hi = entry["metrics"]["prevalence"]["ci95"]
    assert entry["metrics"]["prevalence"]["value"] == 0.5 and 0 <= lo < 0.5 < hi <= 1


def test_small_or_one_class_subgroups_are_not_estimable():
    truth, scores, sex, age = _table()
    report = fairness_report(truth, scores, ["x"], {"x": 0.5}, sex, age, EDGES, resample_counts(12, 50, 0),
                             min_size=3)
    # ages: [0,30) 2 images, [30,60) 4, [60,70) 3, [70,80) 1, [80,100] 2
    assert report["subgroups"]["age"]["[60,70)"]["x"]["estimable"]
    for group in ("[0,30)", "[70,80)", "[80,100]"):
        entry = report["subgroups"]["age"][group]["x"]
        assert not entry["estimable"] and "minimum subgroup size 3" in entry["reason"]
    empty = report["subgroups"]["sex_age"]["F [80,100]"]["x"]
    assert empty["n"] == 0 and not empty["estimable"]
    # only [30,60) and [60,70) enter the age comparisons
    assert set(report["fairness"]["age"]["labels"]["x"]["statistical_parity_difference"]) == {"[30,60)", "[60,70)"}
    table = fairness_table(report)
    assert table["value"].isna().sum() > 0 and (table["note"].fillna("") != "").any()
    json.dumps(report, allow_nan=False, default=str)  # no NaN anywhere


def test_one_class_subgroup_has_named_missing_metrics():
    truth = np.array([0] * 12, dtype=bool)[:, None]
    truth[:3, 0] = True  # all positives among the women
    scores = np.linspace(0, 1, 12)[:, None]
    sex = np.array(["F"] * 6 + ["M"] * 6)
    report = fairness_report(truth, scores, ["x"], {"x": 0.5}, sex, np.full(12, 50), EDGES,
                             resample_counts(12, 50, 0), min_size=2)
    men = report["subgroups"]["sex"]["M"]["x"]["metrics"]
    assert men["auroc"]["value"] is None and "both classes" in men["auroc"]["reason"]
    assert men["sensitivity"]["value"] is None and men["specificity"]["value"] is not None
