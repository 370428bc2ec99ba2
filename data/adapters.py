"""Readers for public chest-radiograph datasets, each in the layout its publisher distributes.

Every reader ``(root, data) -> (table, native label names)`` returns one table with the columns
``image_id``, ``path`` (relative to the dataset root given in ``data.root``), ``patient_id``,
``split`` (the official split, or '' where the dataset has none for that image), ``sex`` (F/M/''),
``age``, ``view`` (PA/AP/LATERAL/...) and a column per native finding (at least the configured
ones) holding 1, 0, -1 (uncertain) or NaN (blank). Side merging, label names, view filters, label policies and seeded
patient splits are applied afterwards, the same way for every dataset (``data/dataset.py``).
"""
from __future__ import annotations

import ast
import posixpath
import re
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

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
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV table ({exc})") from None


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


def _age_years(value) -> float:
    """Integer ages, or DICOM age strings such as '058Y' (NIH's 2017 file, DICOM PatientAge; units
    Y, M, W, D); NaN when blank or unreadable."""
    match = re.fullmatch(r"(\d+)([YMWD]?)", str(value).strip())
    if not match:
        return np.nan
    return int(match.group(1)) / {"": 1, "Y": 1, "M": 12, "W": 365.25 / 7, "D": 365.25}[match.group(2)]


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
        "age": raw["Patient Age"].map(_age_years), "view": raw["View Position"].str.strip(),
        **{label: findings.map(lambda f, label=label: float(label in f)) for label in NIH_LABELS}})
    return frame, NIH_LABELS


SEX_CODES = {"F": "F", "FEMALE": "F", "W": "F", "M": "M", "MALE": "M", "": "", "U": "", "UNKNOWN": "", "O": ""}
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "validate": "valid", "val": "valid",
               "test": "test", "": ""}


def _reject(bad: pd.Series, values: pd.Series, source: Path, column: str, expected: str) -> None:
    """Raise for the first ``bad`` row, numbered as the file's line (header = line 1)."""
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise InputError(f"{source}: row {row + 2}, column '{column}': {values.iloc[row]!r}, expected {expected}")


def _codes(values: pd.Series, codes: dict, source: Path, column: str) -> pd.Series:
    """Map free-text codes (sex, split) case-insensitively; unknown ones are an input error."""
    mapped = values.fillna("").astype(str).str.strip().str.lower().map({k.lower(): v for k, v in codes.items()})
    _reject(mapped.isna(), values, source, column, f"one of {sorted(k for k in codes if k)} or blank")
    return mapped


def requested_columns(data: Data, columns) -> list[str]:
    """Source columns holding the configured labels: renamed back through ``data.label_map`` and, with
    ``data.merge_sides``, both ``X_right`` and ``X_left`` for a label ``X`` the source does not have."""
    inverse = {new: old for old, new in data.label_map.items()}
    out = []
    for label in data.labels:
        name = inverse.get(label, label)
        sides = [f"{name}_right", f"{name}_left"]
        out += sides if data.merge_sides and name not in columns and set(sides) <= set(columns) else [name]
    return out


def binarize_grades(grades: pd.Series, source: Path, label: str) -> pd.Series:
    """Study grading: 3 and 4 are positive; 1, 2 and other codes (5 = not assessable) negative.

    A blank grade means the finding was not assessed: NaN, then handled by ``data.blank``.
    """
    numeric = pd.to_numeric(grades, errors="coerce")
    _reject(~(numeric.isin([1, 2, 3, 4, 5]) | grades.isna()), grades, source, label, "a grade 1-5 or blank")
    return numeric.isin([3, 4]).astype(np.float32).where(grades.notna())


UKA_META = ("image_id", "patient_id", "split", "subset", "site", "gender", "age", "view")


def _master_list(root: Path) -> Path:
    candidates = [root / "master_list.csv"] if (root / "master_list.csv").is_file() else sorted(
        root.glob("*master_list.csv"))
    if len(candidates) != 1:
        found = f": {[c.name for c in candidates]}" if candidates else ""
        raise InputError(f"data.root: {root} holds {'several' if candidates else 'no'} master list "
                         f"(master_list.csv or *_master_list.csv){found}")
    return candidates[0]


