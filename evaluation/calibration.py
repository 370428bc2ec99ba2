"""Calibration of per-label probabilities, recalibration and decision curves, with bootstrap intervals.

For one label, images i with outcome y_i in {0, 1} (unlabelled images, NaN truth, left out) and score
p_i, under image weights c_i (a bootstrap resample's draw counts, :mod:`evaluation.bootstrap`; all 1 on
the data), with N = sum c_i:

- Brier score  sum c_i (p_i - y_i)^2 / N (0 = perfect; scikit-learn's ``brier_score_loss``).
- ECE (expected calibration error) over K equal-mass bins: e_k = sum_{i in k} c_i (p_i - y_i) / N, the
  bin's share times its mean predicted minus observed, and ECE = sum_k |e_k|. The bin edges are the
  0, 1/K, ..., 1 quantiles of the label's scores on the data (``np.percentile``, linear), an image goes
  to bin ``searchsorted(interior edges, p)`` (an image on an edge to the lower bin): scikit-learn's
  ``calibration_curve(strategy="quantile")``. Tied scores can leave bins empty (they are skipped).
  Resamples keep the data's edges (each image keeps its bin, as thresholds stay fixed): the interval
  is conditional on the binning.
- Observed/expected ratio O/E = sum c_i y_i / sum c_i p_i (1 = calibrated in the large; > 1 the model
  under-predicts).
- Calibration intercept a: the logistic fit logit P(y = 1) = a + logit(p) (offset, slope fixed at 1);
  0 = calibrated in the large. Calibration slope b: the fit logit P(y = 1) = a' + b logit(p); 1 = the
  spread of the scores is right, < 1 over-confident (too extreme), > 1 under-confident (Van Calster et
  al., J Clin Epidemiol 2016; Steyerberg, Clinical Prediction Models). Both are weighted maximum
  likelihood, by Newton-Raphson on every resample at once (started from the data's estimate, a few
  steps); a resample without both classes, whose classes the scores separate or whose fit does not
  converge in ``MAX_NEWTON`` steps has no fit and is left out of the interval (counted). Before the
  logit of a fit, p is clipped to [CLIP, 1 - CLIP] with CLIP = 1e-7, about float32's resolution below 1
  (2^-24 = 6e-8): a float32 sigmoid returns exactly 1 above a logit of about 16.6. The logit
  entering a fit is thus within +-16.1; only scores beyond it move (1.0 ties with the largest float32
  below it). Brier, ECE and O/E use the scores unclipped.

Intervals: percentile for the Brier score, O/E, intercept and slope. ECE is a sum of absolute values:
biased up and never below its noise, so its percentile interval cannot contain a true ECE of 0. It
gets a band instead, as the fairness gaps do: with c the 95% quantile over resamples of
sum_k |e_k,b - e_k| (the L1 deviation of the resample's bin errors from the data's), |ECE - true ECE|
<= sum_k |e_k - true e_k| gives [max(0, ECE - c), min(1, ECE + c)], which reaches 0 when the model is
calibrated (about 95% of the time) and is conservative (wider than needed) when it is not. The mean
over labels is taken per resample over the labels where a metric is estimable (the mean ECE's band:
the mean of the labels' band statistics). A label with fewer than ``min_positives`` positive or
``min_negatives`` negative images is not estimable, with the reason; its ECE also needs at least as
many labelled images as bins.

Recalibration, fitted on the validation split only, maps p to a probability by a strictly increasing
function of logit(p) (AUROC and the ranking are unchanged): temperature scaling expit(logit(p) / T)
(one parameter: a logistic fit without intercept, T = 1 / coefficient) or Platt scaling
expit(a logit(p) + b). A fit whose slope is not positive (the scores rank no better than chance on
the validation split), that has no finite maximum (the classes are separated) or a label with too few
positives or negatives keeps the identity, with the reason. The map is fixed when recalibrated scores
are evaluated (as thresholds are): their intervals leave out the map's own validation-split noise.
Training fits it whenever best.pt is written (``evaluation.recalibration``, :func:`stored_map`) and
``predict --calibrated`` applies it, with the decision thresholds mapped alike (:func:`map_thresholds`).

Subgroups (sex, age bins; :func:`subgroup_calibration`): per group, calibration-in-the-large (mean
predicted minus observed fraction), O/E and ECE in the label's bins; across groups, the gaps of the
first and of ECE (highest minus lowest group) with :mod:`evaluation.fairness`'s simultaneous band and
permutation p-value, from its own resample and permutation machinery.

Decision curves (Vickers & Elkin, Med Decis Making 2006): treating the images with p >= pt, the net
benefit is TP/n - FP/n * pt / (1 - pt); treat-all has prevalence - (1 - prevalence) pt / (1 - pt),
treat-none 0. Percentile intervals of the model's net benefit and of its difference to treat-all, per
threshold probability, from the same resamples (paired).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.special import expit, logit
from scipy.stats import binomtest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from config import InputError
from evaluation.bootstrap import LEVEL, _labelled, label_mean, percentile_interval
from evaluation.fairness import _entry, _mean_over_labels, _null, _spread, _Worlds, group_names, groups_of

CLIP = 1e-7  # probabilities are clipped to [CLIP, 1 - CLIP] before the logit of a fit
MAX_NEWTON = 50  # Newton-Raphson steps before a fit is declared not converged
MAX_STEP = 5.0  # the largest change of a parameter (logit scale) in one step
TOLERANCE = 1e-9  # converged when no parameter changes by more than this (float64 weights)
TOLERANCE32 = 1e-5  # the same for float32 weights (resample counts): their sums carry about 1e-7 relative error
SEARCH_ABOVE = 0.1  # a Newton step moving a parameter by more than this is checked (and halved if it overshoots)
CHUNK = 2**21  # resample rows x images held at once by a fit (float64 temporaries of 16 MiB)
METRICS = ("brier", "ece", "observed_expected", "intercept", "slope")
PAIRED = ("brier", "ece")  # the calibration differences of compare and sweep
DECISION_THRESHOLDS = tuple(round(t / 100, 2) for t in range(1, 100))
BAND = "simultaneous bootstrap band (conservative)"
BINNING = ("equal-mass bins: edges at the 0, 1/K, ..., 1 quantiles of the label's scores on the data "
           "(scikit-learn's calibration_curve, strategy='quantile'); resamples keep these edges; "
           "tied scores can leave a bin empty")
DEFINITIONS = {
    "brier": "mean squared difference between score and outcome (0 = perfect)",
    "ece": "expected calibration error: sum over equal-mass bins of the bin's share times |mean predicted - "
           "observed fraction| (0 = calibrated)",
    "observed_expected": "observed positives / sum of predicted probabilities (1 = calibrated in the large, "
                         "> 1 = under-predicts)",
    "intercept": "a in logit P(y=1) = a + logit(p), slope fixed at 1 (0 = calibrated in the large, "
                 "> 0 = under-predicts)",
    "slope": "b in logit P(y=1) = a + b logit(p) (1 = calibrated spread, < 1 = over-confident, "
             "> 1 = under-confident)",
}
DECISION_DEFINITION = ("net benefit of treating the images with score >= pt: TP/n - FP/n * pt / (1 - pt) "
                       "(Vickers & Elkin 2006); treat-all: prevalence - (1 - prevalence) pt / (1 - pt); "
                       "treat-none: 0")


def check_bins(bins, n: int, what: str = "scored images") -> int:
    """``bins`` as a count of calibration bins for ``n`` images; InputError naming the parameter."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise InputError(f"calibration bins (evaluation.calibration_bins) = {bins!r}: at least 2 are needed")
    if bins > n:
        raise InputError(f"calibration bins (evaluation.calibration_bins) = {bins} is more than the {n} {what}: "
                         f"an equal-mass bin needs at least one image; use at most {n}")
    return int(bins)


