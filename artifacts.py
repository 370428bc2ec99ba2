"""Files of an experiment folder: atomic writes and safe checkpoint loading.

Writes go to a temporary file in the same folder, are fsynced and renamed over the target, so a
kill leaves either the old or the new file, never half of one. Checkpoints hold only tensors and
plain Python values and are loaded with ``weights_only=True``: a file from another site cannot run
code on load.
"""
from __future__ import annotations

import errno
import json
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import torch

from config import InputError


class Layout:
    """Where the files of an experiment folder live, and which of them may leave the hospital.

    Releasable -- derived only from the DP-trained weights and from evaluation data the researcher
    chooses to publish: ``checkpoints/best.pt`` (weights picked by validation AUROC),
    ``predictions/<split>.csv``, ``results/<split>_*`` and ``report.html`` / ``report_<split>.html``.
    ``export`` bundles what a model release needs from them.

    Private -- ``private/``, never to be shared: ``config.yaml`` and ``summary.json`` (exact dataset
    sizes, sample rate, dataset paths, training loss), ``last.pt`` (the resume checkpoint, with the
    secret state of the DP noise and sampling), ``tensorboard/`` (training curves, un-noised) and
    ``audit/`` (canaries' coins and labels, reference runs, membership scores of training images and
    the audit's results and report).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.private = self.root / "private"
        self.config = self.private / "config.yaml"
        self.summary = self.private / "summary.json"
        self.last = self.private / "last.pt"
        self.tensorboard = self.private / "tensorboard"
        self.audit = self.private / "audit"
        self.best = self.root / "checkpoints" / "best.pt"
        self.predictions = self.root / "predictions"
        self.results = self.root / "results"

    def checkpoint(self, which: str) -> Path:
        """``best`` (releasable) or ``last`` (private)."""
        return self.best if which == "best" else self.last

    def report(self, split: str) -> Path:
        return self.root / ("report.html" if split == "test" else f"report_{split}.html")


def private_folder(target_dir: str | Path) -> Path:
    """``<output.target_dir>/private``: what concerns all experiments there and may not be shared (the
    privacy ledger, data descriptions)."""
    return Path(target_dir).expanduser() / "private"


class OutputError(Exception):
    """A result could not be written (disk full, permissions): the command line exits with code 1."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}; {kept}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda handle: handle.write(text.encode()))


def json_text(obj) -> str:
    """Indented, strictly valid JSON: NaN and infinities (not estimable values) become null."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def save_checkpoint(state: dict, path: Path) -> None:
    _atomic(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a readable DP-CXR checkpoint ({type(exc).__name__}: {exc})") from None


class ExperimentLock:
    """``<folder>/.lock`` holding the owner's pid and host, so two processes never train one experiment.

    A lock left by a dead process on this host is taken over with a warning; one from another host
    cannot be checked and is refused, naming the file to delete once that run is known to be gone.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({**self.owner, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, handle)
            return self

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        if holder.get("host") == self.owner["host"] and not _alive(holder.get("pid")):
            warnings.warn(f"{self.path}: taking over the lock of process {holder.get('pid')}, which is gone")
            self.path.unlink(missing_ok=True)
            return
        raise InputError(f"{self.path.parent} is being trained by process {holder.get('pid')} on "
                         f"{holder.get('host')!r} (since {holder.get('since')}); wait for it to finish, or delete "
                         f"{self.path} if that process is known to be gone")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by someone else
    return True
