"""The privacy ledger: every training run on the same patients, composed into one epsilon.

A patient whose data trains k models is exposed to all k mechanisms. Their Renyi-DP adds up per
order (and PRV composes likewise), so the histories of (sigma, q, steps) entries that Opacus'
accountants keep simply concatenate (Mironov 2017); a non-private run on the same patients makes the
total infinite. The ledger is kept per dataset, keyed by a fingerprint of the dataset's patients
(SHA-256 of their sorted ids, all splits: a later run may train on patients an earlier one tested
on), not by its path: a copied or moved dataset is still the same patients.

Layout: ``<output.ledger>/<fingerprint>/dataset.json`` (default ledger: ``<output.target_dir>/private/privacy_ledger``) (what the patients are: dataset, site, counts)
and one ``<run id>.json`` per training run, rewritten whenever the run checkpoints (the steps after
the last checkpoint released nothing: a resumed run repeats them with the same secret randomness).
The ledger holds exact counts and sample rates: it is private, like the experiments it lists.

What is composed is what left the hospital. Each entry's ``released`` lists how the run was released
(``export``, or ``published`` when its predictions, metrics or anything computed from it were, recorded
with ``ledger --released``); ``[]`` = internal: listed apart and not composed, since what never
leaves tells nobody outside anything. Entries written before releases were recorded have no ``released``
field and count as released (nobody recorded which ones left, and the ledger then composed them all);
``ledger --internal`` settles such an entry once. ``dp.total_budget`` still guards every run, released
or not: any of them may yet be released.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from opacus.accountants import create_accountant

from artifacts import atomic_write_text, json_text, private_folder, read_json
from config import InputError


def is_released(entry: dict) -> bool:
    """Whether the run left the hospital; an entry without the field predates the record: released."""
    return "released" not in entry or bool(entry["released"])


def fingerprint(patient_ids: pd.Series) -> str:
    """A key for the set of patients (their ids as text, sorted)."""
    ids = sorted(set(patient_ids.astype(str)))
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20]


class Ledger:
    """The runs recorded for one dataset's patients."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = Path(root), key
        self.folder = self.root / key

    @classmethod
    def for_table(cls, root: Path, frame: pd.DataFrame, description: dict) -> Ledger:
        """The ledger of the patients in ``frame`` (one site, all splits), created with ``description``."""
        ledger = cls(root, fingerprint(frame["patient_id"]))
        if not (ledger.folder / "dataset.json").is_file():
            images = frame.groupby(frame["patient_id"].astype(str)).size()
            atomic_write_text(ledger.folder / "dataset.json", json_text(
                {**description, "patients": len(images), "images": int(images.sum()),
                 "most_images_per_patient": int(images.max())}))
        return ledger

    @property
    def dataset(self) -> dict:
        return read_json(self.folder / "dataset.json")

    def record(self, run_id: str, entry: dict) -> None:
        """Write the run's entry, keeping its release record (a resumed run stays released)."""
        path = self.folder / f"{run_id}.json"
        kept = {"released": []}
        if path.is_file():
            kept = {k: v for k, v in read_json(path).items() if k == "released"}
        atomic_write_text(path, json_text(
            {**entry, **kept, "run_id": run_id, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    def _entry(self, run_id: str) -> tuple[Path, dict]:
        path = self.folder / f"{run_id}.json"
        if not path.is_file():
            raise InputError(f"{path}: this run has no entry in the privacy ledger (output.ledger of its "
                             f"private/config.yaml); its release cannot be recorded")
        return path, read_json(path)

    def release(self, run_id: str, how: str) -> None:
        """Record that the run left the hospital (``export`` or ``published``); never undone."""
        path, entry = self._entry(run_id)
        entry["released"] = [*entry.get("released", []), {"how": how, "date": time.strftime("%Y-%m-%d")}]
        atomic_write_text(path, json_text(entry))

    def keep_internal(self, run_id: str) -> None:
        """Settle an entry that predates the release record as internal; a recorded release stays."""
        path, entry = self._entry(run_id)
        if entry.get("released"):
            raise InputError(f"{path}: released ({', '.join(r['how'] for r in entry['released'])}); what left "
                             f"the hospital cannot be called back")
        atomic_write_text(path, json_text({**entry, "released": []}))

    def entries(self, exclude: str | None = None) -> list[dict]:
        found = []
        for path in sorted(self.folder.glob("*.json")):
            if path.name == "dataset.json" or path.stem == exclude:
                continue
            found.append(read_json(path))  # a damaged entry is an input error naming it
        return found

    def total(self, entries: list[dict], accountant: str, delta: float | None = None) -> tuple[float, str]:
        """epsilon of all ``entries`` composed with one ``accountant`` at ``delta`` (None: the largest
        delta of the runs), for each patient, and how it came about (runs named by their folder's name, not
        its path: the note goes on model cards, which name no path of the training machine)."""
        private = [e for e in entries if e["private"]]
        if len(private) < len(entries):
            names = ", ".join(Path(e["experiment"]).name for e in entries if not e["private"])
            return math.inf, f"non-private training on these patients ({names})"
        if self.dataset["most_images_per_patient"] > 1:
            per_image = [Path(e["experiment"]).name for e in entries if e["unit"] == "image"]
            if per_image:
                return math.inf, (f"image-level DP runs ({', '.join(per_image)}) bound no patient with several "
                                  f"images")
        if not entries:
            return 0.0, "no training run recorded"
        books = create_accountant(accountant)
        books.history = [tuple(step) for e in entries for step in e["history"]]
        delta = max(e["delta"] for e in entries) if delta is None else delta
        return float(books.get_epsilon(delta)), f"{len(entries)} run(s) composed at delta {delta:g}"

    def released_total(self, entries: list[dict], accountant: str,
                       delta: float | None = None) -> tuple[float, str]:
        """:meth:`total` of the released ``entries``; the internal ones are counted in the note, not composed."""
        released = [e for e in entries if is_released(e)]
        epsilon, note = self.total(released, accountant, delta) if released else (0.0, "no run released")
        internal = len(entries) - len(released)
        return epsilon, note + (f"; {internal} other run(s) on these patients not released, not composed"
                                if internal else "")


@dataclass
class Booking:
    """One training run's entry in the ledger of its patients."""

    ledger: Ledger
    run_id: str
    experiment: str
    private: bool
    unit: str
    accountant: str
    # a DP run's own; for a non-private run, the dataset's default, for dp.total_budget's composition only
    # (its entry records no delta: it has no guarantee)
    delta: float

    def entry(self, history: list, steps: int) -> dict:
        epsilon = None
        if self.private:
            books = create_accountant(self.accountant)
            books.history = [tuple(step) for step in history]
            epsilon = float(books.get_epsilon(self.delta)) if history else 0.0
        return {"experiment": self.experiment, "private": self.private, "unit": self.unit,
                "accountant": self.accountant, "delta": self.delta if self.private else None, "epsilon": epsilon,
                "history": [list(step) for step in history] if self.private else None,
                "steps": steps}

    def record(self, history: list, steps: int) -> None:
        """Record the accountant ``history`` after ``steps`` training steps."""
        self.ledger.record(self.run_id, self.entry(history, steps))

    def check(self, planned_history: list, planned_steps: int, total_budget: float) -> None:
        """Refuse the run if, trained as planned, it takes the composition of every run on these
        patients past ``total_budget``."""
        others = self.ledger.entries(exclude=self.run_id)
        total, reason = self.ledger.total(others + [self.entry(planned_history, planned_steps)], self.accountant,
                                          self.delta)
        if total > total_budget:
            spent, why = self.ledger.total(others, self.accountant, self.delta)
            raise InputError(f"dp.total_budget = {total_budget:g}: trained as planned, this run would bring the patients "
                             f"of the ledger {self.ledger.folder} to epsilon {total:.4g} at delta {self.delta:g} "
                             f"({reason}); {len(others)} other run(s) have spent {spent:.4g} ({why}). "
                             f"`python main_2D_DP.py ledger` lists them")


def ledger_root(target_dir: str, ledger: str | None) -> Path:
    """``output.ledger``, or ``<output.target_dir>/private/privacy_ledger`` when it is not set."""
    return Path(ledger).expanduser() if ledger else private_folder(target_dir) / "privacy_ledger"


def describe(root: Path, accountant: str, delta: float | None) -> list[dict]:
    """Per dataset in the ledger at ``root``: its description, released and internal runs, the composition
    of the released ones and, under ``all_runs``, of every run (what ``dp.total_budget`` guards)."""
    if not root.is_dir():
        raise InputError(f"{root}: no privacy ledger here yet (it is written by the first training run)")
    out = []
    for folder in sorted(p for p in root.iterdir() if (p / "dataset.json").is_file()):
        ledger = Ledger(root, folder.name)
        entries = ledger.entries()
        epsilon, note = ledger.released_total(entries, accountant, delta)
        every, every_note = ledger.total(entries, accountant, delta)
        out.append({"fingerprint": folder.name, "folder": str(folder), "dataset": ledger.dataset,
                    "released": [e for e in entries if is_released(e)],
                    "internal": [e for e in entries if not is_released(e)], "accountant": accountant,
                    "total_epsilon": epsilon, "note": note, "all_runs": {"epsilon": every, "note": every_note}})
    return out

