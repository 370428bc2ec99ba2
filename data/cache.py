"""The preprocessing cache: every image of a table, preprocessed once, in one memory-mapped uint8 array.

A cache folder ``<dir>/<dataset>_<S>px_<fingerprint>/`` holds

- ``images.npy``: [N, S, S] uint8 (``np.load(mmap_mode="r")``), row i = ``index.csv`` row i;
- ``index.csv``: the image paths (relative to the dataset root), in row order;
- ``status.npy``: [N] uint8, 0 = to do, 1 = done, 2 = bad (flushed after the pixels it vouches for,
  so an interrupted run resumes where it stopped and never trusts a half-written row);
- ``bad_images.csv``: path and reason of every image left out (missing, unreadable, truncated...);
- ``settings.json``: what the fingerprint covers; ``done.json`` once every row is settled.

The fingerprint covers the dataset root, the set of image paths and the preprocessing settings and
version, so any change of them selects another folder: a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from artifacts import atomic_write_text, json_text
from config import InputError
from data.images import PREPROCESS_VERSION, BadImage, Preprocessing, preprocess

TODO, DONE, BAD = 0, 1, 2
CHUNK = 64  # images per task: large enough to amortise process hand-offs, small enough to resume cheaply


def default_dir() -> Path:
    return Path.home() / ".cache" / "dp-cxr" / "prepared"


def cache_folder(cache_dir: Path, dataset: str, root: Path, paths: list[str], prep: Preprocessing) -> Path:
    settings = _settings(dataset, root, paths, prep)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{dataset}_{prep.size}px_{key}"


def _settings(dataset: str, root: Path, paths: list[str], prep: Preprocessing) -> dict:
    return {"version": PREPROCESS_VERSION, "dataset": dataset, "root": str(Path(root).resolve()),
            "size": prep.size, "fit": prep.fit, "equalize": prep.equalize, "images": len(paths),
            "paths_sha1": hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()}


@dataclass
class PrepareResult:
    folder: Path
    images: int
    reused: int  # settled by an earlier (possibly interrupted) run
    prepared: int
    bad: pd.DataFrame  # path, reason

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.images if self.images else 0.0


def _work(root: str, rows: list[int], paths: list[str], prep: Preprocessing):
    """One task: preprocess a chunk; bad images come back as reasons instead of pixels."""
    out, reasons = np.zeros((len(rows), prep.size, prep.size), np.uint8), {}
    for k, path in enumerate(paths):
        try:
            out[k] = preprocess(Path(root), path, prep)
        except BadImage as exc:
            reasons[rows[k]] = str(exc)
    return rows, out, reasons


def prepare(folder: Path, dataset: str, root: Path, paths: list[str], prep: Preprocessing, workers: int = 1,
            progress: bool = True) -> PrepareResult:
    """Preprocess ``paths`` (relative to ``root``) into ``folder``, reusing every row already settled."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings(dataset, root, paths, prep)
    index = folder / "index.csv"
    if not (folder / "status.npy").is_file():
        atomic_write_text(folder / "settings.json", json_text(settings))
        atomic_write_text(index, pd.DataFrame({"path": paths}).to_csv(index=False))
        np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (len(paths), prep.size, prep.size)).flush()
        np.save(folder / "status.tmp.npy", np.zeros(len(paths), np.uint8))
        os.replace(folder / "status.tmp.npy", folder / "status.npy")  # last, whole: marks the arrays as allocated
    order = pd.read_csv(index, dtype=str, keep_default_na=False)["path"].tolist()
    if sorted(order) != sorted(paths):
        raise InputError(f"{folder}: index.csv lists other images than the dataset table; delete the folder")
    images = np.load(folder / "images.npy", mmap_mode="r+")
    status = np.load(folder / "status.npy", mmap_mode="r+")
    reasons = _read_bad(folder)
    todo = np.flatnonzero(status == TODO)
    reused = len(order) - len(todo)
    chunks = [todo[i:i + CHUNK].tolist() for i in range(0, len(todo), CHUNK)]
    bar = tqdm(total=len(todo), desc=f"Preparing {prep.size}px cache in {folder}", unit="img", disable=not progress)

    def settle(rows, pixels, bad):
        images[rows] = pixels
        images.flush()
        status[rows] = [BAD if r in bad else DONE for r in rows]
        status.flush()
        if bad:
            reasons.update({order[r]: reason for r, reason in bad.items()})
            _write_bad(folder, reasons)
        bar.update(len(rows))

    try:
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
                futures = [pool.submit(_work, str(root), rows, [order[r] for r in rows], prep) for rows in chunks]
                try:
                    for future in as_completed(futures):
                        settle(*future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        else:
            for rows in chunks:
                settle(*_work(str(root), rows, [order[r] for r in rows], prep))
    finally:
        bar.close()
    _write_bad(folder, reasons)
    atomic_write_text(folder / "done.json", json_text({"images": len(order), "bad": len(reasons)}))
    bad = pd.DataFrame({"path": list(reasons), "reason": list(reasons.values())})
    return PrepareResult(folder, len(order), reused, len(todo), bad)


def _read_bad(folder: Path) -> dict[str, str]:
    report = folder / "bad_images.csv"
    if not report.is_file():
        return {}
    frame = pd.read_csv(report, dtype=str, keep_default_na=False)
    return dict(zip(frame["path"], frame["reason"]))


def _write_bad(folder: Path, reasons: dict[str, str]) -> None:
    atomic_write_text(folder / "bad_images.csv",
                      pd.DataFrame({"path": list(reasons), "reason": list(reasons.values())}).to_csv(index=False))


@dataclass
class Cache:
    """A complete cache: where each path's pixels are, and which paths are bad."""

    images: Path  # images.npy
    rows: dict[str, int] = field(repr=False)
    bad: dict[str, str] = field(repr=False)
    report: Path


def open_cache(folder: Path) -> Cache | None:
    """The cache in ``folder`` if a run finished there, else None."""
    if not (folder / "done.json").is_file():
        return None
    order = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False)["path"]
    return Cache(folder / "images.npy", dict(zip(order, range(len(order)))), _read_bad(folder),
                 folder / "bad_images.csv")


def check_bad_share(bad: int, total: int, limit: float, report: Path) -> None:
    if total and bad / total > limit:
        raise InputError(f"{bad} of {total} images ({bad / total:.1%}) are missing or unreadable, more than "
                         f"data.cache.max_bad_fraction = {limit:.1%}; see {report}")
