"""Vectorised bootstrap of classification metrics.

A bootstrap resample of n images is represented by its counts c (c_i = how often image i was drawn,
sum c_i = n), so a metric on the resample is the same metric with image weights c. With a matrix C
of shape [B, n] holding B resamples, every resample is scored at once:

- AUROC (Mann-Whitney): with images sorted by score and grouped into tied scores g,
  AUROC_b = sum_g P_bg (N_b,<g + N_bg / 2) / (P_b N_b), where P_bg and N_bg are the positive and
  negative weights in group g, N_b,<g the negative weight below it, P_b and N_b the totals.
- Metrics at a fixed threshold: confusion counts are C @ indicators, one matrix product.

The resampling unit is the patient by default: images of one patient are correlated (same anatomy,
same scanner, often the same finding), so drawing images independently understates the variance.
Drawing patients with replacement and giving each image its patient's draw count keeps the
correlation inside every resample (a cluster bootstrap).

The same C (same seed) serves every label and every model scored on the same images, which makes
comparisons paired. Intervals are percentile intervals; a resample in which a label has only one
class has no AUROC and is left out of that label's interval (their number is reported). A
proportion with fewer than ``MIN_EVENTS`` events or non-events, or whose percentile interval has
zero width, gets Wilson's score interval instead (the bootstrap cannot see what was never drawn).
Bootstrap p-values are (k + 1) / (B + 1), never 0.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import binomtest

THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1")
MIN_EVENTS = 10  # fewer events (or non-events) than this: a proportion's interval is Wilson's, not the bootstrap's
LEVEL = 0.95


def resample_counts(n: int, resamples: int, seed: int, clusters: np.ndarray | None = None) -> np.ndarray:
    """[resamples, n] draw counts of n images resampled with replacement.

    With ``clusters`` (an integer code per image, e.g. its patient), clusters are drawn with
    replacement and each image gets its cluster's count; without, images are drawn independently.
    """
    codes = np.arange(n) if clusters is None else np.asarray(clusters)
    units = int(codes.max()) + 1 if len(codes) else 0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, units, size=(resamples, units))
    flat = idx + (np.arange(resamples) * units)[:, None]
    # float32 holds every partial sum of counts exactly (integers below 2**24) at half the memory traffic
    counts = np.bincount(flat.ravel(), minlength=resamples * units).reshape(resamples, units).astype(np.float32)
    return counts if clusters is None else counts[:, codes]


def resampling(patient_id, resamples: int, seed: int, unit: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Resample counts for images of ``patient_id`` by ``unit`` (patient | image), the unit of each
    image (an integer code) and their description.

    At least one resample is drawn, so subgroup code can always index it; ``resamples = 0`` means
    no intervals and is recorded as such.
    """
    n = len(patient_id)
    codes = pd.factorize(pd.Series(patient_id).astype(str))[0] if unit == "patient" else np.arange(n)
    weights = resample_counts(n, max(resamples, 1), seed, codes if unit == "patient" else None)
    info = {"resamples": resamples, "seed": seed, "level": LEVEL, "unit": unit,
            "units": int(codes.max()) + 1 if n else 0}
    return weights, codes, info


def p_value(below: np.ndarray, total: int) -> float:
    """(k + 1) / (B + 1) for k of B resamples (or permutations) at least as extreme: never 0."""
    return float((np.count_nonzero(below) + 1) / (total + 1))


