"""Vectorised bootstrap of classification metrics.

A bootstrap resample of n images is represented by its counts c (c_i = how often image i was drawn,
sum c_i = n), so a metric on the resample is the same metric with image weights c. With a matrix C
of shape [B, n] holding B resamples, every resample is scored at once:

- AUROC (Mann-Whitney): with images sorted by score and grouped into tied scores g,
  AUROC_b = sum_g P_bg (N_b,<g + N_bg / 2) / (P_b N_b), where P_bg and N_bg are the positive and
  negative weights in group g, N_b,<g the negative weight below it, P_b and N_b the totals.
- Metrics at a fixed threshold: confusion counts are C @ indicators, one matrix product.

The same C (same seed) serves every label and every model scored on the same images, which makes
comparisons paired. Intervals are percentile intervals; a resample in which a label has only one
class has no AUROC and is left out of that label's interval (their number is reported).
"""
from __future__ import annotations

import warnings

import numpy as np

THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1")


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] draw counts of images resampled with replacement (patient-agnostic)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    flat = idx + (np.arange(resamples) * n)[:, None]
    # float32 holds every partial sum of counts exactly (integers below 2**24) at half the memory traffic
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float32)


def _labelled(truth: np.ndarray, score: np.ndarray, weights: np.ndarray):
    """Drop unlabelled images (NaN truth) of one label."""
    keep = np.isfinite(truth.astype(np.float64))
    if keep.all():
        return truth.astype(bool), score, weights
    return truth[keep].astype(bool), score[keep], weights[:, keep]


def _tie_groups(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight [B, G] of each group of tied scores, in increasing score order."""
    order = np.argsort(score, kind="stable")
    sorted_score, positive = score[order], truth[order].astype(bool)
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    pos = np.add.reduceat(np.where(positive, w, np.float32(0)), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, np.float32(0), w), starts, axis=1)
    return pos, neg


def weighted_auroc(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one label under each row of ``weights`` ([B, n]); NaN where a class is absent.

    Unlabelled images (NaN truth) are left out.
    """
    pos, neg = _tie_groups(*_labelled(truth, score, weights))
    below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # each product is exact in float32; their sum can pass 2**24 and is accumulated in float64
        auc = (pos * (below + 0.5 * neg)).sum(axis=1, dtype=np.float64) / (
            total_pos.astype(np.float64) * total_neg.astype(np.float64))
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def weighted_tpr_at_fpr(truth: np.ndarray, score: np.ndarray, weights: np.ndarray, fpr: float) -> np.ndarray:
    """Largest TPR over thresholds ``score >= t`` whose FPR is at most ``fpr``, under each row of
    ``weights``; NaN where a class is absent. (The low-FPR operating point of a membership attack.)"""
    pos, neg = _tie_groups(truth.astype(bool), score, weights)
    tp = np.cumsum(pos[:, ::-1], axis=1, dtype=np.float64)  # at each threshold, from the highest score down
    fp = np.cumsum(neg[:, ::-1], axis=1, dtype=np.float64)
    total_pos, total_neg = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(fp <= fpr * total_neg, tp / total_pos, 0.0).max(axis=1)
    tpr[(total_pos[:, 0] == 0) | (total_neg[:, 0] == 0)] = np.nan
    return tpr


def weighted_threshold_metrics(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> dict:
    """Accuracy, sensitivity, specificity, precision and F1 of fixed predictions under each row."""
    truth, predicted, weights = _labelled(truth, predicted, weights)
    predicted = predicted.astype(bool)
    cells = np.stack([truth & predicted, ~truth & predicted, truth & ~predicted, ~truth & ~predicted], axis=1)
    tp, fp, fn, tn = (weights @ cells.astype(weights.dtype)).astype(np.float64).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"accuracy": (tp + tn) / (tp + fp + fn + tn), "sensitivity": tp / (tp + fn),
                "specificity": tn / (tn + fp), "precision": tp / (tp + fp), "f1": 2 * tp / (2 * tp + fp + fn)}


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of the finite values; None when fewer than 2 are finite."""
    finite = values[np.isfinite(values)]
    if len(finite) < 2:
        return None
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(finite, [tail, 100 - tail])]


def bootstrap_label_metrics(truth: np.ndarray, score: np.ndarray, threshold: float,
                            weights: np.ndarray) -> dict[str, np.ndarray]:
    """Resampled AUROC and threshold metrics of one label: name -> [B] values."""
    return {"auroc": weighted_auroc(truth, score, weights),
            **weighted_threshold_metrics(truth, score >= threshold, weights)}


def bootstrap_intervals(truth: np.ndarray, scores: np.ndarray, labels: list[str], thresholds: dict[str, float],
                        weights: np.ndarray, level: float = 0.95) -> dict:
    """Percentile intervals of every metric per label and of the mean AUROC, under ``weights``
    (:func:`resample_counts`). Thresholds stay fixed (chosen on another split) inside every resample.
    """
    per_label, aurocs = {}, []
    for i, label in enumerate(labels):
        values = bootstrap_label_metrics(truth[:, i], scores[:, i], thresholds[label], weights)
        aurocs.append(values["auroc"])
        per_label[label] = {"ci95": {name: percentile_interval(v, level) for name, v in values.items()},
                            "resamples_without_both_classes": int(np.isnan(values["auroc"]).sum())}
    with warnings.catch_warnings():  # a resample where no label is estimable has no mean: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.stack(aurocs), axis=0)
    return {"labels": per_label, "auroc_mean_ci95": percentile_interval(mean, level)}
