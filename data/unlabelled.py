"""New, unlabelled images to score with a trained model (``predict SOURCE --images PATH``).

PATH is a folder, walked recursively, or a CSV file listing the images (a ``path`` column, relative to
the CSV's folder or absolute, and optional ``patient_id``, ``sex`` and ``age`` carried to the output).
Images are read one batch at a time through ``preprocess``, the training preprocessing; a bad image
is reported with its reason instead of stopping the others.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from config import InputError
from data.adapters import SEX_CODES, _codes, _read_csv, _reject, _require
from data.dataset import MAX_AGE, as_input
from data.images import DICOM_SUFFIXES, BadImage, Preprocessing, _dicom_magic, preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)
CARRIED = ("patient_id", "sex", "age")  # optional CSV columns copied to scores.csv


def list_images(path: Path) -> tuple[pd.DataFrame, int]:
    """(images, other files ignored). One row per image: ``path`` as shown (relative to the folder, or
    as the CSV gives it), ``root`` and ``relative`` (what :func:`preprocess` reads), and the CSV's
    carried columns."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _walk(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_list(path), 0
    raise InputError(f"--images: {path} " + ("is neither a folder nor a .csv file" if path.exists() else "not found")
                     + "; expected a folder of images or a CSV file with a 'path' column")


def _is_image(path: Path) -> bool:
    """By suffix, else DICOM by content: PACS exports name files without an extension or by their UID
    ('1.2.840....3'), which looks like a suffix."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return _dicom_magic(path)
    except OSError:  # unreadable and not named as an image: nothing says it is one
        return False


def _walk(folder: Path) -> tuple[pd.DataFrame, int]:
    """Images under ``folder`` in a stable order; hidden files and folders (.git, .DS_Store) skipped."""
    found, ignored = [], 0
    for here, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            if _is_image(Path(here) / name):
                found.append((Path(here) / name).relative_to(folder).as_posix())
            else:
                ignored += 1
    return pd.DataFrame({"path": found, "root": str(folder), "relative": found}), ignored


def _read_list(source: Path) -> pd.DataFrame:
    """The CSV's images, checked like the in-house CSV reader: errors name the file, row and column."""
    raw = _read_csv(source, dtype=str, keep_default_na=False)
    _require(raw, ["path"], source)
    given = raw["path"].str.strip()
    _reject(given == "", raw["path"], source, "path", "an image path")
    full = given.map(lambda p: Path(os.path.normpath(source.parent / Path(p).expanduser())))
    _reject(full.duplicated(), raw["path"], source, "path", "each image listed once")
    frame = pd.DataFrame({"path": given, "root": full.map(lambda p: str(p.parent)), "relative": full.map(
        lambda p: p.name)})
    if "patient_id" in raw:
        frame["patient_id"] = raw["patient_id"].str.strip()
    if "sex" in raw:
        frame["sex"] = _codes(raw["sex"], SEX_CODES, source, "sex")
    if "age" in raw:
        text = raw["age"].str.strip()
        age = pd.to_numeric(text, errors="coerce")
        _reject((age.isna() & (text != "")) | (age < 0) | (age > MAX_AGE), raw["age"], source, "age",
                f"a number of years 0-{MAX_AGE} or blank")
        frame["age"] = age
    return frame


class ImageFiles(Dataset):
    """The listed images as the network's input, preprocessed as in training; a bad image yields a
    blank tensor and its reason, so that a DataLoader skips it instead of stopping."""

    def __init__(self, images: pd.DataFrame, prep: Preprocessing):
        self.files = list(zip(images["root"], images["relative"]))
        self.prep = prep

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        root, relative = self.files[index]
        try:
            return as_input(preprocess(root, relative, self.prep)), ""
        except BadImage as exc:
            return torch.zeros(1, self.prep.size, self.prep.size), str(exc)
