"""Readers for public chest-radiograph datasets, each in the layout its publisher distributes.

Every reader ``(root, data) -> (table, native label names)`` returns one table with the columns ``image_id``, ``path`` (relative to the dataset
root given in ``data.root``), ``patient_id``, ``split`` (the official split, or '' where the dataset
has none for that image), ``sex`` (F/M/''), ``age``, ``view`` (PA/AP/LATERAL/...) and one column per
native finding holding 1, 0, -1 (uncertain) or NaN (blank). Label policies, view filters and
seeded patient splits are applied afterwards, the same way for every dataset (``data/dataset.py``).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from config import Data, InputError

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")
NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
              "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position")


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"data.root: {path} not found")
    return pd.read_csv(path, **kwargs)


def _require(frame: pd.DataFrame, columns, source: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}")


def read_chexpert(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """CheXpert v1.0 / v1.0-small: ``train.csv`` and ``valid.csv`` in ``root``.

    ``Path`` is relative to the folder above the dataset folder; ``valid.csv`` (radiologist-labelled)
    is the official test split here, the validation split is drawn from ``train.csv`` by patient.
    """
    frames = []
    for name, split in (("train.csv", ""), ("valid.csv", "test")):
        source = root / name
        frame = _read_csv(source, dtype={"Path": str, "Sex": str})
        _require(frame, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS], source)
        patient = frame["Path"].str.extract(r"(patient\d+)", expand=False)
        if patient.isna().any():
            row = int(patient.isna().idxmax())
            raise InputError(f"{source}: row {row + 2}, column 'Path': no patientNNNNN in {frame['Path'][row]!r}")
        inside = frame["Path"].str.split("/", n=1).str[1]  # drop the dataset folder's own name
        frames.append(pd.DataFrame({
            "image_id": inside.str.replace(r"\.jpg$", "", regex=True), "path": inside,
            "patient_id": patient, "split": split,
            "sex": frame["Sex"].map({"Female": "F", "Male": "M"}).fillna(""),
            "age": pd.to_numeric(frame["Age"], errors="coerce"),
            "view": np.where(frame["Frontal/Lateral"] == "Lateral", "LATERAL", frame["AP/PA"].fillna("")),
            **{label: pd.to_numeric(frame[label], errors="coerce") for label in CHEXPERT_LABELS}}))
    return pd.concat(frames, ignore_index=True), CHEXPERT_LABELS


def _nih_age(value) -> float:
    """Integer ages, or the 2017 file's strings such as '058Y' (months/days: 'M', 'D')."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)([YMD]?)", text)
    if not match:
        return np.nan
    number, unit = int(match.group(1)), match.group(2)
    return number if unit in ("", "Y") else number / (12 if unit == "M" else 365)


def read_nih(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """NIH ChestX-ray14: ``Data_Entry_2017_v2020.csv`` (or the older ``Data_Entry_2017.csv``), the
    official ``train_val_list.txt`` / ``test_list.txt`` split, and ``images/<Image Index>``.

    The header's bracketed names contain commas, so columns are taken by position; the 2017 file's
    trailing comma and age strings ('058Y') are handled.
    """
    source = next((root / n for n in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv") if (root / n).is_file()),
                  root / "Data_Entry_2017_v2020.csv")
    raw = _read_csv(source, header=None, skiprows=1, dtype=str, keep_default_na=False)
    if raw.shape[1] < len(NIH_COLUMNS):
        raise InputError(f"{source}: expected at least {len(NIH_COLUMNS)} columns, found {raw.shape[1]}")
    raw = raw.iloc[:, :len(NIH_COLUMNS)].set_axis(NIH_COLUMNS, axis=1)
    findings = raw["Finding Labels"].str.split("|")
    unknown = sorted(set(findings.explode()) - set(NIH_LABELS) - {"No Finding"})
    if unknown:
        raise InputError(f"{source}: unknown finding(s) {unknown} in 'Finding Labels'")
    split = pd.Series("", index=raw.index)
    for name, value in (("train_val_list.txt", ""), ("test_list.txt", "test")):
        listed = root / name
        if listed.is_file():
            split[raw["Image Index"].isin(set(listed.read_text().split()))] = value
    frame = pd.DataFrame({
        "image_id": raw["Image Index"].str.replace(r"\.png$", "", regex=True),
        "path": "images/" + raw["Image Index"], "patient_id": raw["Patient ID"].str.strip(), "split": split,
        "sex": raw["Patient Gender"].str.strip().where(raw["Patient Gender"].str.strip().isin(["F", "M"]), ""),
        "age": raw["Patient Age"].map(_nih_age), "view": raw["View Position"].str.strip(),
        **{label: findings.map(lambda f, label=label: float(label in f)) for label in NIH_LABELS}})
    return frame, NIH_LABELS


SEX_CODES = {"F": "F", "FEMALE": "F", "W": "F", "M": "M", "MALE": "M", "": "", "U": "", "UNKNOWN": "", "O": ""}


def read_csv(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """An in-house CSV: one row per image, columns named in ``data.csv``; label columns are the
    configured ``data.labels`` (before ``data.label_map``), holding 1, 0, -1 (uncertain) or blank."""
    columns = data.csv
    source = Path(columns.file) if Path(columns.file).is_absolute() else root / columns.file
    raw = _read_csv(source, dtype=str, keep_default_na=False)
    inverse = {new: old for old, new in data.label_map.items()}
    label_columns = tuple(inverse.get(label, label) for label in data.labels)
    named = {"path": columns.path, "patient_id": columns.patient_id, "sex": columns.sex, "age": columns.age,
             "split": columns.split, "view": columns.view}
    _require(raw, [c for c in named.values() if c] + list(label_columns), source)

    def column(key: str, default: str = "") -> pd.Series:
        return raw[named[key]].str.strip() if named[key] else pd.Series(default, index=raw.index)

    sex = column("sex").str.upper().map(SEX_CODES)
    age_text = column("age")
    age = pd.to_numeric(age_text, errors="coerce")
    split = column("split").str.lower().replace({"validation": "valid", "validate": "valid", "val": "valid"})
    for name, bad, expected in (("sex", sex.isna(), f"one of {sorted(k for k in SEX_CODES if k)} or blank"),
                                ("age", age.isna() & (age_text != ""), "a number or blank"),
                                ("split", ~split.isin(["train", "valid", "test", ""]), "train, valid, test or blank")):
        if bad.any():
            row = int(bad.idxmax())
            raise InputError(f"{source}: row {row + 2}, column '{named[name]}': {raw[named[name]][row]!r}, "
                             f"expected {expected}")
    labels = {}
    for label in label_columns:
        values = pd.to_numeric(raw[label].replace("", np.nan), errors="coerce")
        bad = ~(values.isin([1, 0, -1]) | (raw[label] == ""))
        if bad.any():
            row = int(bad.idxmax())
            raise InputError(f"{source}: row {row + 2}, column '{label}': {raw[label][row]!r}, expected 1, 0, -1 or blank")
        labels[label] = values
    if raw[named["path"]].duplicated().any():
        row = int(raw[named["path"]].duplicated().idxmax())
        raise InputError(f"{source}: row {row + 2}, column '{named['path']}': duplicate image {raw[named['path']][row]!r}")
    frame = pd.DataFrame({"image_id": column("path").str.replace(r"\.\w+$", "", regex=True), "path": column("path"),
                          "patient_id": column("patient_id"), "split": split, "sex": sex, "age": age,
                          "view": column("view").str.upper(), **labels})
    return frame, label_columns


READERS = {"chexpert": read_chexpert, "nih": read_nih, "csv": read_csv}