def two_sided_p(values: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of 'the statistic is 0' from its resampled values (NaN dropped)."""
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    return min(1.0, 2 * min(p_value(values <= 0, len(values)), p_value(values >= 0, len(values))))


def format_p(p: float | None) -> str:
    """A p-value as a reader should see it: '< 0.001' below 0.001, never 0."""
    if p is None or not np.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


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
    pos, neg = np.where(positive, w, np.float32(0)), np.where(positive, np.float32(0), w)
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    if len(starts) == len(score):  # no ties: every image is its own group
        return pos, neg
    # group sums as differences of running sums (exact: integer weights, partial sums below 2**24);
    # np.add.reduceat along the resample rows is several times slower
    ends = np.r_[starts[1:], len(score)] - 1  # the last image of each group
    return tuple(np.diff(np.cumsum(x, axis=1)[:, ends], axis=1, prepend=np.float32(0)) for x in (pos, neg))


def weighted_auroc(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one label under each row of ``weights`` ([B, n]); NaN where a class is absent.

    Unlabelled images (NaN truth) are left out.
    """
    truth, score, weights = _labelled(truth, score, weights)
    if len(truth) == 0:
        return np.full(len(weights), np.nan)
    pos, neg = _tie_groups(truth, score, weights)
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


def weighted_confusion(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted confusion counts tp, fp, fn, tn ([4, B], float64) of fixed predictions under each row
    of ``weights`` (one matrix product); unlabelled images (NaN truth) are left out."""
    truth, predicted, weights = _labelled(truth, predicted, weights)
    predicted = predicted.astype(bool)
    cells = np.stack([truth & predicted, ~truth & predicted, truth & ~predicted, ~truth & ~predicted], axis=1)
    return (weights @ cells.astype(weights.dtype)).astype(np.float64).T


def weighted_threshold_metrics(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> dict:
    """Accuracy, sensitivity, specificity, precision and F1 of fixed predictions under each row."""
    tp, fp, fn, tn = weighted_confusion(truth, predicted, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"accuracy": (tp + tn) / (tp + fp + fn + tn), "sensitivity": tp / (tp + fn),
                "specificity": tn / (tn + fp), "precision": tp / (tp + fp), "f1": 2 * tp / (2 * tp + fp + fn)}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """Percentile interval of the finite values; None when fewer than 2 are finite."""
    finite = values[np.isfinite(values)]
    if len(finite) < 2:
        return None
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(finite, [tail, 100 - tail])]


def proportion_interval(events: int, trials: int, resampled: np.ndarray, level: float = LEVEL) -> dict:
    """Interval of the proportion events / trials: the bootstrap's percentile interval, or Wilson's
    score interval (scipy) when fewer than ``MIN_EVENTS`` events or non-events were seen or the
    percentile interval has zero width. Returns {"ci95", "ci_method"}."""
    if trials == 0:
        return {"ci95": None, "ci_method": None}
    ci = percentile_interval(resampled, level)
    if ci is None or min(events, trials - events) < MIN_EVENTS or ci[0] == ci[1]:
        wilson = binomtest(int(events), int(trials)).proportion_ci(confidence_level=level, method="wilson")
        return {"ci95": [float(wilson.low), float(wilson.high)], "ci_method": "wilson"}
    return {"ci95": ci, "ci_method": "percentile"}


def bootstrap_label_metrics(truth: np.ndarray, score: np.ndarray, threshold: float,
                            weights: np.ndarray) -> dict[str, np.ndarray]:
    """Resampled AUROC and threshold metrics of one label: name -> [B] values."""
    return {"auroc": weighted_auroc(truth, score, weights),
            **weighted_threshold_metrics(truth, score >= threshold, weights)}


def confusion(truth: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    """Confusion counts of one label's labelled images (NaN truth left out)."""
    counts = weighted_confusion(truth, predicted, np.ones((1, len(truth)), np.float32))[:, 0]
    return dict(zip(("tp", "fp", "fn", "tn"), (int(c) for c in counts)))


def proportion_counts(cells: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(events, trials) of each threshold metric that is a proportion (F1 is not)."""
    tp, fp, fn, tn = cells["tp"], cells["fp"], cells["fn"], cells["tn"]
    return {"accuracy": (tp + tn, tp + fp + fn + tn), "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
            "precision": (tp, tp + fp), "prevalence": (tp + fn, tp + fp + fn + tn)}


def metric_intervals(values: dict[str, np.ndarray], cells: dict[str, int], level: float = LEVEL) -> tuple[dict, dict]:
    """(ci95, ci_method) per metric: proportions by :func:`proportion_interval`, the rest percentile."""
    counts, ci, method = proportion_counts(cells), {}, {}
    for name, resampled in values.items():
        if name in counts:
            entry = proportion_interval(*counts[name], resampled, level)
        else:
            interval = percentile_interval(resampled, level)
            entry = {"ci95": interval, "ci_method": "percentile" if interval else None}
        ci[name], method[name] = entry["ci95"], entry["ci_method"]
    return ci, method


def bootstrap_intervals(truth: np.ndarray, scores: np.ndarray, labels: list[str], thresholds: dict[str, float],
                        weights: np.ndarray, level: float = LEVEL) -> dict:
    """Intervals of every metric per label and of the mean AUROC, under ``weights``
    (:func:`resample_counts`). Thresholds stay fixed (chosen on another split) inside every resample.
    """
    per_label, aurocs = {}, []
    for i, label in enumerate(labels):
        values = bootstrap_label_metrics(truth[:, i], scores[:, i], thresholds[label], weights)
        aurocs.append(values["auroc"])
        ci, method = metric_intervals(values, confusion(truth[:, i], scores[:, i] >= thresholds[label]), level)
        per_label[label] = {"ci95": ci, "ci_method": method,
                            "resamples_without_both_classes": int(np.isnan(values["auroc"]).sum())}
    return {"labels": per_label, "auroc_mean_ci95": percentile_interval(label_mean(aurocs), level)}


def label_mean(values: list[np.ndarray]) -> np.ndarray:
    """Per resample, the mean over labels of the labels' values (NaN labels left out of that resample)."""
    with warnings.catch_warnings():  # a resample where no label is estimable has no mean: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(values), axis=0)
