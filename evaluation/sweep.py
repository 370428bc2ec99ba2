"""Privacy budget sweep: accuracy, calibration and fairness per epsilon, against the non-private runs.

Every run of a sweep is scored on the same test patients, so each budget is compared with the
non-private reference *paired*: per resample b of the test patients (the resampling of
``bootstrap.py``), the budget's metric averaged over its seeds minus the non-private one averaged
over its seeds, with the seeds themselves drawn with replacement in every resample (training runs
vary too). The interval is the percentile interval of these differences, the p-value the bootstrap's
(k + 1) / (B + 1) two-sided value, and Benjamini-Hochberg q-values adjust over all of the sweep's
differences and trends. The calibration columns are the Brier score and ECE averaged over labels
(``evaluation.calibration``: each run's ECE in its own equal-mass bins on the data); an ECE is biased
up by noise, about equally for runs scored on the same images, so its difference's interval is
approximate.

The trend is the least-squares slope of each metric on log(epsilon) over every private run (seeds
included), with its t interval (scipy's linregress); it needs at least ``MIN_TREND_RUNS`` runs. As in
the study, Pearson's r between epsilon and each metric over the private runs is kept as a secondary
output, with the same minimum.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, linregress, pearsonr, t as student_t

from artifacts import Curves
from evaluation.bootstrap import LEVEL, label_mean, percentile_interval, two_sided_p, weighted_auroc
from evaluation.calibration import PAIRED, brier_ece_resamples
from evaluation.fairness import fairness_column, mean_fairness_resamples
from privacy.release import rounded, rounded_up, worst_patient_epsilon

MIN_TREND_RUNS = 5


def sweep_row(run: str, target_epsilon: float, seed: int, summary: dict, metrics: dict, fairness: dict) -> dict:
    """One row: run, budget, seed, accounting, mean AUROC with interval, label-averaged Brier score and
    ECE (empty for results of a version without them), label-averaged fairness metrics.
    The accounting is rounded as on the model card (epsilon up, sigma to two digits): with the steps,
    exact values would give the number of training patients back."""
    ci = metrics.get("auroc_mean_ci95") or [None, None]
    sigma = summary["dp"]["noise_multiplier"]
    row = {"run": run, "epsilon": target_epsilon, "seed": seed, "epsilon_spent": rounded_up(worst_patient_epsilon(summary["dp"])),
           "noise_multiplier": None if sigma is None else rounded(sigma), "auroc_mean": metrics["auroc_mean"],
           "auroc_mean_ci95_low": ci[0], "auroc_mean_ci95_high": ci[1]}
    calibration = metrics.get("calibration_mean") or {}
    row.update({f"{name}_mean": (calibration.get(name) or {}).get("value") for name in PAIRED})
    for attribute, fair in fairness["fairness"].items():
        row.update({fairness_column(attribute, name): entry["value"] for name, entry in fair["mean"].items()})
    return row


def audit_columns(audit: dict) -> dict:
    """Sweep columns of a run's audit: the loss attack (and LiRA) overall, and the canary bound."""
    row = {}
    for name, prefix in (("loss", "attack"), ("lira_offline", "lira")):
        if name in audit["attacks"]:
            overall = audit["attacks"][name]["overall"]
            ci = overall["auroc"]["ci95"] or [None, None]
            row.update({f"{prefix}_auroc": overall["auroc"]["value"], f"{prefix}_auroc_ci95_low": ci[0],
                        f"{prefix}_auroc_ci95_high": ci[1], f"{prefix}_tpr_at_fpr_0.01": overall["tpr_at_fpr_0.01"]["value"]})
    row["epsilon_lower_bound"] = audit["canaries"]["epsilon_lower_bound"] if audit["canaries"] else None
    return row


def run_resamples(predictions: pd.DataFrame, metrics: dict, weights: np.ndarray, edges: list[float],
                  min_size: int, min_positives: int, min_negatives: int,
                  bins: int) -> dict[str, tuple[float, np.ndarray]]:
    """column -> (value, values under each row of ``weights``) of a run's mean AUROC, label-averaged
    Brier score and ECE (``bins`` equal-mass bins; NaN when no label is estimable) and fairness
    metrics, from its ``private/predictions/test.csv`` and the thresholds in its metrics."""
    labels = list(metrics["labels"])
    truth = predictions[labels].to_numpy(dtype=float, na_value=np.nan)
    scores = predictions[[f"{label}_score" for label in labels]].to_numpy(dtype=float)
    thresholds = {label: metrics["labels"][label]["threshold"] for label in labels}
    full = np.ones((1, len(truth)), np.float32)
    out = {"auroc_mean": (float(label_mean([weighted_auroc(truth[:, i], scores[:, i], full) for i in range(len(labels))])[0]),
                          label_mean([weighted_auroc(truth[:, i], scores[:, i], weights) for i in range(len(labels))]))}
    calibration = brier_ece_resamples(truth, scores, labels, weights, bins, min_positives, min_negatives)["mean"]
    out.update({f"{name}_mean": (entry["value"], entry["resamples"]) if "value" in entry
                else (math.nan, np.full(len(weights), math.nan)) for name, entry in calibration.items()})
    out.update(mean_fairness_resamples(truth, scores, labels, thresholds, predictions["sex"].fillna("").to_numpy(),
                                       predictions["age"].to_numpy(dtype=float), edges, weights, min_size=min_size,
                                       min_positives=min_positives, min_negatives=min_negatives))
    return out


