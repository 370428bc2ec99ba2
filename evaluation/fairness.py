"""Subgroup performance and fairness across sex and age, with intervals and a chance reference.

Subgroups: sex (F, M), age bins (``evaluation.age_bins`` edges; the last bin is closed) and sex x age.
Per subgroup and label: n, prevalence, AUROC, accuracy, sensitivity and specificity, each with an
interval from the test set's resample counts restricted to the subgroup (paired with every other
interval). A subgroup smaller than ``min_size`` is not estimable; its AUROC needs ``min_positives``
positive and ``min_negatives`` negative images.

Fairness per label (and averaged over labels), each with a bootstrap interval and, for the gaps, a
permutation p-value: the group labels of the patients are shuffled over the same predictions, so the
p-value is the share of shuffles whose gap is at least the observed one ((k + 1) / (P + 1)); a gap
that random groups also produce is not a finding. With G the groups compared:
- statistical parity difference (SPD) as coded in the study: for sex, accuracy(F) - accuracy(M); for
  an age group g, accuracy(g) - sum_{h != g} n_h accuracy(h) / sum_{h != g} n_h (p-value on |SPD|);
- demographic parity difference max_g P(call | g) - min_g P(call | g) and equalized odds difference
  max(range_g TPR_g, range_g FPR_g) (fairlearn's definitions), over the groups holding both classes
  (a group without positives has no TPR: it is left out, never counted as 0);
- AUROC gap (best minus worst group) and worst-group AUROC, over the groups whose AUROC is estimable;
- with :func:`join_calibration`, the calibration-in-the-large and ECE gaps of
  :func:`evaluation.calibration.subgroup_calibration`, over the groups of ``min_size`` or more images.

Underdiagnosis per group: the share of abnormal images called normal (1 - TPR of "any finding"), and
overdiagnosis, the share of normal images called abnormal (its FPR). "Abnormal" is composite by
default: some configured label positive ("normal": every configured label known negative), called
abnormal when some label's score reaches its threshold. With ``no_finding`` (a "No Finding" label of
CheXpert, MIMIC-CXR or ChestX-ray14), it is Seyyed-Kalantari et al.'s (Nature Medicine 2021): abnormal
= No Finding negative, called normal = the No Finding output at or above its threshold. A group with
fewer than ``min_size`` abnormal (normal) images has no underdiagnosis (overdiagnosis) rate.

Intervals: percentile for the signed SPD and for subgroup metrics (Wilson for proportions with few
events); a simultaneous bootstrap band for the gaps and the worst-group AUROC (see :func:`_entry`: a
range of noisy group values is biased up, so its percentile interval can miss its own estimate).

All p-values of one report get Benjamini-Hochberg q-values (scipy) over the report's tests; the
unadjusted ones are exploratory.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from evaluation.bootstrap import (p_value, percentile_interval, proportion_interval, weighted_auroc,
                                  weighted_confusion)

SUBGROUP_METRICS = ("auroc", "accuracy", "sensitivity", "specificity")
SPD = "statistical_parity_difference"
DEFINITIONS = {
    SPD: "accuracy of the group minus that of the others (sex: F - M; age: the group against the size-weighted "
         "rest); positive = the group is classified more accurately",
    "demographic_parity_difference": "largest minus smallest share of images called positive across groups (0 = equal)",
    "equalized_odds_difference": "the larger of the TPR range and the FPR range across groups (0 = equal error rates)",
    "auroc_gap": "highest minus lowest group AUROC (0 = equal)",
    "worst_group_auroc": "lowest group AUROC",
    "underdiagnosis_gap": "highest minus lowest group underdiagnosis rate",
    "overdiagnosis_gap": "highest minus lowest group overdiagnosis rate",
}


def age_bin_names(edges: list[float]) -> list[str]:
    return [f"[{a:g},{b:g})" for a, b in zip(edges[:-2], edges[1:-1])] + [f"[{edges[-2]:g},{edges[-1]:g}]"]


def age_bins(age: np.ndarray, edges: list[float]) -> np.ndarray:
    """Bin name per image ('' for a missing or out-of-range age)."""
    names = np.array(age_bin_names(edges) + [""])
    age = np.asarray(age, dtype=float)
    idx = np.digitize(age, edges[1:-1], right=False)
    idx[~np.isfinite(age) | (age < edges[0]) | (age > edges[-1])] = len(names) - 1
    return names[idx]


def group_names(sex: np.ndarray, age: np.ndarray, edges: list[float]) -> dict[str, np.ndarray]:
    """attribute -> group name per image ('' = no group), for sex, age and sex x age."""
    sex = np.asarray(sex).astype(str)
    sex = np.where(np.isin(sex, ["F", "M"]), sex, "")
    bins = age_bins(age, edges)
    both = np.where((sex != "") & (bins != ""), np.char.add(np.char.add(sex, " "), bins), "")
    return {"sex": sex, "age": bins, "sex_age": both}


def groups_of(attribute: str, edges: list[float]) -> list[str]:
    """The groups of an attribute, in report order."""
    bins = age_bin_names(edges)
    return {"sex": ["F", "M"], "age": bins, "sex_age": [f"{s} {b}" for s in ("F", "M") for b in bins]}[attribute]


def _stats(truth: np.ndarray, score: np.ndarray, predicted: np.ndarray, weights: np.ndarray,
           with_auroc: bool = True) -> dict[str, np.ndarray]:
    """Weighted confusion counts, rates and AUROC of one label's images under each row of ``weights``."""
    tp, fp, fn, tn = weighted_confusion(truth, predicted, weights)
    n = tp + fp + fn + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"n": n, "positives": tp + fn, "selection": (tp + fp) / n, "accuracy": (tp + tn) / n,
               "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "fpr": fp / (fp + tn),
               "prevalence": (tp + fn) / n}
    if with_auroc:
        out["auroc"] = weighted_auroc(truth, score, weights)  # leaves unlabelled images out itself
    return out


