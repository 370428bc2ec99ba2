"""Paired comparison of two models scored on the same images.

Primary test: the paired bootstrap with the resampling unit of ``evaluation.bootstrap_unit`` (the
patient by default). Both models are scored under the same resample counts (``bootstrap.py``); for
D = AUROC_A - AUROC_B the interval is the percentile interval of D_b and the two-sided p-value is
2 min((k_<=0 + 1), (k_>=0 + 1)) / (B + 1), capped at 1. The primary endpoint is the mean AUROC
difference; the per-label tests are secondary and Holm-adjusted across labels. The study's
one-sided value, the share of resamples in which A's AUROC is not above B's, is reported beside it.

DeLong's test (DeLong, DeLong & Clarke-Pearson 1988, fast form of Sun & Xu 2014): with midranks,
the placement value of positive i under model k is V_k(i) = (rank of i among all - rank among
positives) / n_neg, and of negative j is W_k(j) = 1 - (rank among all - rank among negatives) / n_pos;
AUROC_k = mean V_k. Image-level: Cov(AUROC) = S_V / n_pos + S_W / n_neg with S the 2x2 covariance
matrices of the placement values. Clustered (Obuchowski 1997, images grouped by patient c with m_c
positives, n_c negatives, I patients, M and N images): with V_kc = sum of V_k over c's positives and
W_kc = sum of W_k over c's negatives, a_kc = V_kc - m_c AUROC_k and b_kc = W_kc - n_c AUROC_k,
Cov(AUROC_k, AUROC_l) = I / (I - 1) sum_c [a_kc a_lc / M^2 + b_kc b_lc / N^2 + (a_kc b_lc + b_kc a_lc) / (M N)].
z = (AUROC_A - AUROC_B) / sqrt(Var_A + Var_B - 2 Cov_AB), two-sided normal p. The image-level form
ignores that a patient's images are correlated and is kept only as a reference.

Calibration (:func:`paired_calibration_comparison`): the Brier score and ECE of A minus B per label and
averaged, on the same images under the same resamples, with the percentile interval of the paired
differences. Each model's ECE is in its own equal-mass bins on the data, kept in every resample (as in
``evaluation.calibration``); an ECE is biased up by noise, by about as much for two models on the same
images, so the difference is less biased than either ECE but its interval is approximate (not the
band of a single ECE). These differences are descriptive: intervals only, no p-values, outside the
AUROC endpoints and their Holm family.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata

from evaluation.bootstrap import LEVEL, label_mean, p_value, percentile_interval, two_sided_p, weighted_auroc
from evaluation.calibration import BINNING, PAIRED, brier_ece_resamples


def _placements(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values (V of the positives, W of the negatives) of one model."""
    m, n = int(truth.sum()), int((~truth).sum())
    rank_all = rankdata(score)
    v = (rank_all[truth] - rankdata(score[truth])) / n
    w = 1.0 - (rank_all[~truth] - rankdata(score[~truth])) / m
    return v, w


def delong_test(truth: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                clusters: np.ndarray | None = None) -> dict:
    """DeLong's paired test of two correlated AUROCs, clustered by ``clusters`` (Obuchowski) when
    given, image-level otherwise; None fields when a class has fewer than 2 images."""
    keep = np.isfinite(truth.astype(np.float64))  # unlabelled images are left out
    truth, score_a, score_b = truth[keep].astype(bool), score_a[keep], score_b[keep]
    m, n = int(truth.sum()), int((~truth).sum())
    variance = "image-level (ignores clustering)" if clusters is None else "clustered by patient (Obuchowski 1997)"
    if m < 2 or n < 2:
        return {"auroc_a": None, "auroc_b": None, "z": None, "p_value": None, "variance": variance,
                "note": "not estimable"}
    placements = [_placements(truth, score) for score in (score_a, score_b)]
    aurocs = np.array([v.mean() for v, _ in placements])
    if clusters is None:
        cov = np.cov(np.stack([v for v, _ in placements])) / m + np.cov(np.stack([w for _, w in placements])) / n
    else:
        codes = np.unique(np.asarray(clusters)[keep], return_inverse=True)[1]
        units = int(codes.max()) + 1
        positives = np.bincount(codes[truth], minlength=units)
        negatives = np.bincount(codes[~truth], minlength=units)
        a = np.stack([np.bincount(codes[truth], v, units) - positives * auc for (v, _), auc in zip(placements, aurocs)])
        b = np.stack([np.bincount(codes[~truth], w, units) - negatives * auc for (_, w), auc in zip(placements, aurocs)])
        cross = a @ b.T
        cov = units / (units - 1) * (a @ a.T / m**2 + b @ b.T / n**2 + (cross + cross.T) / (m * n))
    var_diff = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aurocs[0] - aurocs[1]
    if var_diff <= 1e-15:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = diff / np.sqrt(var_diff)
        p = float(2 * norm.sf(abs(z)))
    return {"auroc_a": float(aurocs[0]), "auroc_b": float(aurocs[1]), "z": float(z), "p_value": p,
            "variance_a": float(cov[0, 0]), "variance_b": float(cov[1, 1]), "covariance": float(cov[0, 1]),
            "variance": variance}


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment: the i-th smallest of m p-values becomes
    max_{j <= i} min(1, (m - j + 1) p_(j)); None stays None and does not count."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def bootstrap_difference(values_a: np.ndarray, values_b: np.ndarray, point: float, level: float = LEVEL) -> dict:
    """Interval and p-values of A - B from paired resampled values (NaN resamples dropped)."""
    diff = values_a - values_b
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return {"difference": point, "ci95": None, "p_value": None, "p_a_not_better": None}
    return {"difference": point, "ci95": percentile_interval(diff, level), "p_value": two_sided_p(diff),
            "p_a_not_better": p_value(diff <= 0, len(diff))}


