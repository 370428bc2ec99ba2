"""The built-in dataset is deterministic, split by patient, and draws each finding where it belongs."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

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


def _edited_generator(tmp_path, monkeypatch, old: str, new: str):
    """A copy of data/synthetic.py with ``old`` replaced by ``new``, imported under another name."""
    source = Path(synthetic.__file__).read_text(encoding="utf-8")
    assert source.count(old) == 1, old
    path = tmp_path / "edited_synthetic.py"
    path.write_text(source.replace(old, new), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("edited_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # for its dataclass
    spec.loader.exec_module(module)
    return module


def test_the_cache_is_keyed_by_the_generator_not_only_its_version(tmp_path, monkeypatch):
    folder = synthetic.synthetic_folder(tmp_path, 48, N, 3)
    # a change to how the images are drawn, without a GENERATOR_VERSION bump: another folder
    brighter = _edited_generator(tmp_path, monkeypatch, "np.clip(img / 0.75, 0.0, 1.0)",
                                 "np.clip(img / 0.74, 0.0, 1.0)")
    assert brighter.synthetic_folder(tmp_path, 48, N, 3) != folder
    assert brighter.render(_case(), SIZE).sum() > synthetic.render(_case(), SIZE).sum()  # it did change the pixels
    # wording of comments and docstrings draws nothing new: the same folder, wherever the code lies
    reworded = _edited_generator(tmp_path, monkeypatch, "# Breast shadows over the lower lung fields in women.",
                                 "# Breast shadows (women).")
    assert reworded.synthetic_folder(tmp_path, 48, N, 3) == folder
    reworded = _edited_generator(tmp_path, monkeypatch, '"""Soft step from 1', '"""A soft step from 1')
    assert reworded.synthetic_folder(tmp_path, 48, N, 3) == folder
    # a parameter changed in the running process (as a test or a notebook would)
    monkeypatch.setattr(synthetic, "SUBCLINICAL", (0.6, 0.10))
    assert synthetic.synthetic_folder(tmp_path, 48, N, 3) != folder


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
    case.severity = {label: 0.0 for label in synthetic.LABELS}
    case.noise = 0.0
    return case


def _difference(label: str, severity: float = 1.0) -> np.ndarray:
    """Pixels the finding adds: the same patient and noise drawn with and without it."""
    base = _case()
    sick = copy.deepcopy(base)
    sick.severity[label] = severity
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
def test_more_severe_is_more_visible(label):
    amounts = [np.abs(_difference(label, severity)).sum() for severity in (0.15, 0.4, 0.7, 1.0)]
    assert amounts[0] < amounts[1] < amounts[2] < amounts[3]


def test_the_grade_is_the_readers_and_is_not_drawn():
    case = _case()
    case.severity["cardiomegaly"] = 0.8
    image = synthetic.render(case, SIZE)
    for grade in (1, 4, 5):  # "not assessable" or a miss changes the label, never the pixels
        case.grades = {label: grade for label in synthetic.LABELS}
        assert np.array_equal(synthetic.render(case, SIZE), image)


def _read(severity: float, n: int = 4000, site: str = "public") -> np.ndarray:
    rng = np.random.default_rng(0)
    truth = {label: severity for label in synthetic.LABELS}
    return np.array([list(synthetic.read_grades(rng, truth, site).values()) for _ in range(n)])


def test_readers_disagree_most_on_borderline_findings():
    positive = {s: np.isin(_read(s), [3, 4]).mean() for s in (0.0, 0.1, 0.42, 0.95)}
    assert positive[0.0] < 0.02 and positive[0.1] < 0.05  # absent or trivial: rarely called
    assert 0.3 < positive[0.42] < 0.7  # borderline: a coin flip between readers
    assert 0.85 < positive[0.95] < 0.99  # gross: called, but now and then missed
    grades = _read(0.42)
    assert 0.01 < (grades == 5).mean() < 0.04  # "not assessable" whatever is there
    assert (grades == 2).mean() > 0.2  # the grade-2 zone is wide


def test_labels_follow_the_drawn_truth():
    frame, cases = synthetic.build_master_list({"public": 300, "private": 300}, seed=0)
    for label in synthetic.LABELS:
        severity = np.array([case.severity[label] for case in cases])
        positive = frame[label].isin([3, 4]).to_numpy()
        assert positive[severity > 0.7].mean() > 0.8 > 0.05 > positive[severity < 0.15].mean()


def test_sites_differ_in_acquisition():
    frame, cases = synthetic.build_master_list({"public": 300, "private": 300}, seed=0)
    private = frame["site"].to_numpy() == "private"
    ap = frame["view"].to_numpy() == "AP"
    assert ap[private].mean() > ap[~private].mean() + 0.2  # more bedside (AP) films
    public_case = next(c for c in cases if c.site == "public")
    private_case = next(c for c in cases if c.site == "private")
    assert public_case.marker is None and private_case.marker is not None

    def grain(case):  # high-frequency energy: quantum noise
        image = synthetic.render(case, SIZE).astype(float)
        return np.abs(np.diff(image, axis=1)).mean()

    noisier = [grain(c) for c in cases if c.site == "private"][:30]
    cleaner = [grain(c) for c in cases if c.site == "public"][:30]
    assert np.mean(noisier) > 1.15 * np.mean(cleaner)
