"""Tables and images of a chest-radiograph dataset, as torch Datasets.

A dataset is one table (one row per image: ``image_id``, ``patient_id``, ``split``, ``sex``, ``age``,
``view``, one 0/1 column per label, NaN where unlabelled) plus an image folder. Graded labels follow
the study: grades 3 and 4 are positive, everything else (1, 2, 5) negative, blank unlabelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from config import Data, InputError
from data import synthetic
from data.adapters import READERS

SPLITS = ("train", "valid", "test")


@dataclass
class Table:
    frame: pd.DataFrame  # rows of one site, all splits; ``path`` relative to ``root``
    root: Path
    labels: list[str]
    # per label, how many source values were uncertain (-1) or blank before the label policy
    source_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name].reset_index(drop=True)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dp-cxr"


def load_table(data: Data, seed: int) -> Table:
    """Read the configured dataset (generating the synthetic one if needed), with binary labels."""
    if data.dataset in READERS:
        return _native_table(data, seed)
    if data.dataset == "synthetic":
        cache = Path(data.root).expanduser() if data.root else default_cache_dir()
        n = {"public": data.synthetic.public_patients, "private": data.synthetic.private_patients}
        folder = synthetic.generate(cache, data.image_size, n, seed)
    else:
        folder = Path(data.root).expanduser()
    return _master_list_table(folder, data)


def _master_list_table(folder: Path, data: Data) -> Table:
    """The study's layout: ``master_list.csv`` with graded labels and ``images/<image_id>.png``."""
    csv = folder / "master_list.csv"
    if not csv.is_file():
        raise InputError(f"data.root: {csv} not found")
    frame = pd.read_csv(csv, dtype={"image_id": str, "patient_id": str, "sex": str})
    required = ["image_id", "patient_id", "split", "sex", "age", *data.labels] + (["site"] if data.site != "all" else [])
    missing = [c for c in required if c not in frame]
    if missing:
        raise InputError(f"{csv}: missing column(s) {missing}")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        row = int(bad_split.idxmax())
        raise InputError(f"{csv}: row {row + 2}, column 'split': {frame['split'][row]!r}, expected one of {SPLITS}")
    if data.site != "all":
        frame = frame[frame["site"] == data.site]
    counts = {label: {"uncertain": 0, "blank": int(frame[label].isna().sum())} for label in data.labels}
    for label in data.labels:
        frame[label] = binarize_grades(frame[label], csv, label)
    frame["path"] = "images/" + frame["image_id"] + ".png"
    return Table(frame.reset_index(drop=True), folder, list(data.labels), counts)


def _native_table(data: Data, seed: int) -> Table:
    """A public dataset in its own layout, with the configured label, view and split policies."""
    root = Path(data.root).expanduser()
    frame, native = READERS[data.dataset](root, data)
    escaping = frame["path"].map(lambda p: Path(p).is_absolute() or ".." in Path(p).parts)
    if escaping.any():
        raise InputError(f"{root}: image path {frame['path'][escaping.idxmax()]!r} leaves the dataset root; "
                         f"paths must be relative to data.root")
    frame = frame.rename(columns=data.label_map)
    available = [data.label_map.get(label, label) for label in native]
    unknown = [label for label in data.labels if label not in available]
    if unknown:
        raise InputError(f"data.labels: {unknown} not in the {data.dataset} dataset; it has {available} "
                         f"(rename with data.label_map)")
    frame = frame[frame["view"].isin(data.views) | (frame["view"] == "")]  # unknown view: kept
    if frame.empty:
        raise InputError(f"data.views: no {data.dataset} image has a view in {data.views}")
    counts = {label: {"uncertain": int((frame[label] == -1).sum()), "blank": int(frame[label].isna().sum())}
              for label in data.labels}
    for label in data.labels:
        frame[label] = apply_label_policy(frame[label], data.uncertain, data.blank)
    frame = frame.reset_index(drop=True)
    frame["split"] = patient_split(frame["patient_id"], frame["split"], data.valid_fraction, data.test_fraction, seed)
    return Table(frame, root, list(data.labels), counts)


def apply_label_policy(values: pd.Series, uncertain: str, blank: str) -> pd.Series:
    """1/0 stay; -1 (uncertain) and blank become 0, 1 or NaN (ignored) as configured."""
    policy = {"ignore": np.nan, "zero": 0.0, "one": 1.0}
    out = values.astype(np.float32)
    out = out.mask(values == -1, policy[uncertain])
    return out.mask(values.isna(), policy[blank])