def paired_auroc_comparison(truth: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, labels: list[str],
                            weights: np.ndarray, clusters: np.ndarray | None = None, level: float = LEVEL) -> dict:
    """Mean AUROC difference A - B (primary endpoint) and per-label differences (Holm-adjusted),
    by the paired bootstrap under ``weights``, with DeLong's test (clustered by ``clusters`` when
    given) and its image-level form as a reference."""
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
                            "delong": delong_test(truth[:, i], scores_a[:, i], scores_b[:, i], clusters),
                            "delong_image_level": delong_test(truth[:, i], scores_a[:, i], scores_b[:, i])}
    for entry, adjusted in zip(per_label.values(), holm([e["bootstrap"]["p_value"] for e in per_label.values()])):
        entry["bootstrap"]["p_holm"] = adjusted
    mean_a, mean_b = label_mean(resampled_a), label_mean(resampled_b)
    point = float(np.nanmean(points_a) - np.nanmean(points_b))
    return {"labels": per_label, "auroc_mean_a": float(np.nanmean(points_a)), "auroc_mean_b": float(np.nanmean(points_b)),
            "auroc_mean": bootstrap_difference(mean_a, mean_b, point, level),
            "endpoints": {"primary": "mean AUROC difference A - B (paired bootstrap)",
                          "secondary": "per-label AUROC differences, p-values Holm-adjusted across "
                                       f"{len(labels)} labels (p_holm); DeLong's p-values are unadjusted references"}}


def paired_calibration_comparison(truth: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, labels: list[str],
                                  weights: np.ndarray, bins: int = 10, min_positives: int = 10,
                                  min_negatives: int = 10, level: float = LEVEL) -> dict:
    """Brier score and ECE of A minus B, per label and averaged over labels, paired under ``weights``
    (module doc); labels are estimable as in ``evaluation.calibration.calibration_report``.

    {"bins", "binning", "ci_method", "note", "labels": {label: {name: entry}}, "mean": {name: entry}} with
    entry = {"a", "b", "difference", "ci95"}, or these None and "reason": "not estimable: ...".
    """
    a, b = (brier_ece_resamples(truth, scores, labels, weights, bins, min_positives, min_negatives)
            for scores in (scores_a, scores_b))

    def difference(ea: dict, eb: dict) -> dict:
        if "reason" in ea or "reason" in eb:
            return {"a": None, "b": None, "difference": None, "ci95": None, "reason": ea.get("reason", eb.get("reason"))}
        return {"a": ea["value"], "b": eb["value"], "difference": ea["value"] - eb["value"],
                "ci95": percentile_interval(ea["resamples"] - eb["resamples"], level)}

    return {"bins": bins, "binning": BINNING, "ci_method": "percentile of the paired differences",
            "note": "descriptive: intervals only, no p-values (not among the AUROC endpoints); ECE in each model's "
                    "own bins, its difference's interval approximate",
            "labels": {label: {name: difference(a["labels"][label][name], b["labels"][label][name]) for name in PAIRED}
                       for label in labels},
            "mean": {name: difference(a["mean"][name], b["mean"][name]) for name in PAIRED}}