def read_uka(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """UKA-CXR, the study's hospital layout: ``master_list.csv`` (or ``*_master_list.csv``) with
    ``image_id, split, subset, gender, age`` and one column of grades 1-4 (5 = not assessable) per
    finding, and images ``UKA_preprocessed/<subset>/<image_id>.jpg``.

    Optional columns: ``patient_id`` (else each image is its own patient; the given split is kept),
    ``view``, and ``site`` (rows filtered by ``data.site`` unless 'all'; the built-in synthetic
    dataset uses it). Every other column is a finding; only the configured ones are read.
    """
    source = _master_list(root)
    raw = _read_csv(source, dtype={"image_id": str, "patient_id": str, "subset": str, "gender": str, "view": str,
                                   "split": str})
    _require(raw, ["image_id", "split", "subset", "gender", "age"], source)
    native = tuple(c for c in raw.columns if c not in UKA_META and not c.startswith("Unnamed"))
    wanted = [c for c in requested_columns(data, native) if c in native]
    frame = pd.DataFrame({
        "image_id": raw["image_id"], "path": "UKA_preprocessed/" + raw["subset"] + "/" + raw["image_id"] + ".jpg",
        "patient_id": raw["patient_id"] if "patient_id" in raw else raw["image_id"],
        "split": _codes(raw["split"], SPLIT_NAMES, source, "split"),
        "sex": _codes(raw["gender"], SEX_CODES, source, "gender"),
        "age": pd.to_numeric(raw["age"], errors="coerce"),
        "view": raw["view"].fillna("").str.upper() if "view" in raw else "",
        **{label: binarize_grades(raw[label], source, label) for label in wanted}})
    if "site" in raw and data.site != "all":
        frame = frame[raw["site"] == data.site]
    return frame, native


def read_csv(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """An in-house CSV: one row per image, columns named in ``data.csv``; label columns are the
    configured ``data.labels`` (before ``data.label_map``), holding 1, 0, -1 (uncertain) or blank."""
    columns = data.csv
    source = Path(columns.file) if Path(columns.file).is_absolute() else root / columns.file
    raw = _read_csv(source, dtype=str, keep_default_na=False)
    named = {"path": columns.path, "patient_id": columns.patient_id, "sex": columns.sex, "age": columns.age,
             "split": columns.split, "view": columns.view}
    # a label without its column is named by load_table (an error, or absent when scoring another dataset)
    label_columns = tuple(c for c in requested_columns(data, raw.columns) if c in raw.columns)
    _require(raw, [c for c in named.values() if c], source)

    def column(key: str, default: str = "") -> pd.Series:
        return raw[named[key]].str.strip() if named[key] else pd.Series(default, index=raw.index)

    sex = _codes(column("sex"), SEX_CODES, source, named["sex"])
    split = _codes(column("split"), SPLIT_NAMES, source, named["split"])
    age = pd.to_numeric(column("age"), errors="coerce")
    _reject(age.isna() & (column("age") != ""), column("age"), source, named["age"], "a number or blank")
    labels = {}
    for label in label_columns:
        labels[label] = pd.to_numeric(raw[label].replace("", np.nan), errors="coerce")
        _reject(~(labels[label].isin([1, 0, -1]) | (raw[label] == "")), raw[label], source, label,
                "1, 0, -1 or blank")
    _reject(column("patient_id") == "", column("patient_id"), source, named["patient_id"], "a patient id")
    # the path is the image's id: img/05.png and img/05.jpg are two images
    frame = pd.DataFrame({"image_id": column("path").map(posixpath.normpath), "path": column("path"),
                          "patient_id": column("patient_id"), "split": split, "sex": sex, "age": age,
                          "view": column("view").str.upper(), **labels})
    return frame, label_columns


VIEW_CODES = {"L": "LATERAL", "LL": "LATERAL", "RL": "LATERAL", "AP_HORIZONTAL": "AP"}


def _views(codes: pd.Series) -> pd.Series:
    """Upper-case view codes, with the datasets' lateral and supine-AP spellings named LATERAL and AP
    so that one ``data.views`` filter means the same for every dataset."""
    return codes.fillna("").astype(str).str.strip().str.upper().replace(VIEW_CODES)


def _gz_or_csv(root: Path, stem: str) -> Path:
    """``<stem>.csv.gz`` as distributed, or the unpacked ``<stem>.csv``; the former when neither exists,
    so that the 'not found' error names the published file."""
    candidates = [root / f"{stem}.csv.gz", root / f"{stem}.csv"]
    return next((c for c in candidates if c.is_file()), candidates[0])


MIMIC = "mimic-cxr-2.0.0-"
MIMIC_VIEW_MEANINGS = {"postero-anterior": "PA", "antero-posterior": "AP", "lateral": "LATERAL",
                       "left lateral": "LATERAL", "right lateral": "LATERAL", "left anterior oblique": "LAO",
                       "right anterior oblique": "RAO", "left posterior oblique": "LPO",
                       "right posterior oblique": "RPO"}


def read_mimic(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """MIMIC-CXR-JPG 2.0.0: ``mimic-cxr-2.0.0-{metadata,chexpert|negbio,split}.csv.gz`` in ``root`` and
    images ``files/p10/p10000032/s50414267/<dicom_id>.jpg``.

    Labels are per study (``data.mimic.labeler``), so every image of a study gets them; studies the
    labeler skipped are blank. An empty ViewPosition falls back to ViewCodeSequence_CodeMeaning.
    MIMIC-CXR has no demographics: with ``data.mimic.patients_csv`` they come from MIMIC-IV
    ``patients.csv``, age = anchor_age + (study year - anchor_year) (dates are shifted per patient
    consistently across both). MIMIC-IV records every age above 89 as 91, so a 91 stays 91 (the true
    age is unknown, earlier studies included) and computed ages are capped at 91 (to not reveal them).
    """
    ids = {"subject_id": str, "study_id": str, "dicom_id": str}
    meta_source = _gz_or_csv(root, MIMIC + "metadata")
    meta = _read_csv(meta_source, dtype={**ids, "ViewPosition": str, "ViewCodeSequence_CodeMeaning": str})
    _require(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "ViewCodeSequence_CodeMeaning"],
             meta_source)
    label_source = _gz_or_csv(root, MIMIC + data.mimic.labeler)
    labels = _read_csv(label_source, dtype=ids)
    _require(labels, ["subject_id", "study_id"], label_source)
    _reject(labels.duplicated(["subject_id", "study_id"]), labels["study_id"], label_source, "study_id",
            "one row per study")
    native = tuple(c for c in labels.columns if c not in ids)
    split_source = _gz_or_csv(root, MIMIC + "split")
    split = _read_csv(split_source, dtype={**ids, "split": str})
    _require(split, ["dicom_id", "split"], split_source)
    split_of = dict(zip(split["dicom_id"], _codes(split["split"], SPLIT_NAMES, split_source, "split")))
    frame = meta.merge(labels, on=["subject_id", "study_id"], how="left")
    view = _views(frame["ViewPosition"])
    meaning = frame["ViewCodeSequence_CodeMeaning"].fillna("").str.strip().str.lower()
    sex, age = _mimic_demographics(root, data, frame["subject_id"], frame["StudyDate"])
    subject = frame["subject_id"]
    folder = "files/p" + subject.str[:2] + "/p" + subject + "/s" + frame["study_id"]
    return pd.DataFrame({
        "image_id": frame["dicom_id"], "path": folder + "/" + frame["dicom_id"] + ".jpg", "patient_id": subject,
        "split": frame["dicom_id"].map(split_of).fillna(""), "sex": sex, "age": age,
        "view": view.where(view != "", meaning.map(MIMIC_VIEW_MEANINGS).fillna("")),
        **{label: pd.to_numeric(frame[label], errors="coerce") for label in native}}), native


def _mimic_demographics(root: Path, data: Data, subjects: pd.Series, study_dates: pd.Series):
    """Sex and age per image from MIMIC-IV ``patients.csv``; blank without it or for patients not in it."""
    if not data.mimic.patients_csv:
        return pd.Series("", index=subjects.index), pd.Series(np.nan, index=subjects.index)
    source = Path(data.mimic.patients_csv).expanduser()
    source = source if source.is_absolute() else root / source
    if not source.is_file():
        raise InputError(f"data.mimic.patients_csv: {source} not found")
    patients = _read_csv(source, dtype={"subject_id": str, "gender": str})
    _require(patients, ["subject_id", "gender", "anchor_age", "anchor_year"], source)
    _reject(patients["subject_id"].duplicated(), patients["subject_id"], source, "subject_id", "one row per patient")
    patients["gender"] = _codes(patients["gender"], SEX_CODES, source, "gender")
    patient = patients.set_index("subject_id").reindex(subjects.to_numpy()).set_axis(subjects.index)
    anchor_age = pd.to_numeric(patient["anchor_age"], errors="coerce")
    anchor_year = pd.to_numeric(patient["anchor_year"], errors="coerce")
    years = pd.to_numeric(study_dates, errors="coerce") // 10000 - anchor_year
    age = (anchor_age + years.fillna(0)).clip(upper=91).mask(anchor_age >= 91, 91.0)
    return patient["gender"].fillna(""), age


PADCHEST = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19"


def _padchest_labels(text: str) -> frozenset:
    """The names in a Labels cell such as "['pleural effusion', ' cardiomegaly']", stripped; empty for
    a blank cell, an empty list or a literal that is not a list. Raises on a malformed literal."""
    value = ast.literal_eval(text) if text else []
    return frozenset(s for s in (str(v).strip() for v in value) if s) if isinstance(value, list) else frozenset()


def read_padchest(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """PadChest: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or a single ``PADCHEST*.csv``,
    also gzipped) with an unnamed index column, and images ``<ImageDir>/<ImageID>`` (16-bit PNG).

    Native labels are all names found in the Labels lists ('normal' included); an image is positive
    for the listed ones and negative for the others, an image without any label is blank. Only the
    configured labels get a column (there are about 190). PadChest has no official split; age is the
    study year minus the birth year.
    """
    source = _gz_or_csv(root, PADCHEST)
    if not source.is_file():
        found = sorted(root.glob("PADCHEST*.csv")) + sorted(root.glob("PADCHEST*.csv.gz"))
        if len(found) > 1:
            raise InputError(f"data.root: {root} holds several PadChest tables {[f.name for f in found]}, "
                             f"expected {PADCHEST}.csv or a single PADCHEST*.csv")
        source = found[0] if found else source
    raw = _read_csv(source, index_col=0, dtype=str, keep_default_na=False)
    _require(raw, ["ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientBirth", "PatientSex_DICOM",
                   "Projection", "Labels"], source)
    texts = raw["Labels"].str.strip()
    parsed = {}
    for text in texts.unique():
        try:
            parsed[text] = _padchest_labels(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            _reject(texts == text, raw["Labels"], source, "Labels", "a list such as ['normal'] or blank")
    names = texts.map(parsed)
    native = tuple(sorted(set().union(*parsed.values())))
    labelled = names.map(bool)
    wanted = [c for c in requested_columns(data, native) if c in native]
    year = pd.to_numeric(raw["StudyDate_DICOM"], errors="coerce") // 10000
    return pd.DataFrame({
        "image_id": raw["ImageID"].str.replace(r"\.png$", "", regex=True),
        "path": raw["ImageDir"].str.strip().str.replace(r"\.0$", "", regex=True) + "/" + raw["ImageID"],
        "patient_id": raw["PatientID"].str.strip(), "split": "",
        "sex": _codes(raw["PatientSex_DICOM"], SEX_CODES, source, "PatientSex_DICOM"),
        "age": year - pd.to_numeric(raw["PatientBirth"], errors="coerce"), "view": _views(raw["Projection"]),
        **{label: names.map(lambda n, label=label: float(label in n)).where(labelled) for label in wanted}
    }).reset_index(drop=True), native


VINDR_SPELLINGS = {"Other disease": "Other diseases"}  # the test file's spelling -> the training file's


def read_vindr(root: Path, data: Data) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """VinDr-CXR 1.0.0 (PhysioNet): ``annotations/image_labels_{train,test}.csv`` and
    ``{train,test}/<image_id>.dicom``.

    Three radiologists read each training image; their 0/1 findings are combined per image by
    ``data.reader_vote`` ('majority': more than half, 'any': at least one). The test file holds one
    consensus row per image and is the official test split; validation is drawn from training.
    VinDr-CXR has no patient ids, so each image is its own patient. Sex, age and view come from the
    DICOM headers; an image that is missing or unreadable gets blanks (``prepare`` reports it).
    """
    frames, native = [], ()
    for name, split in (("train", ""), ("test", "test")):
        source = root / "annotations" / f"image_labels_{name}.csv"
        raw = _read_csv(source, dtype=str).rename(columns=VINDR_SPELLINGS)
        native = native or tuple(c for c in raw.columns if c not in ("image_id", "rad_id"))
        _require(raw, ["image_id", *native], source)
        marks = raw[list(native)].apply(pd.to_numeric, errors="coerce")
        for label in native:
            _reject(~marks[label].isin([0, 1]), raw[label], source, label, "0 or 1")
        share = marks.groupby(raw["image_id"], sort=False).mean()
        votes = (share > 0.5 if data.reader_vote == "majority" else share > 0).astype(float).reset_index()
        frames.append(votes.assign(path=f"{name}/" + votes["image_id"] + ".dicom", split=split))
    frame = pd.concat(frames, ignore_index=True)
    headers = pd.DataFrame([_dicom_header(root / p) for p in tqdm(
        frame["path"], desc="VinDr-CXR DICOM headers", unit="file", disable=True if len(frame) < 200 else None)],
        columns=["sex", "age", "view"])
    return frame.assign(patient_id=frame["image_id"], sex=headers["sex"], age=headers["age"],
                        view=_views(headers["view"])), native


def _dicom_header(path: Path) -> tuple[str, float, str]:
    """Sex, age and view position from a DICOM header, without reading the pixels."""
    import pydicom  # only VinDr-CXR needs it

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge", "ViewPosition"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return "", np.nan, ""
    sex = str(ds.get("PatientSex") or "").strip().upper()
    return sex if sex in ("F", "M") else "", _age_years(ds.get("PatientAge") or ""), str(ds.get("ViewPosition") or "")


READERS = {"uka": read_uka, "chexpert": read_chexpert, "mimic": read_mimic, "nih": read_nih,
           "padchest": read_padchest, "vindr": read_vindr, "csv": read_csv}
