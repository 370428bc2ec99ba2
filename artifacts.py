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
from torch.utils.tensorboard import SummaryWriter

from config import InputError


class Layout:
    """Where the files of an experiment folder live, and which of them may leave the hospital.

    Releasable -- derived only from the DP-trained weights and from evaluation data the researcher
    chooses to publish, as aggregates: ``checkpoints/best.pt`` (weights picked by validation AUROC),
    ``results/<split>_*`` (metrics and fairness with intervals) and ``report.html`` /
    ``report_<split>.html``. ``export`` bundles what a model release needs from them.

    Private -- ``private/``, never to be shared: ``config.yaml`` and ``summary.json`` (exact dataset
    sizes, sample rate, dataset paths, training loss), ``last.pt`` (the resume checkpoint, with the
    secret state of the DP noise and sampling), ``tensorboard/`` (training curves, un-noised),
    ``audit/`` (canaries' coins and labels, reference runs, membership scores of training images and
    the audit's results and report), ``training_pixels.json`` (digests of the training images'
    preprocessed pixels, by which ``predict --images`` recognises a renamed copy of one) and
    ``predictions/<split>.csv`` (row-level: each validation or test image's ids, sex, age, labels and
    scores; those patients are not protected by the guarantee).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.private = self.root / "private"
        self.config = self.private / "config.yaml"
        self.summary = self.private / "summary.json"
        self.last = self.private / "last.pt"
        self.tensorboard = self.private / "tensorboard"
        self.audit = self.private / "audit"
        self.training_pixels = self.private / "training_pixels.json"
        self.best = self.root / "checkpoints" / "best.pt"
        self.predictions = self.private / "predictions"
        self.results = self.root / "results"

    def checkpoint(self, which: str) -> Path:
        """``best`` (releasable) or ``last`` (private)."""
        return self.best if which == "best" else self.last

    def report(self, split: str) -> Path:
        return self.root / ("report.html" if split == "test" else f"report_{split}.html")


def private_folder(target_dir: str | Path) -> Path:
    """``<output.target_dir>/private``: what concerns all experiments there and may not be shared (data
    descriptions)."""
    return Path(target_dir).expanduser() / "private"


class OutputError(Exception):
    """A result could not be written (disk full, permissions): the command line exits with code 1."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def expect_folder(path: Path | str | None, what: str) -> None:
    """Refuse (exit 2) a setting that names an existing file where a folder is expected."""
    if path is not None and Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
        raise InputError(f"{what}: {path} is a file, expected a folder")


def make_folder(folder: Path) -> Path:
    """``folder`` and its parents, or an :class:`OutputError` naming what stood in the way."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create the folder {folder}: a file of that name is in the way") from None
    except OSError as exc:
        raise OutputError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None
    return folder


def _atomic(path: Path, write) -> None:
    """Write ``path`` through a temporary file and a rename: a failed write leaves the previous version."""
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as RuntimeError ("PytorchStreamWriter failed writing file")
        if isinstance(exc, (OSError, RuntimeError)):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            raise OutputError(f"cannot write {path}: {cause}; {kept}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda handle: handle.write(text.encode()))


def read_json(path: Path) -> dict:
    """A JSON object the project wrote, or an :class:`InputError` naming the damaged file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{path} is damaged or unreadable ({type(exc).__name__}: {str(exc)[:120]}); "
                         f"restore it or recompute it") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is damaged: expected a JSON object, got {type(data).__name__}")
    return data


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


