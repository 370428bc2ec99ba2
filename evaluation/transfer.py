"""Transfer matrix: every trained model scored on every dataset (external validation at scale).

Rows are models (by what they were trained on), columns the datasets they are tested on; a cell is the
mean AUROC over the labels the tested dataset has, with its patient-bootstrap interval, computed by
``predict --data`` into the model's ``external/`` folder and reused while model and settings are
unchanged. Per tested dataset, each private model is compared with every non-private model trained on
the same data: the paired difference of mean AUROC on the same images and resamples of patients
(``evaluation.compare.paired_auroc_comparison``), so "the private model transfers worse" carries an
interval rather than a difference of two point estimates.

A cell also carries calibration-in-the-large: the observed/expected ratio (observed positives over
the sum of predicted probabilities, 1 = calibrated in the large, above 1 the model under-predicts)
averaged over labels, with its patient-bootstrap interval, from the same ``predict --data`` results
(``evaluation.calibration``). A model can keep its AUROC on another site and still mis-state the
risk there: prevalence and acquisition differ, and miscalibration is the usual failure under shift.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from artifacts import Layout, read_json
from config import Config, InputError
from evaluation.bootstrap import resampling
from evaluation.compare import paired_auroc_comparison
from Prediction_DP import Source, config_key, external_config, external_folder, load_source, predict_external


def dataset_name(data: Config) -> str:
    return f"{data.data.dataset}-{data.data.site}"


def score_cell(source: Source, data: Config, split: str) -> tuple[dict, Path, bool]:
    """(metrics, folder, reused) of ``source`` on ``split`` of ``data``: the results of an earlier
    ``predict --data`` are reused when they are of the same checkpoint and settings and have the
    calibration (results of a version without it are recomputed)."""
    cfg = external_config(source, data)
    folder = external_folder(source, cfg.data.dataset, cfg.data.site, split, None)
    earlier = Layout(folder).results / f"{split}_metrics.json"
    if earlier.is_file():
        metrics = read_json(earlier)
        about = metrics.get("data") or {}
        if (about.get("config_key") == config_key(cfg) and about.get("source") == str(source.path.resolve())
                and metrics.get("checkpoint_epoch") == source.epoch and "calibration_mean" in metrics):
            return metrics, folder, True
    metrics, folder = predict_external(source, data, split)
    return metrics, folder, False


def _predictions(folder: Path, split: str, labels: list[str]) -> pd.DataFrame:
    frame = pd.read_csv(Layout(folder).predictions / f"{split}.csv", dtype={"patient_id": str, "image_id": str})
    return frame[["image_id", "patient_id"] + labels + [f"{label}_score" for label in labels]]


def privacy_cost(rows: list[dict], cells: dict, split: str, evaluation) -> list[dict]:
    """Per tested dataset, each private row minus each non-private row trained on the same data from
    the same start (scratch or the same pretrained checkpoint):
    paired mean-AUROC difference with its bootstrap interval (patients resampled as configured)."""
    out = []
    for column, data in cells.items():
        for private in (r for r in rows if r["private"]):
            for reference in (r for r in rows if not r["private"] and r["trained_on"] == private["trained_on"]
                              and r["pretrained_from"] == private["pretrained_from"]):
                a, b = data[private["row"]], data[reference["row"]]
                labels = a["metrics"]["data"]["labels"]
                if b["metrics"]["data"]["labels"] != labels:
                    continue  # models with other labels: no common endpoint
                pa, pb = _predictions(a["folder"], split, labels), _predictions(b["folder"], split, labels)
                if not pa["image_id"].equals(pb["image_id"]):
                    raise InputError(f"{a['folder']} and {b['folder']} scored different images of {column}")
                weights, units, info = resampling(pa["patient_id"].to_numpy(), evaluation.bootstrap, evaluation.seed,
                                                  evaluation.bootstrap_unit)
                truth = pa[labels].to_numpy(dtype=float)
                result = paired_auroc_comparison(truth, pa[[f"{x}_score" for x in labels]].to_numpy(),
                                                 pb[[f"{x}_score" for x in labels]].to_numpy(), labels, weights,
                                                 units if evaluation.bootstrap_unit == "patient" else None)
                mean = result["auroc_mean"]
                out.append({"tested_on": column, "private": private["row"], "non_private": reference["row"],
                            "auroc_private": result["auroc_mean_a"], "auroc_non_private": result["auroc_mean_b"],
                            "difference": mean["difference"], "ci95": mean["ci95"], "p_value": mean["p_value"],
                            "images": len(pa), "bootstrap": info})
    return out


def transfer_matrix(experiments: list[Path], datasets: list[Config], split: str = "test") -> dict:
    """Score each of ``experiments`` (experiment folders or release bundles) on ``split`` of each of
    ``datasets``; return rows, columns, cells and the private-minus-non-private comparisons.

    Rows are ordered by training data, non-private first, then by decreasing epsilon, so each private
    model sits beside its non-private counterpart."""
    if not experiments or not datasets:
        raise InputError("transfer: give at least one experiment (--experiments) and one data config (--data)")
    names = [dataset_name(d) for d in datasets]
    if len(set(names)) != len(names):
        raise InputError(f"transfer: two data configs describe the same dataset and site ({names}); give each once")
    if not datasets[0].evaluation.bootstrap:
        raise InputError("transfer: evaluation.bootstrap is 0 in the first data config; intervals need resamples")
    sources = [load_source(path) for path in experiments]
    rows = [{"row": src.path.name, "path": str(src.path), "trained_on": src.trained_on,
             "pretrained_from": src.pretrained_from, "private": src.epsilon is not None, "epsilon": src.epsilon}
            for src in sources]
    if len({r["row"] for r in rows}) != len(rows):
        raise InputError(f"transfer: two experiments share a folder name ({[r['row'] for r in rows]}); rename one")
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["trained_on"], rows[i]["pretrained_from"] or "",
                                                   rows[i]["private"],
                                                   -(rows[i]["epsilon"] or 0) if rows[i]["private"] else 0))
    rows, sources = [rows[i] for i in order], [sources[i] for i in order]
    cells, table = {name: {} for name in names}, []
    for source, row in zip(sources, rows):
        for name, data in zip(names, datasets):
            metrics, folder, reused = score_cell(source, data, split)
            print(f"{row['row']} on {name}: mean AUROC {metrics['auroc_mean']:.3f}" + (" (reused)" if reused else ""))
            cells[name][row["row"]] = {"metrics": metrics, "folder": folder}
            ci = metrics.get("auroc_mean_ci95") or [math.nan, math.nan]
            ratio = (metrics["calibration_mean"] or {}).get("observed_expected") or {}
            ratio_ci = ratio.get("ci95") or [math.nan, math.nan]
            about = metrics["data"]
            table.append({"trained_on": row["trained_on"], "pretrained_from": row["pretrained_from"] or "",
                          "experiment": row["row"],
                          "privacy": "non-private" if not row["private"] else f"epsilon {row['epsilon']:.3g}",
                          "tested_on": name, "in_distribution": name == row["trained_on"],
                          "images": len(pd.read_csv(Layout(folder).predictions / f"{split}.csv", usecols=[0])),
                          "labels_scored": len(about["labels"]), "labels_absent": ", ".join(about["absent"]),
                          "auroc_mean": metrics["auroc_mean"], "ci95_low": ci[0], "ci95_high": ci[1],
                          "observed_expected_mean": ratio.get("value"), "observed_expected_ci95_low": ratio_ci[0],
                          "observed_expected_ci95_high": ratio_ci[1], "folder": str(folder)})
    comparisons = privacy_cost(rows, cells, split, datasets[0].evaluation)
    return {"split": split, "rows": rows, "columns": names, "table": table,
            "private_minus_non_private": comparisons,
            "note": "cells: mean AUROC over the labels the tested dataset has, at the model's own thresholds, and "
                    "the observed/expected ratio averaged over the labels estimable there (calibration-in-the-large, "
                    "1 = calibrated, above 1 the model under-predicts); in-distribution cells score the model's own "
                    "test split"}


def matrix(result: dict, column: str = "auroc_mean") -> np.ndarray:
    """Rows x columns array of one column of the transfer table."""
    frame = pd.DataFrame(result["table"]).set_index(["experiment", "tested_on"])[column]
    return np.array([[frame[(r["row"], c)] for c in result["columns"]] for r in result["rows"]], dtype=float)