def paired_differences(runs: dict[tuple[float, int], dict], seed: int) -> dict:
    """epsilon -> column -> difference to the non-private runs, with interval and p-value (module doc).

    ``runs``: (epsilon, seed) -> :func:`run_resamples` of that run; the non-private runs have epsilon inf.
    """
    reference = [v for (eps, _), v in runs.items() if math.isinf(eps)]
    if not reference:
        return {}
    rng = np.random.default_rng(seed)
    out = {}
    for epsilon in sorted({eps for eps, _ in runs if not math.isinf(eps)}):
        private = [v for (eps, _), v in runs.items() if eps == epsilon]
        out[f"{epsilon:g}"] = {}
        for column in private[0]:
            if not all(column in run for run in private + reference):
                continue
            point = np.mean([r[column][0] for r in private]) - np.mean([r[column][0] for r in reference])
            if not np.isfinite(point):
                out[f"{epsilon:g}"][column] = {"difference": None, "ci95": None, "p_value": None, "note": "not estimable"}
                continue
            resampled = _seed_mean(private, column, rng) - _seed_mean(reference, column, rng)
            out[f"{epsilon:g}"][column] = {"difference": float(point), "ci95": percentile_interval(resampled),
                                           "p_value": two_sided_p(resampled), "seeds": len(private),
                                           "reference_seeds": len(reference)}
    return out


def _seed_mean(runs: list[dict], column: str, rng: np.random.Generator) -> np.ndarray:
    """Per resample, the mean over len(runs) seeds drawn with replacement of the runs' resampled values."""
    values = np.stack([run[column][1] for run in runs])  # [seeds, B]
    drawn = rng.integers(0, len(runs), size=(len(runs), values.shape[1]))
    return values[drawn, np.arange(values.shape[1])].mean(axis=0)


def trends(table: pd.DataFrame, columns: list[str]) -> dict:
    """Slope of each column on log(epsilon) over the private runs, with its 95% t interval, and
    Pearson's r between epsilon and the column (secondary, as in the study)."""
    private = table[np.isfinite(table["epsilon"].astype(float))]
    out = {}
    for column in columns:
        values = private[["epsilon", column]].dropna().astype(float)
        n = len(values)
        entry = {"runs": n, "budgets": int(values["epsilon"].nunique())}
        if n < MIN_TREND_RUNS or entry["budgets"] < 2 or values[column].nunique() < 2:
            out[column] = {**entry, "slope_per_log_epsilon": None, "ci95": None, "p_value": None, "pearson_r": None,
                           "pearson_p": None, "note": f"not meaningful: needs {MIN_TREND_RUNS} private runs over at "
                                                      f"least 2 budgets with varying values (sweep --seeds K)"}
            continue
        fit = linregress(np.log(values["epsilon"]), values[column])
        half = student_t.ppf(0.5 + LEVEL / 2, n - 2) * fit.stderr
        r = pearsonr(values["epsilon"], values[column])
        out[column] = {**entry, "slope_per_log_epsilon": float(fit.slope),
                       "ci95": [float(fit.slope - half), float(fit.slope + half)], "p_value": float(fit.pvalue),
                       "pearson_r": float(r.statistic), "pearson_p": float(r.pvalue)}
    return out


def add_q_values(differences: dict, trend: dict) -> int:
    """Benjamini-Hochberg q-values over every p-value of the sweep (differences and trends); returns
    the number of tests."""
    tested = [e for budget in differences.values() for e in budget.values() if e.get("p_value") is not None]
    tested += [e for e in trend.values() if e.get("p_value") is not None]
    for entry, q in zip(tested, false_discovery_control([e["p_value"] for e in tested]) if tested else []):
        entry["q_value"] = float(q)
    return len(tested)


def log_sweep_hparams(logdir, table: pd.DataFrame) -> None:
    """One TensorBoard hparams run per budget and seed: epsilon against AUROC and the fairness metrics."""
    curves = Curves(Path(logdir), "The sweep's table, JSON and report are written apart")
    for row in table.to_dict(orient="records"):
        metrics = {f"sweep/{k}": float(v) for k, v in row.items()
                   if k not in ("run", "epsilon", "seed", "noise_multiplier", "epsilon_spent") and v is not None
                   and np.isfinite(v)}
        curves.hparams({"epsilon": float(row["epsilon"]) if np.isfinite(row["epsilon"]) else 1e9,
                        "private": bool(np.isfinite(row["epsilon"])), "seed": int(row["seed"])}, metrics, row["run"])
    curves.close()
