"""Privacy budget sweep table: accuracy and fairness per epsilon, and their correlation with epsilon.

As in the study, Pearson's r (with its two-sided p-value, scipy) between epsilon and each fairness
metric is computed over the private runs only; the non-private run (epsilon = inf) is the reference.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import pearsonr
from torch.utils.tensorboard import SummaryWriter


def sweep_row(target_epsilon: float, summary: dict, metrics: dict, fairness: dict) -> dict:
    """One row: budget, accounting, mean AUROC with interval, label-averaged fairness metrics."""
    ci = metrics.get("auroc_mean_ci95") or [None, None]
    row = {"epsilon": target_epsilon, "epsilon_spent": summary["dp"]["epsilon_spent"],
           "noise_multiplier": summary["dp"]["noise_multiplier"], "auroc_mean": metrics["auroc_mean"],
           "auroc_mean_ci95_low": ci[0], "auroc_mean_ci95_high": ci[1]}
    for attribute, fair in fairness["fairness"].items():
        for name, value in fair["mean"].items():
            if isinstance(value, dict):  # statistical parity difference, per group
                row.update({f"{attribute}_spd_{group}": v for group, v in value.items()})
            else:
                row[f"{attribute}_{name}"] = value
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


def correlations(table: pd.DataFrame) -> dict:
    """Pearson's r and p between epsilon and every fairness column, over the private runs."""
    private = table[np.isfinite(table["epsilon"].astype(float))]
    fairness_columns = [c for c in table.columns if c.startswith(("sex_", "age_"))]
    out = {}
    for column in fairness_columns:
        values = private[["epsilon", column]].dropna().astype(float)
        if len(values) < 2 or values[column].nunique() < 2 or values["epsilon"].nunique() < 2:
            out[column] = {"r": None, "p_value": None, "n": len(values),
                           "note": "not estimable: needs two private budgets with different values"}
            continue
        result = pearsonr(values["epsilon"], values[column])
        p = float(result.pvalue)
        out[column] = {"r": float(result.statistic), "p_value": p if math.isfinite(p) else None, "n": len(values)}
    return out


def log_sweep_hparams(logdir, table: pd.DataFrame) -> None:
    """One TensorBoard hparams run per budget: epsilon against AUROC and the fairness metrics."""
    with SummaryWriter(str(logdir)) as writer:
        for row in table.to_dict(orient="records"):
            metrics = {f"sweep/{k}": float(v) for k, v in row.items()
                       if k not in ("epsilon", "noise_multiplier", "epsilon_spent") and v is not None and np.isfinite(v)}
            writer.add_hparams({"epsilon": float(row["epsilon"]) if np.isfinite(row["epsilon"]) else 1e9,
                                "private": bool(np.isfinite(row["epsilon"]))}, metrics,
                               run_name=f"eps_{row['epsilon']:g}")
