"""Privacy audit of a trained model: membership inference and a one-run lower bound on epsilon.

Membership inference. Members are the training images, non-members the test images (patients the
model never saw: splits are by patient). An attack scores each image, higher = "was trained on":

- ``loss``: minus the image's training loss (Yeom et al. 2018);
- ``lira_offline``: the offline likelihood-ratio attack (Carlini et al. 2022) when reference runs
  exist. phi(x) = mean over labelled findings of (2y - 1) * logit, the logit-scaled confidence in the
  true labels; the score is z = (phi_target(x) - mu_out(x)) / sigma_out, with mu_out(x) the mean of
  phi over the reference runs that did not train on x's patient and sigma_out one pooled standard
  deviation (Carlini et al.'s fixed variance, stable with few reference runs).

Reported per attack, overall and per sex and age group: AUROC and TPR at 1% and 0.1% FPR, with
percentile bootstrap intervals (images resampled, the same resamples for every attack).

One-run bound (Steinke, Nasr & Jagielski 2023). m canaries are each trained on by a fair coin. The
attack guesses "in" for the r/2 canaries it scores highest and "out" for the r/2 lowest; W of the r
guesses are right. Under (eps, delta)-DP, with f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v],

    P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,

so the right-hand side is a p-value for the claim "(eps, delta)-DP holds". The bound is the largest
eps rejected at 95% confidence; it is computed for a fixed grid of r with the significance split
among them (Bonferroni), so choosing the best r afterwards keeps the 95%.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

from config import InputError
from evaluation.bootstrap import percentile_interval, weighted_auroc, weighted_tpr_at_fpr
from evaluation.fairness import group_names, groups_of

FPR_LEVELS = (0.01, 0.001)
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # r / m tried, fixed before seeing any score


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` or more right guesses out of ``r`` on ``m`` canaries under (epsilon, delta)-DP."""
    q = float(expit(epsilon))
    beta = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v <= 0:
        return beta
    i = np.arange(1, v + 1)
    alpha = float(np.max((binom.sf(v - i - 1, r, q) - beta) / i))
    return min(1.0, beta + 2 * m * delta * alpha)


def one_run_epsilon_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """Largest epsilon whose (epsilon, delta)-DP claim ``v`` right guesses of ``r`` reject at
    ``significance``; 0 when not even epsilon = 0 is rejected."""
    def rejected(epsilon: float) -> float:  # > 0 while the claim is rejected
        return significance - one_run_p_value(m, r, v, epsilon, delta)

    if r == 0 or rejected(0.0) <= 0:
        return 0.0
    high = 1.0
    while rejected(high) > 0:
        high *= 2
    return float(brentq(rejected, high / 2 if high > 1 else 0.0, high, xtol=1e-6))


def guess_counts(m: int) -> list[int]:
    """The even numbers of guesses r tried on m canaries."""
    return sorted({max(2, 2 * round(f * m / 2)) for f in GUESS_FRACTIONS if f * m >= 2}) if m >= 2 else []


def canary_bound(score: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95) -> dict:
    """Guess the coins from the canaries' attack scores and bound epsilon from below (see module doc)."""
    m = len(score)
    order = np.argsort(-score, kind="stable")
    included = np.asarray(included, bool)[order]
    grid = guess_counts(m)
    significance = (1 - confidence) / max(len(grid), 1)
    rows = []
    for r in grid:
        half = r // 2
        right = int(included[:half].sum() + (~included[m - half:]).sum())
        rows.append({"guesses": r, "correct": right, "precision": right / r,
                     "epsilon_lower_bound": one_run_epsilon_bound(m, r, right, delta, significance)})
    best = max(rows, key=lambda row: row["epsilon_lower_bound"], default=None)
    return {"canaries": m, "included": int(included.sum()), "confidence": confidence, "delta": delta,
            "significance_per_guess_count": significance, "grid": rows,
            "epsilon_lower_bound": best["epsilon_lower_bound"] if best else 0.0,
            "guesses": best["guesses"] if best else 0, "correct": best["correct"] if best else 0}


