"""Tables and images of a chest-radiograph dataset, as torch Datasets.

A dataset is one table (one row per image: ``image_id``, ``path``, ``patient_id``, ``split``, ``sex``,
``age``, ``view``, one 0/1 column per label, NaN where unlabelled) plus an image folder; the readers
in ``data/adapters.py`` turn each published layout into it.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from artifacts import expect_folder
from config import Data, InputError
from data import synthetic
from data.adapters import READERS
from data.cache import Cache, cache_folder, check_bad_share, default_dir, open_cache
from data.images import BadImage, Preprocessing, preprocess

SPLITS = ("train", "valid", "test")


@dataclass
class Table:
    frame: pd.DataFrame  # rows of one site, all splits; ``path`` relative to ``root``
    root: Path
    labels: list[str]
    absent: list[str] = field(default_factory=list)  # asked-for labels the dataset does not have (absent_ok)
    # per label, how many source values were uncertain (-1) or blank before the label policy
    source_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    cache: Cache | None = None  # the complete preprocessing cache of these images, if prepared

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name].reset_index(drop=True)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dp-cxr"


def preprocessing(data: Data) -> Preprocessing:
    return Preprocessing(data.image_size, data.fit, data.histogram_equalization)


def load_table(data: Data, seed: int, use_cache: bool = True, absent_ok: bool = False) -> Table:
    """Read the configured dataset (generating the synthetic one if needed) with the configured
    side merging, label names, views, label policy and patient split.

    ``data.labels`` the dataset lacks are an error, or with ``absent_ok`` (scoring a model on another
    dataset) left out of ``Table.labels`` and listed in ``Table.absent``.

    With ``use_cache``, a finished preprocessing cache of exactly these images is attached and the
    images it found bad are left out (refused above ``data.cache.max_bad_fraction``).
    ``data.split_seed``, when set, replaces ``seed`` for the split and the built-in data.
    """
    seed = seed if data.split_seed is None else data.split_seed
    expect_folder(data.root, "data.root")
    expect_folder(data.cache.dir, "data.cache.dir")
    if data.dataset == "synthetic":
        cache = Path(data.root).expanduser() if data.root else default_cache_dir()
        n = {"public": data.synthetic.public_patients, "private": data.synthetic.private_patients}
        root, reader = synthetic.generate(cache, data.image_size, n, seed), READERS["uka"]
    else:
        root, reader = Path(data.root).expanduser(), READERS[data.dataset]
    frame, native = reader(root, data)
    frame = checked_rows(frame, root, data.dataset)
    if data.merge_sides:
        frame, native = merge_sides(frame, native)
    frame = frame.rename(columns=data.label_map)
    available = [data.label_map.get(label, label) for label in native]
    unknown = [label for label in data.labels if label not in available]
    labels = [label for label in data.labels if label in available]
    if unknown and not (absent_ok and labels):
        merge = "" if data.merge_sides else ", merge X_right/X_left with data.merge_sides"
        raise InputError(f"data.labels: {unknown} not in the {data.dataset} dataset; it has {available} "
                         f"(rename with data.label_map{merge})")
    frame = frame[frame["view"].isin(data.views) | (frame["view"] == "")]  # unknown view: kept
    if frame.empty:
        raise InputError(f"data.views: no {data.dataset} image has a view in {data.views}")
    counts = {label: {"uncertain": int((frame[label] == -1).sum()), "blank": int(frame[label].isna().sum())}
              for label in labels}
    for label in labels:
        frame[label] = apply_label_policy(frame[label], data.uncertain, data.blank)
    frame = frame.reset_index(drop=True)
    frame["split"] = patient_split(frame["patient_id"], frame["split"], data.valid_fraction, data.test_fraction, seed)
    table = Table(frame, root, labels, unknown, counts)
    return attach_cache(table, data) if use_cache else table


MAX_AGE = 120


def checked_rows(frame: pd.DataFrame, root: Path, dataset: str) -> pd.DataFrame:
    """The images an adapter listed, refused unless every path stays inside the dataset root and
    names one image (paths normalised first: ``./img/00.png`` is ``img/00.png``), every image id
    and patient id is set and unique where it must be, and every age is plausible."""
    if frame.empty:
        raise InputError(f"{root}: the {dataset} dataset lists no rows (no images)")
    given = frame["path"].astype(str)
    frame = frame.assign(path=given.map(lambda p: posixpath.normpath(p.replace("\\", "/"))))
    escaping = frame["path"].map(lambda p: Path(p).is_absolute() or ".." in Path(p).parts)
    if escaping.any():
        raise InputError(f"{root}: image path {frame['path'][escaping.idxmax()]!r} leaves the dataset root; "
                         f"paths must be relative to data.root")
    twice = frame["path"].duplicated(keep=False)
    if twice.any():
        first = frame["path"][twice].iloc[0]
        spellings = given[frame["path"] == first].head(2)
        raise InputError(f"{root}: image file {first!r} is listed twice (as {' and '.join(map(repr, spellings))}); "
                         f"each image must appear once, in one split")
    # the paths are unique now, so one id on two rows is two files (a reader cuts the suffix or the folder)
    twice = frame["image_id"].duplicated(keep=False)
    if twice.any():
        first = frame["image_id"][twice].iloc[0]
        files = given[frame["image_id"] == first].head(2)
        raise InputError(f"{root}: image id {first!r} names two files, {' and '.join(map(repr, files))}; each image "
                         f"needs its own id (predictions, comparisons and audits are matched by it)")
    blank = frame["patient_id"].fillna("").astype(str).str.strip() == ""
    if blank.any():
        raise InputError(f"{root}: {int(blank.sum())} image(s) without a patient id (first: "
                         f"{frame['path'][blank.idxmax()]!r}); every image needs its patient")
    age = pd.to_numeric(frame["age"], errors="coerce")
    implausible = (age < 0) | (age > MAX_AGE)
    if implausible.any():
        raise InputError(f"{root}: age {age[implausible.idxmax()]:g} for image {frame['path'][implausible.idxmax()]!r}, "
                         f"expected 0-{MAX_AGE} years or blank")
    return frame


def cache_location(table: Table, data: Data) -> Path:
    return cache_folder(Path(data.cache.dir) if data.cache.dir else default_dir(), data.dataset, table.root,
                        table.frame["path"].tolist(), preprocessing(data))


def attach_cache(table: Table, data: Data) -> Table:
    cache = open_cache(cache_location(table, data))
    if cache is None:
        return table
    bad = table.frame["path"].isin(cache.bad)
    check_bad_share(int(bad.sum()), len(bad), data.cache.max_bad_fraction, cache.report)
    if bad.any():
        print(f"leaving out {int(bad.sum())} bad image(s) listed in {cache.report}")
    return replace(table, frame=table.frame[~bad].reset_index(drop=True), cache=cache)


def merge_sides(frame: pd.DataFrame, native: tuple[str, ...]) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """``X_right`` and ``X_left`` -> ``X``: positive if either side is, else uncertain if either is,
    else negative if either is labelled, else blank. Only pairs the reader loaded are merged."""
    out = []
    for name in native:
        base, _, side = name.rpartition("_")
        pair = [f"{base}_right", f"{base}_left"]
        if side not in ("right", "left") or not set(pair) <= set(native):
            out.append(name)
        elif base not in out:
            out.append(base)
            if set(pair) <= set(frame.columns):
                right, left = frame[pair[0]], frame[pair[1]]
                merged = right.where(right.notna(), left)  # one side blank: the other decides
                merged = merged.mask((right == 1) | (left == 1), 1.0)
                frame = frame.assign(**{base: merged.mask((merged == 0) & ((right == -1) | (left == -1)), -1.0)})
    return frame, tuple(out)


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
    split[~given] = patients[~given].map(known).astype(object).fillna("")
    free = sorted(set(patients[split == ""]))
    draw = np.random.default_rng(seed).random(len(free))
    test_share = 0.0 if (split == "test").any() else test_fraction
    assign = {p: "valid" if u < valid_fraction else "test" if u < valid_fraction + test_share else "train"
              for p, u in zip(free, draw)}
    missing = split == ""
    split[missing] = patients[missing].map(assign)
    return split


def positive_weights(train: pd.DataFrame, labels: list[str]) -> torch.Tensor:
    """BCE ``pos_weight`` per label, negatives / positives among the labelled training images."""
    positives = train[labels].sum(axis=0).to_numpy()  # NaN (unlabelled) is skipped
    negatives = (train[labels] == 0).sum(axis=0).to_numpy()
    empty = [label for label, p in zip(labels, positives) if p == 0]
    if empty:
        raise InputError(f"label(s) {empty} have no positive image in the training split: "
                         f"they cannot be learned; remove them from data.labels")
    return torch.tensor(negatives / positives, dtype=torch.float32)


def as_input(image: np.ndarray) -> torch.Tensor:
    """A preprocessed [S, S] uint8 image as the network's [1, S, S] float input in [0, 1] (one definition
    for training, prediction and new images)."""
    return torch.from_numpy(image).unsqueeze(0).float().div_(255.0)


class CXRDataset(Dataset):
    """Grayscale radiographs as [1, S, S] float tensors in [0, 1] with their label vector.

    Pixels come from the preprocessing cache when there is one, else from ``preprocess`` (the same
    function that filled the cache). For training, ``augment`` (``training.augment``) changes each image
    and ``views`` K lists every image K times in a row (item i is image i // K), each item its own
    random draw: augmentation multiplicity.
    """

    def __init__(self, frame: pd.DataFrame, root: Path, labels: list[str], prep: Preprocessing,
                 cache: Cache | None = None, augment=None, views: int = 1):
        self.paths = frame["path"].tolist()
        self.root = Path(root)
        self.targets = torch.tensor(frame[labels].to_numpy(np.float32))
        self.prep = prep
        self.cache_file = cache.images if cache else None
        self.rows = frame["path"].map(cache.rows).to_numpy() if cache else None
        self.augment, self.views = augment, views
        self._images = None  # opened lazily, so that DataLoader workers each map the file themselves

    def __len__(self) -> int:
        return len(self.paths) * self.views

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __getitem__(self, index: int):
        index //= self.views
        if self.cache_file is not None:
            if self._images is None:
                self._images = np.load(self.cache_file, mmap_mode="r")
            image = np.array(self._images[self.rows[index]])
        else:
            try:
                image = preprocess(self.root, self.paths[index], self.prep)
            except BadImage as exc:
                raise InputError(f"{self.root / self.paths[index]}: {exc}; `python main_2D_DP.py prepare` lists "
                                 f"such images and leaves them out") from None
        x, y = as_input(image), self.targets[index]
        return (x, y) if self.augment is None else self.augment(x, y)


def evaluation_loader(frame: pd.DataFrame, table: Table, data: Data, batch_size: int) -> DataLoader:
    """Images of ``frame`` (rows of ``table``) in order, without augmentation, for validation and prediction."""
    dataset = CXRDataset(frame, table.root, data.labels, preprocessing(data), table.cache)
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
