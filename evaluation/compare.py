"""Paired comparison of two models scored on the same images.

Paired bootstrap: both models are scored under the same resample counts (see ``bootstrap.py``);
for the AUROC difference D = AUROC_A - AUROC_B the interval is the percentile interval of D_b, and
the two-sided p-value is 2 min(P(D_b <= 0), P(D_b >= 0)), capped at 1. The study's one-sided value,
the share of resamples in which A's AUROC is not above B's, is reported beside it.

DeLong's test (DeLong, DeLong & Clarke-Pearson 1988, fast form of Sun & Xu 2014): with midranks,
the placement value of positive i under model k is V_k(i) = (rank of i among all - rank among
positives) / n_neg, and of negative j is W_k(j) = 1 - (rank among all - rank among negatives) / n_pos.
AUROC_k = mean V_k; Cov(AUROC) = S_V / n_pos + S_W / n_neg with S the 2x2 covariance matrices of the
placement values; z = (AUROC_A - AUROC_B) / sqrt(Var_A + Var_B - 2 Cov_AB), two-sided normal p.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata

from evaluation.bootstrap import percentile_interval, weighted_auroc


def delong_test(truth: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict:
    """DeLong's paired test of two correlated AUROCs; None fields when a class is missing."""
    keep = np.isfinite(truth.astype(np.float64))  # unlabelled images are left out
    truth, score_a, score_b = truth[keep], score_a[keep], score_b[keep]
    positive = truth.astype(bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        return {"auroc_a": None, "auroc_b": None, "z": None, "p_value": None, "note": "not estimable"}
    placements_pos, placements_neg, aurocs = [], [], []
    for score in (score_a, score_b):
        rank_all = rankdata(score)
        v = (rank_all[positive] - rankdata(score[positive])) / n
        w = 1.0 - (rank_all[~positive] - rankdata(score[~positive])) / m
        placements_pos.append(v)
        placements_neg.append(w)
        aurocs.append(v.mean())
    cov = np.cov(np.stack(placements_pos)) / m + np.cov(np.stack(placements_neg)) / n
    var_diff = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aurocs[0] - aurocs[1]
    if var_diff <= 1e-15:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = diff / np.sqrt(var_diff)
        p = float(2 * norm.sf(abs(z)))
    return {"auroc_a": float(aurocs[0]), "auroc_b": float(aurocs[1]), "z": float(z), "p_value": p,
            "variance_a": float(cov[0, 0]), "variance_b": float(cov[1, 1]), "covariance": float(cov[0, 1])}


def bootstrap_difference(values_a: np.ndarray, values_b: np.ndarray, point: float, level: float = 0.95) -> dict:
    """Interval and p-values of A - B from paired resampled values (NaN resamples dropped)."""
    diff = values_a - values_b
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return {"difference": point, "ci95": None, "p_value": None, "p_a_not_better": None}
    p_two_sided = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))
    return {"difference": point, "ci95": percentile_interval(diff, level), "p_value": float(p_two_sided),
            "p_a_not_better": float((diff <= 0).mean())}


def paired_auroc_comparison(truth: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, labels: list[str],
                            weights: np.ndarray, level: float = 0.95) -> dict:
    """Per-label and mean AUROC differences A - B with paired bootstrap and DeLong's test."""
    per_label, resampled_a, resampled_b, points_a, points_b = {}, [], [], [], []
    ones = np.ones((1, len(truth)), dtype=weights.dtype)
    for i, label in enumerate(labels):
        a = weighted_auroc(truth[:, i], scores_a[:, i], weights)
        b = weighted_auroc(truth[:, i], scores_b[:, i], weights)
        point_a = float(weighted_auroc(truth[:, i], scores_a[:, i], ones)[0])
        point_b = float(weighted_auroc(truth[:, i], scores_b[:, i], ones)[0])
        resampled_a.append(a)
        resampled_b.append(b)
        points_a.append(point_a)
        points_b.append(point_b)
        per_label[label] = {"auroc_a": point_a, "auroc_b": point_b,
                            "bootstrap": bootstrap_difference(a, b, point_a - point_b, level),
                            "delong": delong_test(truth[:, i], scores_a[:, i], scores_b[:, i])}
    mean_a, mean_b = np.nanmean(np.stack(resampled_a), axis=0), np.nanmean(np.stack(resampled_b), axis=0)
    point = float(np.nanmean(points_a) - np.nanmean(points_b))
    return {"labels": per_label, "auroc_mean_a": float(np.nanmean(points_a)), "auroc_mean_b": float(np.nanmean(points_b)),
            "auroc_mean": bootstrap_difference(mean_a, mean_b, point, level)}
