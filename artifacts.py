"""Files of an experiment folder: atomic writes and safe checkpoint loading.

Writes go to a temporary file in the same folder, are fsynced and renamed over the target, so a
kill leaves either the old or the new file, never half of one. Checkpoints hold only tensors and
plain Python values and are loaded with ``weights_only=True``: a file from another site cannot run
code on load.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from config import InputError


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