def _spread(values: list[np.ndarray]) -> np.ndarray:
    """Largest minus smallest value per row (NaN when a group's value is NaN in that row)."""
    stacked = np.stack(values)
    return stacked.max(axis=0) - stacked.min(axis=0)


def _statistical_parity(stats: dict[str, dict], attribute: str) -> dict[str, np.ndarray]:
    """The study's SPD per group from group accuracies (rows: point, resamples or permutations)."""
    if attribute == "sex":
        return {"F-M": stats["F"]["accuracy"] - stats["M"]["accuracy"]} if {"F", "M"} <= set(stats) else {}
    if len(stats) < 2:
        return {}
    out = {}
    for group in stats:
        others = [h for h in stats if h != group]
        n = np.stack([stats[h]["n"] for h in others])
        with np.errstate(invalid="ignore", divide="ignore"):
            rest = (n * np.stack([stats[h]["accuracy"] for h in others])).sum(axis=0) / n.sum(axis=0)
        out[group] = stats[group]["accuracy"] - rest
    return out


def _fairness_values(stats: dict[str, dict], attribute: str, eligible: dict[str, list[str]],
                     center: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
    """Every fairness metric of one label, per row, from the per-group statistics.

    With ``center`` (the statistics on the data), the gaps and the worst-group AUROC are replaced by
    their band statistic: the spread of the groups' deviations from the data (for the worst group, the
    largest absolute deviation), whose 95% quantile bounds every group at once (see :func:`_entry`).
    """
    def rows(name: str, groups: list[str]) -> list[np.ndarray]:
        return [stats[g][name] - (center[g][name] if center else 0) for g in groups]

    out = {} if center else {f"{SPD}:{g}": v for g, v in
                             _statistical_parity({g: stats[g] for g in eligible["size"]}, attribute).items()}
    rates = eligible["rates"]
    if len(rates) >= 2:
        out["demographic_parity_difference"] = _spread(rows("selection", rates))
        out["equalized_odds_difference"] = np.maximum(_spread(rows("sensitivity", rates)), _spread(rows("fpr", rates)))
    aurocs = eligible["auroc"]
    if len(aurocs) >= 2:
        out["auroc_gap"] = _spread(rows("auroc", aurocs))
    if aurocs:
        worst = np.stack(rows("auroc", aurocs))
        out["worst_group_auroc"] = np.abs(worst).max(axis=0) if center else worst.min(axis=0)
    return out


def _eligible(point: dict[str, dict], min_size: int, min_positives: int, min_negatives: int) -> tuple[dict, dict]:
    """Groups entering each comparison, and why the others are left out."""
    size, rates, auroc, left_out = [], [], [], {}
    for group, s in point.items():
        n, positives = int(s["n"][0]), int(s["positives"][0])
        if n < min_size:
            left_out[group] = f"n = {n} < minimum subgroup size {min_size}"
            continue
        size.append(group)
        if positives == 0 or positives == n:
            left_out[group] = f"{'no positive' if positives == 0 else 'no negative'} image: no TPR/FPR, no AUROC"
            continue
        rates.append(group)
        if positives < min_positives or n - positives < min_negatives:
            left_out[group] = (f"AUROC not estimable: {positives} positive / {n - positives} negative images "
                               f"(needs {min_positives} / {min_negatives})")
            continue
        auroc.append(group)
    return {"size": size, "rates": rates, "auroc": auroc}, left_out


def _null(permuted: dict, name: str) -> np.ndarray | None:
    """The permutation values of a gap or SPD (the worst-group AUROC is a level, not a gap: no p-value)."""
    return None if name == "worst_group_auroc" else permuted.get(name)


def _entry(point: float, resampled: np.ndarray | None, permuted: np.ndarray | None, two_sided: bool,
           band: np.ndarray | None = None) -> dict:
    """A fairness number: value, 95% interval, and the permutation p-value of its size.

    A signed difference (SPD) gets the percentile interval. A gap (largest minus smallest group) or a
    worst-group value is not a smooth function of the groups: its bootstrap distribution sits above
    the estimate (a range of noisy values is biased up) and a percentile interval can exclude the
    estimate and never covers a true gap of 0. It gets a simultaneous band instead: with c the 95%
    quantile of ``band`` (the spread of the groups' bootstrap deviations), every pairwise group
    difference is within c of its estimate at once, so the gap is within [gap - c, gap + c] (clipped
    to [0, 1]); this covers at least 95% (more where groups differ: conservative).
    """
    entry = {"value": float(point) if np.isfinite(point) else None, "ci95": None, "ci_method": None, "p_value": None}
    if entry["value"] is None:
        return {**entry, "note": "not estimable"}
    if band is not None:
        finite = band[np.isfinite(band)]
        if len(finite) >= 2:
            c = float(np.quantile(finite, 0.95))
            entry["ci95"] = [max(0.0, point - c), min(1.0, point + c)]
            entry["ci_method"] = "simultaneous bootstrap band (conservative)"
    elif resampled is not None:
        entry["ci95"] = percentile_interval(resampled)
        entry["ci_method"] = "percentile" if entry["ci95"] else None
    if permuted is not None:
        finite = permuted[np.isfinite(permuted)]
        observed = abs(point) if two_sided else point
        null = np.abs(finite) if two_sided else finite
        # a tolerance keeps a shuffle that reproduces the observed gap (ties in float sums) counted
        entry["p_value"] = p_value(null >= observed - 1e-12, len(finite)) if len(finite) else None
    return entry


class _Worlds:
    """The three sets of rows a fairness number is computed on: the data (1 row), the bootstrap
    resamples and the permutations of the group labels (patients keep their images together)."""

    def __init__(self, weights: np.ndarray, clusters: np.ndarray, permutations: int, seed: int):
        self.weights, self.clusters, self.permutations, self.seed = weights, clusters, permutations, seed

    def permuted_groups(self, names: np.ndarray, groups: list[str]) -> np.ndarray | None:
        """[permutations, n] group index per image (-1 = none) with the units' group labels shuffled
        among the units that have one (a unit's group is that of its first image)."""
        if not self.permutations:
            return None
        code = {g: k for k, g in enumerate(groups)}
        image_group = np.array([code.get(g, -1) for g in names], dtype=np.int16)
        first = pd.Series(np.arange(len(names))).groupby(self.clusters).first().to_numpy()
        unit_group = image_group[first]
        known = np.flatnonzero(unit_group >= 0)
        rng = np.random.default_rng(self.seed)
        shuffled = np.tile(unit_group, (self.permutations, 1))
        shuffled[:, known] = unit_group[known][rng.permuted(np.tile(np.arange(len(known)), (self.permutations, 1)),
                                                             axis=1)]
        return shuffled[:, self.clusters]


def _group_stats(truth, score, predicted, names, groups, worlds: _Worlds, permuted,
                 with_auroc: bool = True) -> tuple[dict, dict, dict]:
    """Per group: statistics on the data, the resamples and the permutations of one label."""
    point, boot, perm = {}, {}, {}
    for k, group in enumerate(groups):
        mask = names == group
        subset = truth[mask], score[mask], predicted[mask]
        point[group] = _stats(*subset, np.ones((1, int(mask.sum())), np.float32), with_auroc)
        boot[group] = _stats(*subset, worlds.weights[:, mask], with_auroc)
        if permuted is not None:
            perm[group] = _stats(truth, score, predicted, (permuted == k).astype(np.float32), with_auroc)
    return point, boot, perm


def _subgroup_entry(point: dict, boot: dict, min_size: int, min_positives: int, min_negatives: int) -> dict:
    n, positives = int(point["n"][0]), int(point["positives"][0])
    entry = {"n": n, "positives": positives, "prevalence": positives / n if n else None}
    if n < min_size:
        return {**entry, "estimable": False, "reason": f"n = {n} < minimum subgroup size {min_size}"}
    trials = {"sensitivity": positives, "specificity": n - positives}  # accuracy and prevalence: n
    metrics = {}
    for name in ("prevalence", *SUBGROUP_METRICS):
        value = float(point[name][0])
        if name == "auroc" and (positives < min_positives or n - positives < min_negatives):
            metrics[name] = {"value": None, "ci95": None, "ci_method": None,
                             "reason": f"not estimable: {positives} positive / {n - positives} negative images "
                                       f"(needs {min_positives} / {min_negatives})"}
        elif not np.isfinite(value):
            reason = "no positive image" if name == "sensitivity" else "no negative image"
            metrics[name] = {"value": None, "ci95": None, "ci_method": None, "reason": f"not estimable: {reason}"}
        elif name == "auroc":
            ci = percentile_interval(boot[name])
            metrics[name] = {"value": value, "ci95": ci, "ci_method": "percentile" if ci else None}
        else:
            k = trials.get(name, n)
            metrics[name] = {"value": value, **proportion_interval(int(round(value * k)), k, boot[name])}
    return {**entry, "estimable": True, "metrics": metrics}


def composite_finding(truth: np.ndarray, scores: np.ndarray, labels: list[str], thresholds: dict[str, float],
                      no_finding: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(abnormal: 1/0/NaN per image, called abnormal per image, definition) for under/overdiagnosis."""
    if no_finding is not None:
        i = labels.index(no_finding)
        nf = truth[:, i].astype(np.float64)
        return 1 - nf, scores[:, i] < thresholds[no_finding], (
            f"Seyyed-Kalantari et al. (2021): abnormal = '{no_finding}' negative; called normal = the "
            f"'{no_finding}' output at or above its threshold")
    findings = truth.astype(np.float64)
    predicted = scores >= np.array([thresholds[label] for label in labels])
    abnormal = np.where((findings == 1).any(axis=1), 1.0, np.where((findings == 0).all(axis=1), 0.0, np.nan))
    return abnormal, predicted.any(axis=1), ("composite: abnormal = some configured label positive, normal = every "
                                             "configured label negative (not a No Finding label: findings outside "
                                             "the configured labels are invisible); called abnormal = some label at "
                                             "or above its threshold")


def fairness_report(truth: np.ndarray, scores: np.ndarray, labels: list[str], thresholds: dict[str, float],
                    sex: np.ndarray, age: np.ndarray, edges: list[float], weights: np.ndarray, *,
                    clusters: np.ndarray | None = None, min_size: int = 10, min_positives: int = 10,
                    min_negatives: int = 10, permutations: int = 1000, seed: int = 0,
                    no_finding: str | None = None) -> dict:
    """Subgroup metrics, fairness metrics per label and averaged (with intervals, permutation p-values
    and BH q-values), and under/overdiagnosis per group. ``weights``: the resample counts of the
    split; ``clusters``: the resampling unit per image (patients are shuffled whole in permutations).
    ``no_finding``: the label whose output defines under/overdiagnosis (see module doc)."""
    clusters = np.arange(len(truth)) if clusters is None else np.asarray(clusters)
    worlds = _Worlds(weights, clusters, permutations, seed)
    names_by_attribute = group_names(sex, age, edges)
    predicted = scores >= np.array([thresholds[label] for label in labels])
    truth = truth.astype(np.float64)
    report = {"age_bins": age_bin_names(edges), "min_subgroup_size": min_size, "min_positives": min_positives,
              "min_negatives": min_negatives, "permutations": permutations, "definitions": DEFINITIONS,
              "subgroups": {}, "fairness": {}, "underdiagnosis": {}}
    abnormal, called, definition = composite_finding(truth, scores, labels, thresholds, no_finding)
    report["underdiagnosis_definition"], report["no_finding"] = definition, no_finding
    for attribute, names in names_by_attribute.items():
        groups = groups_of(attribute, edges)
        permuted = worlds.permuted_groups(names, groups) if attribute != "sex_age" else None
        report["subgroups"][attribute] = {g: {} for g in groups}
        per_label, rows = {}, {}
        for i, label in enumerate(labels):
            point, boot, perm = _group_stats(truth[:, i], scores[:, i], predicted[:, i], names, groups, worlds, permuted)
            for group in groups:
                report["subgroups"][attribute][group][label] = _subgroup_entry(point[group], boot[group], min_size,
                                                                               min_positives, min_negatives)
            if attribute == "sex_age":
                continue
            eligible, left_out = _eligible(point, min_size, min_positives, min_negatives)
            values = [_fairness_values(world, attribute, eligible) if world else {} for world in (point, boot, perm)]
            values.append(_fairness_values(boot, attribute, eligible, center=point))
            rows[label] = values
            per_label[label] = {"groups": eligible, "left_out": left_out, "metrics": {
                name: _entry(values[0][name][0], values[1][name], _null(values[2], name), two_sided=name.startswith(SPD),
                             band=values[3].get(name)) for name in values[0]}}
        if attribute == "sex_age":
            continue
        report["fairness"][attribute] = {"labels": per_label, "mean": _mean_over_labels(rows)}
        report["underdiagnosis"][attribute] = _diagnosis(abnormal, called, names, groups, worlds, permuted, min_size)
    _add_q_values(report)
    return report


def _label_means(rows: dict[str, list[dict]]) -> dict[str, tuple]:
    """name -> (point, resampled, permuted, band, labels) of each fairness metric averaged, row by row,
    over the labels where it is estimable (permuted and band None where the metric has none). The
    band of a mean is the mean of the labels' bands: the mean gap moves by at most that much."""
    names = list(dict.fromkeys(name for values in rows.values() for name in values[0]))
    out = {}
    for name in names:
        having = [values for values in rows.values() if name in values[0] and np.isfinite(values[0][name][0])]
        if having:
            point, boot = (np.mean([v[k][name] for v in having], axis=0) for k in (0, 1))
            perm = np.mean([v[2][name] for v in having], axis=0) if _null(having[0][2], name) is not None else None
            band = np.mean([v[3][name] for v in having], axis=0) if name in having[0][3] else None
            out[name] = (point[0], boot, perm, band, len(having))
    return out


def _mean_over_labels(rows: dict[str, list[dict]]) -> dict:
    return {name: {**_entry(point, boot, perm, two_sided=name.startswith(SPD), band=band), "labels": n}
            for name, (point, boot, perm, band, n) in _label_means(rows).items()}


def fairness_column(attribute: str, name: str) -> str:
    """Table column of a label-averaged fairness metric: 'sex_auroc_gap', 'age_spd_[60,70)'."""
    metric, _, group = name.partition(":")
    return f"{attribute}_spd_{group}" if metric == SPD else f"{attribute}_{metric}"


def mean_fairness_resamples(truth: np.ndarray, scores: np.ndarray, labels: list[str], thresholds: dict[str, float],
                            sex: np.ndarray, age: np.ndarray, edges: list[float], weights: np.ndarray, *,
                            min_size: int = 10, min_positives: int = 10,
                            min_negatives: int = 10) -> dict[str, tuple[float, np.ndarray]]:
    """'<attribute>_<metric>' -> (value, resampled values) of each fairness metric averaged over labels,
    for sex and age: what a paired difference between two models on the same images needs."""
    worlds = _Worlds(weights, np.arange(len(truth)), 0, 0)
    predicted = scores >= np.array([thresholds[label] for label in labels])
    out = {}
    for attribute, names in group_names(sex, age, edges).items():
        if attribute == "sex_age":
            continue
        groups = groups_of(attribute, edges)
        rows = {}
        for i, label in enumerate(labels):
            point, boot, _ = _group_stats(truth[:, i].astype(np.float64), scores[:, i], predicted[:, i], names, groups,
                                          worlds, None)
            eligible, _ = _eligible(point, min_size, min_positives, min_negatives)
            rows[label] = [_fairness_values(world, attribute, eligible) for world in (point, boot)] + [{}, {}]
        out.update({fairness_column(attribute, name): (value, boot)
                    for name, (value, boot, *_) in _label_means(rows).items()})
    return out


def _diagnosis(abnormal, called, names, groups, worlds: _Worlds, permuted, min_size: int) -> dict:
    """Under- and overdiagnosis per group with intervals, and their gaps across groups."""
    out, rates = {"groups": {}}, {"underdiagnosis": [{}, {}, {}], "overdiagnosis": [{}, {}, {}]}
    # underdiagnosis = 1 - TPR of "abnormal", overdiagnosis = its FPR
    point, boot, perm = _group_stats(abnormal, np.zeros(len(abnormal)), called, names, groups, worlds, permuted,
                                     with_auroc=False)
    for group in groups:
        n_abnormal = int(point[group]["positives"][0])
        n_normal = int(point[group]["n"][0]) - n_abnormal
        entry = {"abnormal": n_abnormal, "normal": n_normal}
        for name, trials, rate in (("underdiagnosis", n_abnormal, lambda s: 1 - s["sensitivity"]),
                                   ("overdiagnosis", n_normal, lambda s: s["fpr"])):
            if trials < min_size:
                entry[name] = {"value": None, "ci95": None, "ci_method": None,
                               "reason": f"not estimable: {trials} {'abnormal' if name == 'underdiagnosis' else 'normal'}"
                                         f" images < minimum subgroup size {min_size}"}
                continue
            value = float(rate(point[group])[0])
            entry[name] = {"value": value, **proportion_interval(int(round(value * trials)), trials,
                                                                 rate(boot[group]))}
            for k, world in enumerate((point, boot, perm)):
                if world:
                    rates[name][k][group] = rate(world[group])
        out["groups"][group] = entry
    out["gaps"] = {}
    for name, (point_rates, boot_rates, perm_rates) in rates.items():
        if len(point_rates) >= 2:
            out["gaps"][f"{name}_gap"] = _entry(
                _spread(list(point_rates.values()))[0], None, _spread(list(perm_rates.values())) if perm_rates else None,
                two_sided=False, band=_spread([boot_rates[g] - point_rates[g] for g in point_rates]))
    return out


def join_calibration(report: dict, calibration: dict) -> None:
    """Join :func:`evaluation.calibration.subgroup_calibration` of the same images, groups, resamples
    and permutations into ``report``: each group's calibration beside its other metrics, the
    calibration gaps beside the other gaps (per label and averaged), their definitions, the binning
    under "calibration", and the Benjamini-Hochberg q-values recomputed over the enlarged set of tests
    (a gap tested outside it would escape the adjustment)."""
    settings = ("min_subgroup_size", "permutations")
    if any(report[key] != calibration[key] for key in settings):
        raise ValueError(f"subgroup calibration with other {' or '.join(settings)} than the fairness report")
    for attribute, groups in calibration["subgroups"].items():
        for group, per_label in groups.items():
            for label, entry in per_label.items():
                if entry["estimable"]:  # the same labelled images and minimum size: estimable in both
                    report["subgroups"][attribute][group][label]["metrics"].update(entry["metrics"])
    for attribute, fair in calibration["fairness"].items():
        for label, entry in fair["labels"].items():
            report["fairness"][attribute]["labels"][label]["metrics"].update(entry["metrics"])
        report["fairness"][attribute]["mean"].update(fair["mean"])
    report["definitions"] = {**report["definitions"], **calibration["definitions"]}
    report["calibration"] = {"bins": calibration["bins"]}
    _add_q_values(report)


def _fairness_entries(report: dict):
    """(attribute, label, metric, entry) of every fairness number of a report ('mean' as label)."""
    for attribute, fair in report["fairness"].items():
        for label, entry in fair["labels"].items():
            for name, metric in entry["metrics"].items():
                yield attribute, label, name, metric
        for name, metric in fair["mean"].items():
            yield attribute, "mean", name, metric
    for attribute, diagnosis in report["underdiagnosis"].items():
        for name, metric in diagnosis["gaps"].items():
            yield attribute, "any finding", name, metric


def _add_q_values(report: dict) -> None:
    """Benjamini-Hochberg q-values over every permutation p-value of the report."""
    tested = [metric for *_, metric in _fairness_entries(report) if metric.get("p_value") is not None]
    q = false_discovery_control([m["p_value"] for m in tested], method="bh") if tested else []
    for metric, value in zip(tested, q):
        metric["q_value"] = float(value)
    report["multiplicity"] = {"tests": len(tested), "method": "Benjamini-Hochberg over the permutation p-values of "
                              "this report", "note": "unadjusted p-values are exploratory; read q-values"}


def fairness_table(report: dict) -> pd.DataFrame:
    """Long table: one row per attribute, group, label and metric, with its interval and method."""
    rows = []
    for attribute, groups in report["subgroups"].items():
        for group, per_label in groups.items():
            for label, entry in per_label.items():
                base = {"attribute": attribute, "group": group, "label": label, "n": entry["n"],
                        "positives": entry["positives"]}
                if not entry["estimable"]:
                    rows.append({**base, "metric": "all", "note": entry["reason"]})
                    continue
                rows += [{**base, "metric": name, **_cells(m)} for name, m in entry["metrics"].items()]
    for attribute, label, name, metric in _fairness_entries(report):
        name, _, group = name.partition(":")
        rows.append({"attribute": attribute, "group": group, "label": label, "metric": name, **_cells(metric)})
    for attribute, diagnosis in report["underdiagnosis"].items():
        for group, entry in diagnosis["groups"].items():
            rows += [{"attribute": attribute, "group": group, "label": "any finding", "metric": f"{name}_rate",
                      "n": entry["abnormal" if name == "underdiagnosis" else "normal"], **_cells(entry[name])}
                     for name in ("underdiagnosis", "overdiagnosis")]
    frame = pd.DataFrame(rows)
    for column in ("n", "positives"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _cells(metric: dict) -> dict:
    ci = metric.get("ci95") or [None, None]
    return {"value": metric.get("value"), "ci95_low": ci[0], "ci95_high": ci[1], "ci_method": metric.get("ci_method"),
            "p_value": metric.get("p_value"), "q_value": metric.get("q_value"),
            "note": metric.get("reason") or metric.get("note", "")}