def load_checkpoint(path: Path, state_dict_ok: bool = False) -> dict:
    """A checkpoint the project wrote (checked: model, labels, epoch; finite weights), or with
    ``state_dict_ok`` also a plain state dict (pretrained weights from elsewhere) as ``{"model": it}``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"checkpoint {path} is a directory")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a readable DP-CXR checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None

    def bad(why: str):
        return InputError(f"{path}: not a DP-CXR checkpoint ({why})")

    if not isinstance(ckpt, dict):
        raise bad(f"holds a {type(ckpt).__name__}, expected a dict with model, labels and epoch")
    if state_dict_ok and "model" not in ckpt:
        ckpt = {"model": ckpt}
    else:
        missing = [key for key in ("model", "labels", "epoch") if key not in ckpt]
        if missing:
            raise bad(f"no {', '.join(missing)}")
        labels = ckpt["labels"]
        if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) for x in labels):
            raise bad(f"'labels' is {str(labels)[:80]}, expected a list of label names")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise bad(f"the weights are a {type(model).__name__}, expected a state dict of tensors")
    broken = [k for k, v in model.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise bad(f"non-finite weights in {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}")
    return ckpt


class Curves:
    """TensorBoard curves of an experiment (``private/tensorboard``). TensorBoard writes from a thread of
    its own, whose failure (a full disk) comes back as a bare OSError at a later call, which would stop
    the command without saying what failed: here a failed write is said once, naming the folder and the
    step the curves stop at, and the command goes on (``after``: what is written apart, e.g. the
    checkpoints or the results, and a full disk stops with its own error there)."""

    def __init__(self, folder: Path, after: str, purge_step: int | None = None):
        self.folder, self.after, self.writer = folder, after, None
        try:
            self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        except OSError as exc:
            self._failed(exc, "no curves are written")

    def add(self, scalars: dict[str, float], step: int) -> None:
        """``scalars`` at ``step``, flushed to disk (the flush re-raises the thread's failure)."""
        self._write(lambda w: [w.add_scalar(tag, value, step) for tag, value in scalars.items()],
                    f"the curves stop at step {step}")

    def hparams(self, hparams: dict, metrics: dict[str, float], run_name: str) -> None:
        """One run of TensorBoard's hyper-parameter view."""
        self._write(lambda w: w.add_hparams(hparams, metrics, run_name=run_name), f"run {run_name} is missing")

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
        except OSError as exc:
            self._failed(exc, "the curves may miss their last step")

    def _write(self, write, what: str) -> None:
        if self.writer is None:
            return
        try:
            write(self.writer)
            self.writer.flush()
        except OSError as exc:
            self._failed(exc, what)

    def _failed(self, exc: OSError, what: str) -> None:
        self.writer = None
        warnings.warn(f"TensorBoard could not write to {self.folder}: {exc.strerror or exc}; {what}. "
                      f"{self.after}")


class FolderLock:
    """``<folder>/.lock`` holding the owner's pid and host, so two processes never work on one folder at
    once (an experiment being trained, a privacy ledger being booked).

    A lock left by a dead process on this host is taken over with a warning; one from another host
    cannot be checked. A lock held by a live process is waited for up to ``wait_s`` seconds (a ledger is
    held for the moment of a booking), then refused, naming the file to delete once that process is known
    to be gone.
    """

    def __init__(self, folder: Path, doing: str = "trained", wait_s: float = 0.0):
        self.path = Path(folder) / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self.doing, self.wait_s, self.deadline = doing, wait_s, 0.0

    def __enter__(self):
        make_folder(self.path.parent)
        self.deadline = time.monotonic() + self.wait_s
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
        if not isinstance(holder, dict) or "pid" not in holder:
            # the owner writes its pid right after creating the file: one still without it after a
            # few seconds was left by a process killed in between
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0
            if age > 10:
                warnings.warn(f"{self.path}: taking over a lock without an owner ({age:.0f} s old)")
                self.path.unlink(missing_ok=True)
                return
            time.sleep(0.5)
            return
        if holder.get("host") == self.owner["host"] and not _alive(holder.get("pid")):
            warnings.warn(f"{self.path}: taking over the lock of process {holder.get('pid')}, which is gone")
            self.path.unlink(missing_ok=True)
            return
        if time.monotonic() < self.deadline:
            time.sleep(0.1)
            return
        raise InputError(f"{self.path.parent} is being {self.doing} by process {holder.get('pid')} on "
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
