"""The built-in dataset is deterministic, split by patient, and draws each finding where it belongs."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from data import synthetic
from data.adapters import binarize_grades

N = {"public": 8, "private": 12}
SIZE = 96


def test_generation_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", 48, N, seed=3, workers=1)
    b = synthetic.generate(tmp_path / "b", 48, N, seed=3, workers=1)
    frame = pd.read_csv(a / "master_list.csv")
    assert frame.equals(pd.read_csv(b / "master_list.csv"))
    for image_id, site in zip(frame["image_id"], frame["subset"]):
        image = f"UKA_preprocessed/{site}/{image_id}.jpg"
        assert (a / image).read_bytes() == (b / image).read_bytes()
    other = synthetic.generate(tmp_path / "c", 48, N, seed=4, workers=1)
    assert not frame.equals(pd.read_csv(other / "master_list.csv"))


def test_cache_is_reused(tmp_path):
    folder = synthetic.generate(tmp_path, 48, N, seed=3, workers=1)
    marker = (folder / "done.json").stat().st_mtime_ns
    assert synthetic.generate(tmp_path, 48, N, seed=3, workers=1) == folder
    assert (folder / "done.json").stat().st_mtime_ns == marker


def test_master_list_shape_and_patient_split():
    frame, _ = synthetic.build_master_list({"public": 200, "private": 300}, seed=0)
    expected = ["image_id", "patient_id", "split", "subset", "site", "gender", "age", "view", *synthetic.LABELS]
    assert list(frame.columns) == expected
    assert frame["image_id"].is_unique
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(frame["split"]) == {"train", "valid", "test"} and set(frame["site"]) == {"public", "private"}
    assert set(frame["gender"]) == {"F", "M"} and (frame["subset"] == frame["site"]).all()
    assert frame[list(synthetic.LABELS)].isin([1, 2, 3, 4, 5]).all().all()
    # Older patients carry more findings.
    positives = frame[list(synthetic.LABELS)].isin([3, 4]).sum(axis=1)
    assert positives[frame["age"] >= 70].mean() > 1.5 * positives[frame["age"] < 50].mean()


def test_grades_3_and_4_are_positive():
    grades = pd.Series([1, 2, 3, 4, 5, np.nan])
    assert binarize_grades(grades, "x.csv", "cardiomegaly").tolist()[:5] == [0, 0, 1, 1, 0]
    assert np.isnan(binarize_grades(grades, "x.csv", "cardiomegaly")[5])  # not assessed: unlabelled


def _case():
    rng = np.random.default_rng(1)
    case = synthetic.sample_patient_cases(rng, "public", 123)[0]
    case.grades = {label: 1 for label in synthetic.LABELS}
    case.noise = 0.0
    return case


def _difference(label: str, grade: int = 4) -> np.ndarray:
    """Pixels the finding adds: the same patient and noise drawn with and without it."""
    base = _case()
    sick = copy.deepcopy(base)
    sick.grades[label] = grade
    return synthetic.render(sick, SIZE).astype(float) - synthetic.render(base, SIZE).astype(float)


def _share(diff, rows, cols):
    """Share of the positive difference (added opacity) inside the given region."""
    added = np.clip(diff, 0, None)
    r0, r1 = int(rows[0] * SIZE), int(rows[1] * SIZE)
    c0, c1 = int(cols[0] * SIZE), int(cols[1] * SIZE)
    return added[r0:r1, c0:c1].sum() / added.sum()


IMAGE_LEFT, IMAGE_RIGHT = (0.0, 0.5), (0.5, 1.0)  # the patient's right is on the image's left


@pytest.mark.parametrize("label, rows, cols, share", [
    ("pleural_effusion_right", (0.35, 1.0), IMAGE_LEFT, 0.9),
    ("pleural_effusion_left", (0.35, 1.0), IMAGE_RIGHT, 0.9),
    ("pneumonic_infiltrates_right", (0.3, 0.9), IMAGE_LEFT, 0.9),
    ("pneumonic_infiltrates_left", (0.3, 0.9), IMAGE_RIGHT, 0.9),
    ("atelectasis_right", (0.5, 1.0), IMAGE_LEFT, 0.85),
    ("atelectasis_left", (0.5, 1.0), IMAGE_RIGHT, 0.85),
])
def test_lateralised_findings_are_drawn_on_their_side(label, rows, cols, share):
    diff = _difference(label)
    assert np.clip(diff, 0, None).sum() > 50 * 255 / 10  # visible, not a few grey levels
    assert _share(diff, rows, cols) >= share


def test_effusion_meniscus_rises_laterally():
    diff = _difference("pleural_effusion_right")
    opaque = diff > 10
    lateral_col, medial_col = int(0.22 * SIZE), int(0.42 * SIZE)
    top = {c: np.argmax(opaque[:, c]) for c in (lateral_col, medial_col) if opaque[:, c].any()}
    assert top[lateral_col] < top[medial_col]  # fluid reaches higher at the chest wall


def test_cardiomegaly_widens_the_heart_to_the_patients_left():
    diff = _difference("cardiomegaly")
    assert _share(diff, (0.4, 0.95), (0.3, 0.95)) > 0.9
    assert _share(diff, (0.4, 0.95), IMAGE_RIGHT) > 0.6


def test_congestion_is_perihilar_and_bilateral():
    diff = _difference("congestion")
    left, right = _share(diff, (0.25, 0.7), IMAGE_LEFT), _share(diff, (0.25, 0.7), IMAGE_RIGHT)
    assert left > 0.3 and right > 0.3 and left + right > 0.85


@pytest.mark.parametrize("label", synthetic.LABELS)
def test_higher_grade_is_more_visible(label):
    amounts = [np.abs(_difference(label, grade)).sum() for grade in (2, 3, 4)]
    assert amounts[0] < amounts[1] < amounts[2]
    assert np.abs(_difference(label, 5)).sum() == 0  # "not assessable" draws nothing
