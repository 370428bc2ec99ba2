"""Subgroup performance and fairness across sex and age, as in the study.

Subgroups: sex (F, M), age bins (``evaluation.age_bins`` edges; the last bin is closed) and sex x age.
Per subgroup and label: n, and prevalence, AUROC, accuracy, sensitivity and specificity, each with a
paired bootstrap interval (the test set's resample counts restricted to the subgroup). A subgroup
smaller than ``min_size``, or a metric whose class is absent, is reported as not estimable.

Fairness per label, then averaged over labels:
- statistical parity difference (SPD) as coded in the study: for sex, accuracy(F) - accuracy(M); for
  an age group g, accuracy(g) - sum_{h != g} n_h accuracy(h) / sum_{h != g} n_h;
- demographic parity difference and equalized odds difference of the thresholded predictions
  (fairlearn), over the subgroups with at least ``min_size`` images;
- AUROC gap (best minus worst estimable subgroup) and worst-group AUROC;
and per subgroup the underdiagnosis rate: the share of abnormal images (any configured label
positive) predicted as having no finding (every label below its threshold).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from evaluation.bootstrap import percentile_interval, weighted_auroc, weighted_threshold_metrics

SUBGROUP_METRICS = ("auroc", "accuracy", "sensitivity", "specificity")


def age_bin_names(edges: list[float]) -> list[str]:
    return [f"[{a:g},{b:g})" for a, b in zip(edges[:-2], edges[1:-1])] + [f"[{edges[-2]:g},{edges[-1]:g}]"]


def age_bins(age: np.ndarray, edges: list[float]) -> np.ndarray:
    """Bin name per image ('' for a missing or out-of-range age)."""
    names = np.array(age_bin_names(edges) + [""])
    age = np.asarray(age, dtype=float)
    idx = np.digitize(age, edges[1:-1], right=False)
    idx[~np.isfinite(age) | (age < edges[0]) | (age > edges[-1])] = len(names) - 1
    return names[idx]


def subgroups(sex: np.ndarray, age: np.ndarray, edges: list[float]) -> dict[str, dict[str, np.ndarray]]:
    """attribute -> group -> boolean mask, for sex, age and sex x age."""
    sex = np.asarray(sex).astype(str)
    bins = age_bins(age, edges)
    by_sex = {s: sex == s for s in ("F", "M")}
    by_age = {b: bins == b for b in age_bin_names(edges)}
    by_both = {f"{s} {b}": ms & mb for s, ms in by_sex.items() for b, mb in by_age.items()}
    return {"sex": by_sex, "age": by_age, "sex_age": by_both}


def _subgroup_label(truth, score, threshold, weights, min_size) -> dict:
    keep = np.isfinite(truth.astype(np.float64))  # unlabelled images are left out
    truth, score, weights = truth[keep], score[keep], weights[:, keep]
    n, positives = int(len(truth)), int(truth.sum())
    entry = {"n": n, "positives": positives, "prevalence": positives / n if n else None}
    if n < min_size:
        return {**entry, "estimable": False, "reason": f"n = {n} < minimum subgroup size {min_size}"}
    predicted = score >= threshold
    full = np.ones((1, n), dtype=weights.dtype)
    point = {"auroc": weighted_auroc(truth, score, full)[0],
             **{k: v[0] for k, v in weighted_threshold_metrics(truth, predicted, full).items()}}
    resampled = {"auroc": weighted_auroc(truth, score, weights),
                 **weighted_threshold_metrics(truth, predicted, weights)}
    reasons = {"auroc": "needs both classes", "sensitivity": "no positive image", "specificity": "no negative image"}
    with np.errstate(invalid="ignore", divide="ignore"):
        prevalence = (weights @ truth.astype(weights.dtype)) / weights.sum(axis=1)
    metrics = {"prevalence": {"value": positives / n, "ci95": percentile_interval(prevalence.astype(np.float64))}}
    for name in SUBGROUP_METRICS:
        value = float(point[name])
        if np.isfinite(value):
            metrics[name] = {"value": value, "ci95": percentile_interval(resampled[name])}
        else:
            metrics[name] = {"value": None, "ci95": None, "reason": f"not estimable: {reasons.get(name, '')}"}
    return {**entry, "estimable": True, "metrics": metrics}


def statistical_parity(accuracy: dict[str, float], sizes: dict[str, int], attribute: str) -> dict[str, float]:
    """The study's SPD: F - M for sex; for age, each group against the size-weighted rest."""
    acc = {g: a for g, a in accuracy.items() if a is not None}
    if attribute == "sex":
        return {"F-M": acc["F"] - acc["M"]} if {"F", "M"} <= set(acc) else {}
    out = {}
    for group, value in acc.items():
        others = [(sizes[h], acc[h]) for h in acc if h != group]
        total = sum(n for n, _ in others)
        if total:
            out[group] = value - sum(n * a for n, a in others) / total
    return out