def membership_candidates(frame: pd.DataFrame, labels: list[str], exclude: set) -> pd.DataFrame:
    """Members (train split) and non-members (test split) with at least one label, ``member`` 0/1.

    ``exclude``: image ids left out (canaries: their labels were changed). Unlabelled images have no
    loss and are left out too. A patient on both sides is refused: it would leak membership.
    """
    keep = frame["split"].isin(["train", "test"]) & frame[labels].notna().any(axis=1) & ~frame["image_id"].isin(exclude)
    out = frame[keep].reset_index(drop=True).assign(member=lambda f: (f["split"] == "train").astype(int))
    shared = set(out.loc[out["member"] == 1, "patient_id"]) & set(out.loc[out["member"] == 0, "patient_id"])
    if shared:
        raise InputError(f"patient {sorted(shared)[0]!r} has images in both the train and the test split: "
                         f"members and non-members must be different patients")
    return out


def signed_logit(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """phi per image: mean over labelled findings of (2y - 1) * logit (logit-scaled confidence)."""
    labelled = ~torch.isnan(targets)
    signed = torch.where(labelled, (2 * torch.nan_to_num(targets) - 1) * logits, 0.0)
    return (signed.sum(dim=1) / labelled.sum(dim=1).clamp(min=1)).double().numpy()


def lira_offline(target: np.ndarray, reference: np.ndarray, out: np.ndarray) -> np.ndarray:
    """z-scores of offline LiRA: ``reference`` [K, n] phi of K reference runs, ``out`` [K, n] whether
    run k left image i out. NaN where no reference run left the image out."""
    count = out.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(out, reference, 0.0).sum(axis=0) / count
        residual = np.where(out, reference - mu, 0.0)
        dof = int(count.sum() - (count > 0).sum())
        sigma = np.sqrt((residual ** 2).sum() / dof) if dof > 0 else np.nan
        z = (target - mu) / sigma if sigma > 0 else np.full_like(target, np.nan)
    return np.where(count > 0, z, np.nan)


def attack_metrics(member: np.ndarray, score: np.ndarray, weights: np.ndarray, min_size: int = 1) -> dict:
    """AUROC and TPR at each of ``FPR_LEVELS`` with percentile intervals under ``weights`` [B, n]."""
    member = np.asarray(member, bool)
    entry = {"members": int(member.sum()), "nonmembers": int((~member).sum())}
    if min(entry.values()) < min_size:
        return {**entry, "estimable": False,
                "reason": f"fewer than {min_size} members or non-members"}
    full = np.ones((1, len(member)), dtype=np.float32)
    metrics = {"auroc": (weighted_auroc, {})}
    metrics.update({f"tpr_at_fpr_{level:g}": (weighted_tpr_at_fpr, {"fpr": level}) for level in FPR_LEVELS})
    out = {**entry, "estimable": True}
    for name, (fn, extra) in metrics.items():
        out[name] = {"value": float(fn(member, score, full, **extra)[0]),
                     "ci95": percentile_interval(fn(member, score, weights, **extra))}
    return out


def attack_report(member: np.ndarray, score: np.ndarray, weights: np.ndarray, sex: np.ndarray, age: np.ndarray,
                  edges: list[float], min_size: int) -> dict:
    """Attack metrics overall and per sex and age group (images with a score only)."""
    keep = np.isfinite(score)
    member, score, weights, sex, age = member[keep], score[keep], weights[:, keep], sex[keep], age[keep]
    names = group_names(sex, age, edges)
    return {"scored": int(keep.sum()), "overall": attack_metrics(member, score, weights),
            "subgroups": {attribute: {group: attack_metrics(member[mask], score[mask], weights[:, mask], min_size)
                                      for group in groups_of(attribute, edges) for mask in [names[attribute] == group]}
                          for attribute in ("sex", "age")}}


def attack_table(audit: dict) -> pd.DataFrame:
    """One row per attack and group: sizes, AUROC and TPRs with their intervals."""
    rows = []
    for attack, result in audit["attacks"].items():
        groups = [("all", "all", result["overall"])] + [
            (attribute, group, entry) for attribute, entries in result["subgroups"].items()
            for group, entry in entries.items()]
        for attribute, group, entry in groups:
            row = {"attack": attack, "attribute": attribute, "group": group, "members": entry["members"],
                   "nonmembers": entry["nonmembers"]}
            for name in ["auroc"] + [f"tpr_at_fpr_{level:g}" for level in FPR_LEVELS]:
                metric = entry.get(name) or {}
                ci = metric.get("ci95") or [None, None]
                row.update({name: metric.get("value"), f"{name}_ci95_low": ci[0], f"{name}_ci95_high": ci[1]})
            rows.append(row)
    return pd.DataFrame(rows)