def patient_split(patients: pd.Series, official: pd.Series, valid_fraction: float, test_fraction: float,
                  seed: int) -> pd.Series:
    """Keep given splits; draw the rest by patient (seeded), so no patient is in two splits.

    Images without a split follow their patient's other images; patients with none are drawn into
    train/valid (and test, when no test split is given at all). A patient given two different
    splits is an input error.
    """
    split = official.fillna("").astype(str).copy()
    given = split != ""
    per_patient = split[given].groupby(patients[given]).unique()
    conflict = per_patient[per_patient.map(len) > 1]
    if len(conflict):
        raise InputError(f"patient {conflict.index[0]!r} has images in several splits {sorted(conflict.iloc[0])}: "
                         f"no patient may be in two splits")
    known = per_patient.map(lambda values: values[0])
    split[~given] = patients[~given].map(known).fillna("")
    free = sorted(set(patients[split == ""]))
    draw = np.random.default_rng(seed).random(len(free))
    test_share = 0.0 if (split == "test").any() else test_fraction
    assign = {p: "valid" if u < valid_fraction else "test" if u < valid_fraction + test_share else "train"
              for p, u in zip(free, draw)}
    missing = split == ""
    split[missing] = patients[missing].map(assign)
    return split


def binarize_grades(grades: pd.Series, source: Path, label: str) -> pd.Series:
    """Study grading: 3 and 4 are positive; 1, 2 and other codes (5 = not assessable) negative.

    A blank grade means the finding was not assessed: NaN, masked out of the loss and the metrics.
    """
    bad = ~(grades.isin([1, 2, 3, 4, 5]) | grades.isna())
    if bad.any():
        row = int(bad.idxmax())
        raise InputError(f"{source}: row {row + 2}, column '{label}': grade {grades[row]!r}, expected 1-5 or blank")
    return grades.isin([3, 4]).astype(np.float32).where(grades.notna())


def positive_weights(train: pd.DataFrame, labels: list[str]) -> torch.Tensor:
    """BCE ``pos_weight`` per label, negatives / positives among the labelled training images."""
    positives = train[labels].sum(axis=0).to_numpy()  # NaN (unlabelled) is skipped
    negatives = (train[labels] == 0).sum(axis=0).to_numpy()
    empty = [label for label, p in zip(labels, positives) if p == 0]
    if empty:
        raise InputError(f"label(s) {empty} have no positive image in the training split: "
                         f"they cannot be learned; remove them from data.labels")
    return torch.tensor(negatives / positives, dtype=torch.float32)


class CXRDataset(Dataset):
    """Grayscale radiographs as [1, S, S] float tensors in [0, 1] with their label vector.

    Preprocessing follows the study: resize, optional histogram equalisation (cv2.equalizeHist);
    augmentation is at most a horizontal flip.
    """

    def __init__(self, frame: pd.DataFrame, root: Path, labels: list[str], image_size: int,
                 histogram_equalization: bool = True, augment_flip: bool = False):
        self.frame = frame
        self.paths = [Path(root) / p for p in frame["path"]]
        self.targets = torch.tensor(frame[labels].to_numpy(np.float32))
        self.image_size = image_size
        self.equalize = histogram_equalization
        self.flip = augment_flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise InputError(f"{path}: missing or unreadable image")
        if image.shape != (self.image_size, self.image_size):
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        if self.equalize:
            image = cv2.equalizeHist(image)
        x = torch.from_numpy(image).unsqueeze(0).float().div_(255.0)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.targets[index]


def evaluation_loader(frame: pd.DataFrame, root: Path, data: Data, batch_size: int) -> DataLoader:
    """Images of ``frame`` in order, without augmentation, for validation and prediction."""
    dataset = CXRDataset(frame, root, data.labels, data.image_size, data.histogram_equalization)
    return DataLoader(dataset, batch_size=batch_size, num_workers=data.num_workers)


def describe(table: Table, age_edges: list[float]) -> dict:
    """Counts to check before spending privacy budget: per split images and patients, views, sex,
    age bins, label prevalence among labelled images, and unlabelled/uncertain/blank counts."""
    from evaluation.fairness import age_bins  # the same bins as the subgroup analysis

    frame = table.frame.assign(age_bin=age_bins(table.frame["age"].to_numpy(), age_edges))
    out = {"root": str(table.root), "images": len(frame), "patients": int(frame["patient_id"].nunique()),
           "splits": {}, "source_label_values": table.source_counts}
    for split in SPLITS:
        part = frame[frame["split"] == split]
        out["splits"][split] = {
            "images": len(part), "patients": int(part["patient_id"].nunique()),
            "view": part["view"].replace("", "unknown").value_counts().to_dict() if "view" in part else {},
            "sex": part["sex"].replace("", "unknown").value_counts().to_dict(),
            "age_bin": part["age_bin"].replace("", "unknown").value_counts().to_dict(),
            "labels": {label: {"positives": int((part[label] == 1).sum()), "labelled": int(part[label].notna().sum()),
                               "prevalence": float(part[label].mean()) if part[label].notna().any() else None}
                       for label in table.labels}}
    return out
