"""Two experiments scored on the same images and compared, paired (:mod:`evaluation.compare`):
the orchestration behind ``compare``, with its files and report."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from artifacts import Layout, atomic_write_text, json_text, read_json
from config import InputError
from evaluation.bootstrap import format_p, resampling
from evaluation.calibration import PAIRED
from evaluation.compare import paired_auroc_comparison, paired_calibration_comparison
from evaluation.report import comparison_report
from Prediction_DP import score_split
from privacy.release import rounded_up, worst_patient_epsilon

# comparison.csv's calibration columns: Brier and ECE of A and B and A - B with its interval
CALIBRATION_COLUMNS = [f"{name}_{part}" for name in PAIRED for part in ("a", "b", "difference", "ci95_low", "ci95_high")]


def compare_experiments(exp_a: Path, exp_b: Path, split: str = "test", out_dir: Path | None = None):
    """Score two experiments on the same images and compare their AUROCs, Brier scores and ECEs, paired.

    Writes ``comparison.json``, ``comparison.csv`` and ``report.html`` to ``out_dir`` (default
    ``<parent of A>/comparisons/<A>__vs__<B>__<split>``); returns (comparison, table, out_dir).
    """
    exp_a, exp_b = Path(exp_a), Path(exp_b)
    a, b = score_split(exp_a, split), score_split(exp_b, split)
    if a.labels != b.labels:
        raise InputError(f"cannot compare: {exp_a} predicts {a.labels} but {exp_b} predicts {b.labels}")
    ids_a, ids_b = a.frame["image_id"], b.frame["image_id"]
    if (len(ids_a) != len(ids_b) or not (ids_a.to_numpy() == ids_b.to_numpy()).all()
            or not np.array_equal(a.truth, b.truth, equal_nan=True)):
        raise InputError(f"cannot compare: the {split} splits differ ({exp_a}: {len(ids_a)} images, {exp_b}: "
                         f"{len(ids_b)} images, {len(set(ids_a) ^ set(ids_b))} image ids in only one, or "
                         f"different labels for the same images); compare experiments on the same dataset")
    evaluation = a.cfg.evaluation
    if not evaluation.bootstrap:
        raise InputError(f"{Layout(exp_a).config}: evaluation.bootstrap is 0; compare needs resamples")
    weights, units, resampled = resampling(a.frame["patient_id"].to_numpy(), evaluation.bootstrap, evaluation.seed,
                                           evaluation.bootstrap_unit)
    result = paired_auroc_comparison(a.truth, a.scores, b.scores, a.labels, weights,
                                     units if evaluation.bootstrap_unit == "patient" else None)
    calibration = paired_calibration_comparison(a.truth, a.scores, b.scores, a.labels, weights,
                                                evaluation.calibration_bins, evaluation.min_positives,
                                                evaluation.min_negatives)
    who = {"A": privacy_of(exp_a), "B": privacy_of(exp_b)}
    comparison = {"experiment_a": str(exp_a), "experiment_b": str(exp_b), "privacy_a": who["A"],
                  "privacy_b": who["B"], "split": split, "n_images": len(ids_a),
                  "bootstrap": {**resampled, "paired": True}, **result, "calibration": calibration}

    rows = []
    for label, m, c in [("mean (primary endpoint)", None, calibration["mean"]),
                        *((key, m, calibration["labels"][key]) for key, m in result["labels"].items())]:
        boot = m["bootstrap"] if m else result["auroc_mean"]
        ci = boot["ci95"] or [None, None]
        rows.append({"label": label, "auroc_a": m["auroc_a"] if m else result["auroc_mean_a"],
                     "auroc_b": m["auroc_b"] if m else result["auroc_mean_b"], "difference": boot["difference"],
                     "ci95_low": ci[0], "ci95_high": ci[1], "p_bootstrap": boot["p_value"],
                     "p_holm": boot.get("p_holm"), "p_a_not_better": boot["p_a_not_better"],
                     "p_delong": m["delong"].get("p_value") if m else None,
                     "p_delong_image_level": m["delong_image_level"].get("p_value") if m else None})
        for name in PAIRED:
            ci = c[name]["ci95"] or [None, None]
            rows[-1].update({f"{name}_a": c[name]["a"], f"{name}_b": c[name]["b"],
                             f"{name}_difference": c[name]["difference"], f"{name}_ci95_low": ci[0],
                             f"{name}_ci95_high": ci[1]})
    table = pd.DataFrame(rows)
    out_dir = Path(out_dir) if out_dir else exp_a.parent / "comparisons" / f"{exp_a.name}__vs__{exp_b.name}__{split}"
    if (out_dir / "comparison.json").exists():
        print(f"replacing the comparison in {out_dir} (recomputed)")
    atomic_write_text(out_dir / "comparison.json", json_text(comparison))
    atomic_write_text(out_dir / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / "report.html", comparison_report(
        f"A = {exp_a.name} vs B = {exp_b.name} ({split} split, {len(ids_a)} images)",
        a.labels, a.truth, a.scores, b.scores, table.drop(columns=CALIBRATION_COLUMNS),
        calibration_part(table), calibration["bins"],
        {"A": f"{exp_a.name}: {who['A']}", "B": f"{exp_b.name}: {who['B']}"}))
    return comparison, table, out_dir


def privacy_of(exp_dir: Path) -> str:
    """An experiment's privacy in a few words (epsilon rounded up, as released)."""
    files = Layout(exp_dir)
    if not files.summary.is_file():
        return "privacy unknown (no private/summary.json)"
    dp = read_json(files.summary)["dp"]
    if not dp["enabled"]:
        return "not private (trained without differential privacy)"
    epsilon = worst_patient_epsilon(dp)
    if not math.isfinite(epsilon):
        return "not private for the patients its starting weights were trained on (see its privacy statement)"
    return f"private, epsilon {rounded_up(epsilon):g} (delta {dp['delta']:g}) per training {dp['unit']}"


def format_comparison(table: pd.DataFrame) -> str:
    """The AUROC columns, then the calibration ones (intervals only) under a heading of their own."""
    shown = table.copy()
    for column in [c for c in table.columns if c.startswith("p_")]:
        shown[column] = [format_p(v) for v in table[column]]
    options = {"index": False, "float_format": lambda v: f"{v:.4f}", "na_rep": "n/a"}
    return (shown.drop(columns=CALIBRATION_COLUMNS).to_string(**options)
            + "\ncalibration, A - B with 95% intervals (descriptive, no p-values):\n"
            + calibration_part(shown).to_string(**options))


def calibration_part(table: pd.DataFrame) -> pd.DataFrame:
    """The label and calibration columns of a comparison table; its first row is the mean over labels
    (not the primary endpoint, which is the mean AUROC difference)."""
    return table[["label", *CALIBRATION_COLUMNS]].assign(label=["mean over labels", *table["label"][1:]])
