"""Training sets of a privacy audit: canaries of the audited run and halves of its reference runs.

Canaries (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run"): m training
patients with a labelled image are drawn (seeded) and each is trained on only if its own fair coin
says so; the others are left out, all their images. A canary is a whole patient, the privacy unit: its
coin adds or removes exactly one unit (the neighbouring datasets the bound is about), and no training
patient is ever split into several units (which would give them group-privacy epsilon). A canary's
labels are flipped on all its images (1 <-> 0, unlabelled stays unlabelled), so that a model that
memorises it fits it far better than one that never saw it. The coins are recorded per image in
``audit/canaries.csv``; the audit guesses them from the trained model alone, one score per canary
(the mean over its images).

Reference runs (offline LiRA, Carlini et al. 2022): reference run k trains, with the audited run's
settings, on a seeded random half of the patients of the train and test splits, so every image the
audit scores is left out of about half of the reference runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from config import InputError

CANARY_STREAM, REFERENCE_STREAM = 0xCA4A, 0x4EF  # distinct random streams of the same experiment seed


def draw_canaries(train: pd.DataFrame, labels: list[str], m: int, seed: int) -> pd.DataFrame:
    """``m`` training patients with a labelled image as canaries, one row per image: image_id,
    patient_id, ``included`` (the patient's coin, 0/1) and each label as trained on when included
    (flipped)."""
    patients = train["patient_id"].astype(str)
    eligible = np.sort(patients[train[labels].notna().any(axis=1)].unique())
    if m > len(eligible):
        raise InputError(f"audit.canaries = {m}: the training split has only {len(eligible)} patients with a "
                         f"labelled image to draw canaries from")
    rng = np.random.default_rng([seed, CANARY_STREAM])
    chosen = np.sort(rng.choice(eligible, size=m, replace=False))
    coins = dict(zip(chosen, rng.integers(0, 2, size=m)))
    rows = train[patients.isin(coins)]
    canaries = rows[["image_id", "patient_id"]].reset_index(drop=True)
    canaries["included"] = rows["patient_id"].astype(str).map(coins).to_numpy()
    canaries[labels] = 1.0 - rows[labels].to_numpy(np.float64)  # NaN (unlabelled) stays NaN
    return canaries


def with_canaries(train: pd.DataFrame, canaries: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """The training split as trained on: the canary patients whose coin is 0 left out, the others'
    labels flipped. Patient ids are unchanged: a canary is one whole training patient, one unit."""
    by_id = canaries.set_index("image_id")
    out = train[~train["image_id"].isin(by_id.index[by_id["included"] == 0])].reset_index(drop=True)
    inside = out["image_id"].isin(by_id.index)
    out.loc[inside, labels] = by_id.loc[out.loc[inside, "image_id"], labels].to_numpy()
    return out


def canary_scores(canaries: pd.DataFrame, image_scores: np.ndarray) -> pd.DataFrame:
    """One attack score per canary patient (the mean over its images): patient_id, images, included,
    score; the unit whose coin the audit guesses."""
    return (canaries[["patient_id", "included"]].assign(score=image_scores, images=1)
            .groupby("patient_id", sort=True).agg(images=("images", "sum"), included=("included", "first"),
                                                  score=("score", "mean")).reset_index())


def check_record(path: Path, canaries: pd.DataFrame, required: bool) -> str:
    """The record (CSV text) of ``canaries``; refused when ``path`` holds another draw (the data or the
    training split changed since the run started) or, if ``required``, holds nothing."""
    text = canaries.to_csv(index=False)
    if path.is_file() and path.read_text() != text:
        raise InputError(f"{path}: the recorded canaries differ from those drawn now from the same settings (the "
                         f"data or the training split changed since the run started)")
    if required and not path.is_file():
        raise InputError(f"{path}: the record of the canaries' coins is missing")
    return text


def reference_patients(patients: pd.Series, k: int, seed: int) -> np.ndarray:
    """Per row, whether its patient is in reference run ``k``'s half (a fair coin per patient)."""
    unique = np.sort(patients.astype(str).unique())
    coins = np.random.default_rng([seed, REFERENCE_STREAM, k]).integers(0, 2, size=len(unique)).astype(bool)
    return patients.astype(str).map(dict(zip(unique, coins))).to_numpy(bool)


def reference_training_split(frame: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """Reference run ``k``'s training images: its half of the train and test patients of ``frame``."""
    pool = frame[frame["split"].isin(["train", "test"])].reset_index(drop=True)
    return pool[reference_patients(pool["patient_id"], k, seed)].reset_index(drop=True).assign(split="train")