def fairness_report(truth: np.ndarray, scores: np.ndarray, labels: list[str], thresholds: dict[str, float],
                    sex: np.ndarray, age: np.ndarray, edges: list[float], weights: np.ndarray,
                    min_size: int = 10) -> dict:
    """Subgroup metrics with intervals, fairness metrics per label and averaged, underdiagnosis."""
    groups = subgroups(sex, age, edges)
    predicted = scores >= np.array([thresholds[label] for label in labels])
    report = {"age_bins": age_bin_names(edges), "min_subgroup_size": min_size, "subgroups": {}, "fairness": {},
              "underdiagnosis": {}}
    for attribute, masks in groups.items():
        report["subgroups"][attribute] = {
            group: {label: _subgroup_label(truth[mask, i], scores[mask, i], thresholds[label], weights[:, mask], min_size)
                    for i, label in enumerate(labels)}
            for group, mask in masks.items()}

    for attribute in ("sex", "age"):
        # group comparisons use the subgroups large enough to estimate (a handful of images would decide them)
        masks = {g: m for g, m in groups[attribute].items() if m.sum() >= min_size}
        if len(masks) < 2:
            report["fairness"][attribute] = {"labels": {}, "mean": {}, "note": "fewer than two estimable groups"}
            continue
        known = np.any(np.stack(list(masks.values())), axis=0)
        member = np.full(len(truth), "", dtype=object)
        for group, mask in masks.items():
            member[mask] = group
        per_label = {}
        for i, label in enumerate(labels):
            entries = report["subgroups"][attribute]
            estimable = {g: e[label] for g, e in entries.items() if e[label]["estimable"]}
            accuracy = {g: e["metrics"]["accuracy"]["value"] for g, e in estimable.items()}
            aurocs = {g: e["metrics"]["auroc"]["value"] for g, e in estimable.items()
                      if e["metrics"]["auroc"]["value"] is not None}
            rows = known & np.isfinite(truth[:, i].astype(np.float64))
            y, p, s = truth[rows, i].astype(bool), predicted[rows, i], member[rows]
            per_label[label] = {
                "statistical_parity_difference": statistical_parity(accuracy, {g: e["n"] for g, e in estimable.items()},
                                                                    attribute),
                "demographic_parity_difference": float(demographic_parity_difference(y, p, sensitive_features=s)),
                "equalized_odds_difference": float(equalized_odds_difference(y, p, sensitive_features=s)),
                "auroc_gap": max(aurocs.values()) - min(aurocs.values()) if len(aurocs) >= 2 else None,
                "worst_group_auroc": min(aurocs.values()) if aurocs else None,
                "worst_group": min(aurocs, key=aurocs.get) if aurocs else None,
            }
        report["fairness"][attribute] = {"labels": per_label, "mean": _mean_over_labels(per_label)}

    abnormal, called_normal = (truth == 1).any(axis=1), ~predicted.any(axis=1)
    for attribute, masks in groups.items():
        report["underdiagnosis"][attribute] = {}
        for group, mask in masks.items():
            n_abnormal = int((abnormal & mask).sum())
            rate = float((called_normal & abnormal & mask).sum() / n_abnormal) if n_abnormal else None
            report["underdiagnosis"][attribute][group] = {"abnormal": n_abnormal, "rate": rate}
    return report


def _mean_over_labels(per_label: dict) -> dict:
    """Average each scalar fairness metric over labels; SPD per group likewise."""
    out = {}
    if not per_label:
        return out
    first = next(iter(per_label.values()))
    for name, value in first.items():
        if isinstance(value, dict):
            groups = list(dict.fromkeys(g for m in per_label.values() for g in m[name]))
            out[name] = {g: float(np.mean([m[name][g] for m in per_label.values() if g in m[name]])) for g in groups}
        elif name != "worst_group":
            values = [m[name] for m in per_label.values() if m[name] is not None]
            out[name] = float(np.mean(values)) if values else None
    return out


def fairness_table(report: dict) -> pd.DataFrame:
    """Long table: one row per attribute, group, label and metric, with its interval."""
    rows = []
    for attribute, groups in report["subgroups"].items():
        for group, per_label in groups.items():
            for label, entry in per_label.items():
                base = {"attribute": attribute, "group": group, "label": label, "n": entry["n"],
                        "prevalence": entry["prevalence"]}
                if not entry["estimable"]:
                    rows.append({**base, "metric": "all", "value": None, "note": entry["reason"]})
                    continue
                for name, m in entry["metrics"].items():
                    ci = m["ci95"] or [None, None]
                    rows.append({**base, "metric": name, "value": m["value"], "ci95_low": ci[0],
                                 "ci95_high": ci[1], "note": m.get("reason", "")})
    for attribute, fair in report["fairness"].items():
        for label, metrics in [*fair["labels"].items(), ("mean", fair["mean"])]:
            for name, value in metrics.items():
                if isinstance(value, dict):
                    rows += [{"attribute": attribute, "group": g, "label": label, "metric": name, "value": v}
                             for g, v in value.items()]
                elif name != "worst_group":
                    rows.append({"attribute": attribute, "group": "", "label": label, "metric": name, "value": value})
    for attribute, groups in report["underdiagnosis"].items():
        rows += [{"attribute": attribute, "group": g, "label": "any", "metric": "underdiagnosis_rate",
                  "value": e["rate"], "n": e["abnormal"]} for g, e in groups.items()]
    return pd.DataFrame(rows)