def check_thresholds(thresholds) -> np.ndarray:
    """Decision-curve threshold probabilities as an increasing array inside (0, 1); InputError otherwise."""
    values = np.asarray(thresholds, dtype=np.float64).ravel()
    if not len(values) or not np.isfinite(values).all() or (values <= 0).any() or (values >= 1).any():
        raise InputError(f"decision-curve thresholds (evaluation.decision_thresholds) = {list(values)}: need "
                         f"one or more threshold probabilities strictly between 0 and 1")
    return np.unique(values)


def clipped_logit(p: np.ndarray) -> np.ndarray:
    """logit(p) with p clipped to [CLIP, 1 - CLIP] (float64)."""
    return logit(np.clip(np.asarray(p, dtype=np.float64), CLIP, 1 - CLIP))


def bin_ids(score: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges [bins + 1], bin of each score) of equal-mass bins on ``score`` (scikit-learn's quantile binning)."""
    edges = np.percentile(score, np.linspace(0, 100, bins + 1))
    return edges, np.searchsorted(edges[1:-1], score)


def logistic_fit(y: np.ndarray, x: np.ndarray, weights: np.ndarray, slope: bool,
                 start: np.ndarray | None = None) -> np.ndarray:
    """Weighted maximum-likelihood logistic fit under each row of ``weights`` ([B, n]): with ``slope``,
    (a, b) [B, 2] of logit P(y = 1) = a + b x; without, a [B, 1] of logit P(y = 1) = a + x (offset x).

    Newton-Raphson on all rows at once from ``start`` (default a = 0, b = 1), each step at most
    ``MAX_STEP`` per parameter; a step larger than ``SEARCH_ABOVE`` is halved until the log-likelihood
    does not fall (from a poor start a full Newton step can overshoot and oscillate). Converged when a
    step moves no parameter by more than ``TOLERANCE``; NaN for a row without both classes or not
    converged in ``MAX_NEWTON`` steps (with a slope, classes separated by x have no finite fit and never
    converge). Float32 weights (resample counts) are fitted in float32, to about 1e-6 (``TOLERANCE32``:
    the exponentials dominate and are 9x faster), float64 weights to ``TOLERANCE``.
    """
    dtype = np.float32 if weights.dtype == np.float32 else np.float64
    tolerance = TOLERANCE32 if dtype == np.float32 else TOLERANCE
    y, x = y.astype(dtype), x.astype(dtype)
    k = 2 if slope else 1
    start = np.array([0.0, 1.0][:k] if start is None else start, dtype=np.float64)
    out = np.full((len(weights), k), np.nan)
    rows = max(1, CHUNK // max(len(x), 1))

    def linear(theta: np.ndarray) -> np.ndarray:
        theta = theta.astype(dtype)
        return theta[:, :1] + (theta[:, 1:] * x if slope else x)

    def loglik(c: np.ndarray, eta: np.ndarray) -> np.ndarray:
        return (c * (y * eta - np.logaddexp(dtype(0), eta))).sum(axis=1, dtype=np.float64)

    for lo in range(0, len(weights), rows):
        c = weights[lo:lo + rows].astype(dtype, copy=False)
        cy, cyx, total = ((c @ v).astype(np.float64) for v in (y, y * x, np.ones_like(x)))
        theta = np.tile(start, (len(c), 1))
        done = np.zeros(len(c), bool)
        active = np.flatnonzero((cy > 0) & (cy < total))  # both classes present
        for _ in range(MAX_NEWTON):
            if not len(active):
                break
            ca, th = c[active], theta[active]
            mu = expit(linear(th))
            cm = ca * mu
            cw = cm * (1 - mu)
            g0, h00 = cy[active] - cm.sum(axis=1, dtype=np.float64), cw.sum(axis=1, dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                if slope:
                    g1 = cyx[active] - (cm @ x).astype(np.float64)
                    h01, h11 = (cw @ x).astype(np.float64), (cw @ (x * x)).astype(np.float64)
                    det = h00 * h11 - h01 * h01
                    step = np.stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det], axis=1)
                else:
                    step = (g0 / h00)[:, None]
                size = np.abs(step).max(axis=1)
                step *= np.minimum(1.0, MAX_STEP / size)[:, None]
            finite = np.isfinite(size)
            converged = finite & (size < tolerance)
            trial = th + step
            search = np.flatnonzero(finite & (size > SEARCH_ABOVE))
            if len(search):
                current = loglik(ca[search], linear(th[search]))
                for _ in range(30):  # halve the steps of the rows whose log-likelihood would fall
                    fell = loglik(ca[search], linear(trial[search])) < current - 1e-12 * np.abs(current)
                    search, current = search[fell], current[fell]
                    if not len(search):
                        break
                    step[search] /= 2
                    trial[search] = th[search] + step[search]
            theta[active[finite]] = trial[finite]
            done[active[converged]] = True
            active = active[finite & ~converged]
        theta[~done] = np.nan
        out[lo:lo + rows] = theta
    return out


def _interval(point: float, resampled: np.ndarray, level: float = LEVEL) -> dict:
    ci = percentile_interval(resampled, level)
    return {"value": float(point), "ci95": ci, "ci_method": "percentile" if ci else None}


def _band(point: float, band: np.ndarray, level: float = LEVEL) -> dict:
    """[point - c, point + c] within [0, 1], c the ``level`` quantile of the band statistic."""
    finite = band[np.isfinite(band)]
    if len(finite) < 2:
        return {"value": float(point), "ci95": None, "ci_method": None}
    c = float(np.quantile(finite, level))
    return {"value": float(point), "ci95": [max(0.0, point - c), min(1.0, point + c)], "ci_method": BAND}


def _not_estimable(reason: str) -> dict:
    return {"value": None, "ci95": None, "ci_method": None, "reason": f"not estimable: {reason}"}


def _values(y: np.ndarray, p: np.ndarray, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, bins: int,
            start: dict | None = None, fits: bool = True) -> dict[str, np.ndarray]:
    """Every metric of one label's labelled images (outcome y, score p, x = clipped logit(p), bin ids)
    under each row of ``weights``: name -> [B], with 'errors' [B, bins] (the e_k of the ECE), 'fit'
    [B, 2] (a', b of the slope fit) and 'offset_fit' [B, 1] (a of the intercept fit). Sums are one
    matrix product in the weights' dtype (float32 is exact for resample counts; pass float64 ones for
    the data). ``start``: the fits' starting values ('offset_fit', 'fit'). Without ``fits``, only the
    Brier score, ECE and O/E (the logistic fits are most of the cost)."""
    columns = np.zeros((len(p), 3 + bins), dtype=weights.dtype)
    columns[:, 0], columns[:, 1], columns[:, 2] = y, p, (p - y) ** 2
    columns[np.arange(len(p)), 3 + ids] = p - y
    sums = (weights @ columns).astype(np.float64)
    total = weights.sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        errors = sums[:, 3:] / total[:, None]
        values = {"brier": sums[:, 2] / total, "ece": np.abs(errors).sum(axis=1),
                  "observed_expected": sums[:, 0] / sums[:, 1], "errors": errors}
    if not fits:
        return values
    start = start or {}
    intercept = logistic_fit(y, x, weights, slope=False, start=start.get("offset_fit"))
    fit = logistic_fit(y, x, weights, slope=True, start=start.get("fit"))
    return {**values, "intercept": intercept[:, 0], "slope": fit[:, 1], "offset_fit": intercept, "fit": fit}


def label_calibration(truth: np.ndarray, score: np.ndarray, weights: np.ndarray, bins: int,
                      fits: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(data, resamples) of one label, labelled images only: name -> [1] and [B] values of every
    metric (:func:`_values`, without ``fits`` the Brier score, ECE and O/E only); the resamples add
    'ece_band', sum_k |e_k,b - e_k|. Bins are the data's."""
    y, p, w = _labelled(truth, score, weights)
    y, p = y.astype(np.float64), p.astype(np.float64)
    x = clipped_logit(p)
    _, ids = bin_ids(p, bins)
    point = _values(y, p, x, ids, np.ones((1, len(p))), bins, fits=fits)
    start = {key: point[key][0] for key in ("offset_fit", "fit") if fits and np.isfinite(point[key][0]).all()}
    boot = _values(y, p, x, ids, w, bins, start, fits)
    boot["ece_band"] = np.abs(boot["errors"] - point["errors"]).sum(axis=1)
    return point, boot


def _too_few(n: int, positives: int, min_positives: int, min_negatives: int) -> str | None:
    """Why a label of ``n`` labelled images, ``positives`` of them positive, has no calibration (None: it has)."""
    if positives < min_positives or n - positives < min_negatives:
        return f"{positives} positive / {n - positives} negative images (needs {min_positives} / {min_negatives})"
    return None


def _why_missing(name: str) -> str:
    if name in ("intercept", "slope"):
        return "no finite logistic fit (the scores separate the classes)"
    return "no predicted probability above 0" if name == "observed_expected" else "no labelled image"


def _missing(name: str, value: float, n: int, bins: int) -> str | None:
    """Why metric ``name`` of a label with enough positives and negatives is not estimable (None: it is)."""
    if name == "ece" and n < bins:
        return f"{n} labelled images < {bins} calibration bins"
    return None if np.isfinite(value) else _why_missing(name)


def calibration_report(truth: np.ndarray, scores: np.ndarray, labels: list[str], weights: np.ndarray,
                       bins: int = 10, min_positives: int = 10, min_negatives: int = 10,
                       level: float = LEVEL) -> dict:
    """Calibration per label and averaged over labels, with intervals under ``weights`` (the split's
    resample counts, [B, n]), and each label's reliability bins (see the module doc).

    {"bins", "binning", "clip", "min_positives", "min_negatives", "definitions",
     "labels": {label: {"n", "positives", "metrics": {metric: entry}, "resamples_without_fit":
                        {"intercept": k, "slope": k}, "reliability": reliability_bins(...) or None}},
     "mean": {metric: {**entry, "labels": number of labels averaged}}}
    with entry = {"value", "ci95", "ci_method"}, or value None and "reason": "not estimable: ...".
    """
    bins = check_bins(bins, len(truth))
    truth = np.asarray(truth, dtype=np.float64)
    report = {"bins": bins, "binning": BINNING, "clip": CLIP, "min_positives": min_positives,
              "min_negatives": min_negatives, "definitions": DEFINITIONS, "labels": {}, "mean": {}}
    estimable = {}  # label -> (point, resampled) of the labels that have metrics
    for i, label in enumerate(labels):
        known = np.isfinite(truth[:, i])
        n, positives = int(known.sum()), int(truth[known, i].sum())
        entry = {"n": n, "positives": positives,
                 "reliability": reliability_bins(truth[:, i], scores[:, i], bins, level) if n >= bins else None}
        report["labels"][label] = entry
        reason = _too_few(n, positives, min_positives, min_negatives)
        if reason:
            entry["metrics"] = {name: _not_estimable(reason) for name in METRICS}
            continue
        point, boot = label_calibration(truth[:, i], scores[:, i], weights, bins)
        metrics = {}
        for name in METRICS:
            value = float(point[name][0])
            reason = _missing(name, value, n, bins)
            if reason:
                metrics[name] = _not_estimable(reason)
            else:
                metrics[name] = _band(value, boot["ece_band"], level) if name == "ece" else _interval(
                    value, boot[name], level)
        entry["metrics"] = metrics
        entry["resamples_without_fit"] = {name: int(np.isnan(boot[name]).sum()) for name in ("intercept", "slope")}
        estimable[label] = (point, boot)
    for name in METRICS:
        having = [label for label in estimable if report["labels"][label]["metrics"][name]["value"] is not None]
        if not having:
            report["mean"][name] = {**_not_estimable("no label is estimable"), "labels": 0}
            continue
        value = float(np.mean([estimable[label][0][name][0] for label in having]))
        if name == "ece":
            entry = _band(value, label_mean([estimable[label][1]["ece_band"] for label in having]), level)
        else:
            entry = _interval(value, label_mean([estimable[label][1][name] for label in having]), level)
        report["mean"][name] = {**entry, "labels": len(having)}
    return report


def brier_ece_resamples(truth: np.ndarray, scores: np.ndarray, labels: list[str], weights: np.ndarray,
                        bins: int = 10, min_positives: int = 10, min_negatives: int = 10) -> dict:
    """The Brier score and ECE (``PAIRED``) of each label and their mean over labels, on the data and
    under each row of ``weights``: :func:`calibration_report`'s values and estimable labels (ECE in each
    label's equal-mass bins on the data, kept in every resample), without its logistic fits. What
    ``compare`` and ``sweep`` difference between models scored on the same images and resamples.

    {"labels": {label: {name: entry}}, "mean": {name: entry}}, entry = {"value": float, "resamples": [B]}
    or {"reason": "not estimable: ..."}; the mean is over the labels where the metric is estimable.
    """
    bins = check_bins(bins, len(truth))
    truth = np.asarray(truth, dtype=np.float64)
    out = {"labels": {}, "mean": {}}
    for i, label in enumerate(labels):
        known = np.isfinite(truth[:, i])
        n, positives = int(known.sum()), int(truth[known, i].sum())
        too_few = _too_few(n, positives, min_positives, min_negatives)
        point, boot = label_calibration(truth[:, i], scores[:, i], weights, bins, fits=False) if not too_few else ({}, {})
        out["labels"][label] = {}
        for name in PAIRED:
            reason = too_few or _missing(name, float(point[name][0]), n, bins)
            out["labels"][label][name] = ({"reason": f"not estimable: {reason}"} if reason else
                                          {"value": float(point[name][0]), "resamples": boot[name]})
    for name in PAIRED:
        having = [e[name] for e in out["labels"].values() if "value" in e[name]]
        out["mean"][name] = ({"value": float(np.mean([e["value"] for e in having])),
                              "resamples": label_mean([e["resamples"] for e in having])} if having
                             else {"reason": "not estimable: no label is estimable"})
    return out


def reliability_bins(truth: np.ndarray, score: np.ndarray, bins: int, level: float = LEVEL) -> dict:
    """What a reliability diagram draws for one label (unlabelled images left out): per non-empty
    equal-mass bin (:func:`bin_ids`), its score range, image and positive counts, mean predicted
    probability and observed fraction of positives with Wilson's score interval (scipy).

    {"binning": "equal-mass", "requested_bins", "empty_bins", "edges": [bins + 1],
     "bins": [{"lower", "upper", "n", "positives", "mean_predicted", "observed", "observed_ci95",
               "ci_method": "wilson"}]}
    """
    y, p, _ = _labelled(np.asarray(truth), np.asarray(score, dtype=np.float64), np.ones((1, len(truth))))
    bins = check_bins(bins, len(p), "labelled images")
    edges, ids = bin_ids(p, bins)
    count = np.bincount(ids, minlength=bins)
    positives = np.bincount(ids, weights=y, minlength=bins).round().astype(int)
    predicted = np.bincount(ids, weights=p, minlength=bins)
    rows = []
    for k in np.flatnonzero(count):
        wilson = binomtest(int(positives[k]), int(count[k])).proportion_ci(confidence_level=level, method="wilson")
        rows.append({"lower": float(edges[k]), "upper": float(edges[k + 1]), "n": int(count[k]),
                     "positives": int(positives[k]), "mean_predicted": float(predicted[k] / count[k]),
                     "observed": float(positives[k] / count[k]),
                     "observed_ci95": [float(wilson.low), float(wilson.high)], "ci_method": "wilson"})
    return {"binning": "equal-mass", "requested_bins": bins, "empty_bins": int((count == 0).sum()),
            "edges": [float(e) for e in edges], "bins": rows}


def decision_curve(truth: np.ndarray, score: np.ndarray, thresholds, weights: np.ndarray,
                   level: float = LEVEL) -> dict:
    """Net benefit of one label's scores, of treat-all and of treat-none (0) at each threshold
    probability (``None``: 0.01, 0.02, ..., 0.99), with percentile intervals of the model's net benefit,
    of treat-all's and of model minus treat-all under ``weights`` (unlabelled images left out).

    {"definition", "thresholds": [T], "n", "positives", "prevalence", "treat_none": 0.0,
     "ci_method": "percentile", "model" | "treat_all" | "model_minus_treat_all":
     {"value": [T], "ci95": [T x [low, high] or None]}}
    """
    t = check_thresholds(DECISION_THRESHOLDS if thresholds is None else thresholds)
    y, p, w = _labelled(np.asarray(truth), np.asarray(score), weights)
    out = {"definition": DECISION_DEFINITION, "thresholds": [float(v) for v in t], "n": len(y),
           "positives": int(y.sum()), "prevalence": float(y.mean()) if len(y) else None, "treat_none": 0.0}
    if not len(y):
        return {**out, **_not_estimable("no labelled image")}
    treated = p[:, None] >= t[None, :]
    cells = np.concatenate([treated & y[:, None], treated & ~y[:, None], y[:, None]], axis=1)
    odds = t / (1 - t)

    def curves(weights: np.ndarray) -> dict[str, np.ndarray]:
        counts = (weights @ cells.astype(weights.dtype)).astype(np.float64)
        total = weights.sum(axis=1, dtype=np.float64)[:, None]
        tp, fp, positives = counts[:, :len(t)], counts[:, len(t):-1], counts[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            model = (tp - fp * odds) / total
            treat_all = (positives - (total - positives) * odds) / total
        return {"model": model, "treat_all": treat_all, "model_minus_treat_all": model - treat_all}

    point, boot = curves(np.ones((1, len(y)))), curves(w)
    out["ci_method"] = "percentile"
    for name, values in point.items():
        out[name] = {"value": [float(v) for v in values[0]],
                     "ci95": [percentile_interval(column, level) for column in boot[name].T]}
    return out


def _no_fit(reason: str) -> dict:
    return {"method": "identity", "reason": f"not fitted: {reason}"}


def fit_recalibration(truth: np.ndarray, scores: np.ndarray, labels: list[str], method: str = "temperature",
                      min_positives: int = 10, min_negatives: int = 10) -> dict[str, dict]:
    """A recalibration map per label, fitted on the images given (the validation split only; unlabelled
    images left out) by maximum likelihood on x = logit(p) (p clipped to [CLIP, 1 - CLIP]) with
    scikit-learn's unpenalised logistic regression:

    - temperature: logit P(y = 1) = x / T (no intercept) -> {"method": "temperature", "temperature": T};
    - platt: logit P(y = 1) = a x + b -> {"method": "platt", "a": a, "b": b};
    - {"method": "identity", "reason": "not fitted: ..."} when the label has too few positives or
      negatives, the scores separate the classes (no finite fit) or the fitted slope is not positive
      (a decreasing map would reverse the ranking).
    """
    if method not in ("temperature", "platt"):
        raise InputError(f"recalibration method {method!r}: use 'temperature' or 'platt'")
    truth = np.asarray(truth, dtype=np.float64)
    maps = {}
    for i, label in enumerate(labels):
        known = np.isfinite(truth[:, i])
        y, x = truth[known, i].astype(bool), clipped_logit(scores[known, i])
        n, positives = len(y), int(y.sum())
        if positives < min_positives or n - positives < min_negatives:
            maps[label] = _no_fit(f"{positives} positive / {n - positives} negative images "
                                  f"(needs {min_positives} / {min_negatives})")
            continue
        separated = (x[~y].max() < x[y].min() if method == "platt" else
                     (x[y] > 0).all() and (x[~y] < 0).all())
        if separated:
            maps[label] = _no_fit("the scores separate the classes" + (
                "" if method == "platt" else " at 0.5") + ": no finite maximum-likelihood fit")
            continue
        model = LogisticRegression(C=np.inf, fit_intercept=method == "platt", tol=1e-10, max_iter=10_000)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                model.fit(x[:, None], y)
            except ConvergenceWarning:
                maps[label] = _no_fit("the logistic fit did not converge (classes nearly separated)")
                continue
        a, b = float(model.coef_[0, 0]), float(model.intercept_[0]) if method == "platt" else 0.0
        if not a > 0:
            maps[label] = _no_fit(f"fitted slope {a:.3g} <= 0: the scores rank the images no better than chance, "
                                  f"and a decreasing map would reverse the ranking")
        elif method == "temperature":
            maps[label] = {"method": "temperature", "temperature": 1 / a}
        else:
            maps[label] = {"method": "platt", "a": a, "b": b}
    return maps


def apply_recalibration(scores: np.ndarray, labels: list[str], maps: dict[str, dict]) -> np.ndarray:
    """Scores [n, labels] mapped by each label's recalibration map (float64). The logit is not clipped
    here (0 and 1 stay 0 and 1), so the map is strictly increasing and keeps every ranking (in float64,
    two distinct scores can only tie where the map sends both within about 1e-16 of 1). ValueError for
    a missing or unknown map, or one that is not increasing (T <= 0, a <= 0)."""
    out = np.array(scores, dtype=np.float64)
    for i, label in enumerate(labels):
        if label not in maps:
            raise ValueError(f"no recalibration map for label {label!r}")
        m = maps[label]
        method = m.get("method")
        if method == "identity":
            continue
        if method == "temperature":
            temperature = float(m["temperature"])
            scale, shift = (1 / temperature if temperature > 0 else np.nan), 0.0
        elif method == "platt":
            scale, shift = float(m["a"]), float(m["b"])
        else:
            raise ValueError(f"recalibration map of {label!r}: unknown method {method!r} "
                             f"(temperature, platt or identity)")
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(shift)):
            raise ValueError(f"recalibration map of {label!r}: {m} is not a finite increasing map "
                             f"(needs temperature > 0 or a > 0)")
        out[:, i] = expit(scale * logit(out[:, i]) + shift)
    return out


def map_thresholds(thresholds: dict[str, float], labels: list[str], maps: dict[str, dict]) -> dict[str, float]:
    """Decision thresholds on the scale of recalibrated scores: each mapped like the scores
    (:func:`apply_recalibration`), so an image is positive after the map exactly when it was before."""
    mapped = apply_recalibration(np.array([[thresholds[label] for label in labels]]), labels, maps)[0]
    return {label: float(t) for label, t in zip(labels, mapped)}


def stored_map(truth: np.ndarray, scores: np.ndarray, labels: list[str], patients: int, method: str,
               min_positives: int = 10, min_negatives: int = 10) -> dict | None:
    """What a checkpoint keeps of recalibration (``evaluation.recalibration``; None for 'none'): the maps
    of :func:`fit_recalibration` on the validation split's labels and scores, and who they were fit on.

    {"method", "split": "valid", "patients", "images", "labels": {label: map}}
    """
    if method == "none":
        return None
    return {"method": method, "split": "valid", "patients": int(patients), "images": len(truth),
            "labels": fit_recalibration(truth, scores, labels, method, min_positives, min_negatives)}


METHOD_WORDS = {"temperature": "temperature scaling", "platt": "Platt scaling"}


def describe_map(stored: dict) -> str:
    """A stored map (:func:`stored_map`) in words: its method and the validation patients it was fit on
    ("about N" where the counts are rounded for release), and the labels it leaves unchanged."""
    about = "about " if stored.get("counts_rounded") else ""
    kept = [label for label, m in stored["labels"].items() if m["method"] == "identity"]
    return (f"{METHOD_WORDS[stored['method']]} per label, fit on {about or 'the '}{stored['patients']:,} validation "
            f"patients ({about}{stored['images']:,} images)" + (f"; left unchanged (identity) for {', '.join(kept)}"
                                                                 if kept else ""))


GROUP_METRICS = ("calibration_in_the_large", "observed_expected", "ece")
GAP_DEFINITIONS = {
    "calibration_in_the_large_gap": "highest minus lowest group calibration-in-the-large (mean predicted "
                                    "probability minus observed fraction; 0 = equal)",
    "ece_gap": "highest minus lowest group ECE (the label's equal-mass bins; 0 = equal)",
}


def _group_values(sums: np.ndarray, center: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Group calibration from its sums [R, 3 + K] (labelled images, positives, sum p, per-bin sum of
    p - y) under R rows; with ``center`` (the data's sums), 'ece_band' too."""
    n, errors = sums[:, 0], sums[:, 3:] / sums[:, :1]
    out = {"calibration_in_the_large": (sums[:, 2] - sums[:, 1]) / n, "observed_expected": sums[:, 1] / sums[:, 2],
           "ece": np.abs(errors).sum(axis=1)}
    if center is not None:
        out["ece_band"] = np.abs(errors - center[:, 3:] / center[:, :1]).sum(axis=1)
    return out


def subgroup_calibration(truth: np.ndarray, scores: np.ndarray, labels: list[str], sex: np.ndarray,
                         age: np.ndarray, edges: list[float], weights: np.ndarray, *,
                         clusters: np.ndarray | None = None, bins: int = 10, min_size: int = 10,
                         permutations: int = 1000, seed: int = 0, level: float = LEVEL) -> dict:
    """Calibration per subgroup (sex, age bins) and its gaps across groups, per label and averaged,
    in the shape of :func:`evaluation.fairness.fairness_report` (its groups, resamples, permutations,
    intervals and p-values, :class:`evaluation.fairness._Worlds`):

    - per group and label (labelled images; fewer than ``min_size`` not estimable): calibration-in-the-
      large (mean predicted minus observed fraction), O/E and ECE over the label's equal-mass bins of
      all its images (the same bins for every group), with intervals (ECE: its band, module doc);
    - per label and averaged: the calibration-in-the-large gap and the ECE gap (highest minus lowest
      group, over the groups of ``min_size`` or more), with the fairness gaps' simultaneous band and
      permutation p-value: shuffling whole patients' groups keeps group sizes, so a smaller group's
      noisier (upward-biased) ECE is in the chance reference too.

    {"bins", "min_subgroup_size", "permutations", "definitions",
     "subgroups": {attribute: {group: {label: {"n", "positives", "estimable", "metrics" | "reason"}}}},
     "fairness": {attribute: {"labels": {label: {"groups", "left_out", "metrics": {gap: entry}}},
                              "mean": {gap: {**entry, "labels"}}}}}
    P-values are unadjusted: join them to the fairness report's Benjamini-Hochberg set.
    """
    bins = check_bins(bins, len(truth))
    truth = np.asarray(truth, dtype=np.float64)
    clusters = np.arange(len(truth)) if clusters is None else np.asarray(clusters)
    worlds = _Worlds(weights, clusters, permutations, seed)
    # per label: [count, y, p, (p - y) in each bin], zero for unlabelled images; all labels side by side
    width = 3 + bins
    columns = np.zeros((len(truth), len(labels) * width))
    for i in range(len(labels)):
        known = np.isfinite(truth[:, i])
        y, p = truth[known, i], scores[known, i].astype(np.float64)
        block = np.zeros((len(y), width))
        block[:, 0], block[:, 1], block[:, 2] = 1, y, p
        if len(y):
            block[np.arange(len(y)), 3 + bin_ids(p, bins)[1]] = p - y
        columns[known, i * width:(i + 1) * width] = block
    single = columns.astype(weights.dtype)
    report = {"bins": bins, "min_subgroup_size": min_size, "permutations": permutations,
              "definitions": GAP_DEFINITIONS, "subgroups": {}, "fairness": {}}
    for attribute, names in group_names(sex, age, edges).items():
        if attribute == "sex_age":
            continue
        groups = groups_of(attribute, edges)
        permuted = worlds.permuted_groups(names, groups)
        sums = {}  # group -> (data [1, L*w], resamples [B, L*w], permutations [P, L*w] or None)
        for k, group in enumerate(groups):
            mask = names == group
            sums[group] = (columns[mask].sum(axis=0, keepdims=True),
                           (weights[:, mask] @ single[mask]).astype(np.float64),
                           None if permuted is None else
                           ((permuted == k).astype(weights.dtype) @ single).astype(np.float64))
        report["subgroups"][attribute] = {group: {} for group in groups}
        per_label, rows = {}, {}
        for i, label in enumerate(labels):
            part = slice(i * width, (i + 1) * width)
            point, boot, perm, eligible, left_out = {}, {}, {}, [], {}
            for group in groups:
                data, resampled, shuffled = (s[:, part] if s is not None else None for s in sums[group])
                n, positives = int(data[0, 0]), int(data[0, 1])
                entry = {"n": n, "positives": positives}
                if n < min_size:
                    reason = f"n = {n} < minimum subgroup size {min_size}"
                    report["subgroups"][attribute][group][label] = {**entry, "estimable": False, "reason": reason}
                    left_out[group] = reason
                    continue
                with np.errstate(invalid="ignore", divide="ignore"):
                    point[group] = _group_values(data)
                    boot[group] = _group_values(resampled, center=data)
                    if shuffled is not None:
                        perm[group] = _group_values(shuffled)
                metrics = {}
                for name in GROUP_METRICS:
                    value = float(point[group][name][0])
                    if not np.isfinite(value):
                        metrics[name] = _not_estimable(_why_missing(name))
                    elif name == "ece":
                        metrics[name] = _band(value, boot[group]["ece_band"], level)
                    else:
                        metrics[name] = _interval(value, boot[group][name], level)
                report["subgroups"][attribute][group][label] = {**entry, "estimable": True, "metrics": metrics}
                eligible.append(group)
            values = [{}, {}, {}, {}]  # data, resamples, permutations, band: as fairness.py's rows
            if len(eligible) >= 2:
                with np.errstate(invalid="ignore"):
                    for gap, name in (("calibration_in_the_large_gap", "calibration_in_the_large"),
                                      ("ece_gap", "ece")):
                        values[0][gap] = _spread([point[g][name] for g in eligible])
                        values[1][gap] = _spread([boot[g][name] for g in eligible])
                        if perm:
                            values[2][gap] = _spread([perm[g][name] for g in eligible])
                        values[3][gap] = _spread([boot[g][name] - point[g][name] for g in eligible])
            rows[label] = values
            per_label[label] = {"groups": eligible, "left_out": left_out, "metrics": {
                name: _entry(values[0][name][0], values[1][name], _null(values[2], name), two_sided=False,
                             band=values[3][name]) for name in values[0]}}
        report["fairness"][attribute] = {"labels": per_label, "mean": _mean_over_labels(rows)}
    return report
