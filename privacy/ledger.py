"""The privacy ledger: every training run on a dataset's patients, composed per patient.

A patient whose data trains k models is exposed to all k mechanisms. Their Renyi-DP adds up per order
(and PRV composes likewise), so the histories of (sigma, q, steps) entries that Opacus' accountants
keep simply concatenate (Mironov 2017); a non-private run makes its patients' epsilon infinite. Runs on
one dataset need not train the same patients (one on PA views only, one on all sites, an audit's
reference run on half of them), so each run's entry lists the patients it trained (SHA-256 of their
ids, 16 hex digits) and the ledger composes per patient p, at one delta:

    RDP_p(alpha) = sum over the runs r that trained p of RDP_r(alpha)
    epsilon_p    = epsilon of RDP_p at delta (the runs' histories concatenated in one accountant)
    total        = max over patients p of epsilon_p, with how many patients are at that level

Patients trained by the same set of runs have the same epsilon: each distinct set is composed once. An
image-level DP run bounds one image, so it leaves its patients with several training images unbounded.

One ledger per dataset and folder, whatever a run's filters (``data.site``, ``data.views``) and
wherever its experiments go: ``<output.ledger>/<dataset>-<key>/``, the key a hash of the dataset's
name and resolved ``data.root`` or, for the built-in synthetic data, of its generator settings (version,
seed, patients per site: the same patients at every image size and cache folder). A copy of a dataset
in another folder is another ledger: train from one folder. ``output.ledger`` defaults to a per-user
folder, ``$XDG_DATA_HOME/dp-cxr/ledger`` (``~/.local/share/dp-cxr/ledger``), not to one per
``output.target_dir``.

Layout: ``ledger.json`` (the dataset: its name and folder or generator settings) and one
``<run id>.json`` per training run. A run is booked under the lock of the ledger's root
(:class:`artifacts.FolderLock`): the ``dp.total_budget`` check and the entry recording the run's plan
are one step, so two runs started at once cannot both pass it. ``dp.total_budget`` guards every run,
released or not (any may yet be released), as planned (a run still training, or interrupted, counts the
steps it may yet take): a run is refused when, trained as planned, it would take any of its patients
past the budget. The entry is rewritten with the steps taken before each checkpoint (``last.pt``,
``best.pt``) is written, so no checkpoint holds steps the ledger lacks; the steps after the last
checkpoint released nothing (a resumed run repeats them with the same secret randomness).

What is composed for a model card is what left the hospital. Each entry's ``released`` lists how the run
was released (``export``, or ``published`` when its predictions, metrics or anything computed from it
were, recorded with ``ledger --released``); ``[]`` = internal: listed apart and not composed, since what
never leaves tells nobody outside anything. Entries written before releases were recorded have no
``released`` field and count as released (nobody recorded which ones left, and the ledger then composed
them all); ``ledger --internal`` settles such an entry once.

Ledgers of the earlier format (one folder per fingerprint of a table's patients, with ``dataset.json``;
entries without their patients) are refused until ``ledger --migrate FOLDER`` has moved their entries
into the current ledger of their dataset, each counted for every patient of it (it did not record which
it trained: this overstates, never hides), and pointed the experiments' configs at it; the old folder is
renamed ``<name>.migrated``. The ledger holds exact counts and sample rates: it is private, like the
experiments it lists.

Provenance. Every checkpoint a run writes records its ledger's key, its run id and whether it was private
(:func:`provenance`), and each entry records where its weights started (``start``: that record of the
checkpoint it was initialised from, ``"unknown"`` for a file without one, None from scratch), so the runs
a model's weights come from can be followed (:func:`start_chain`). A model carries what those runs learnt
of their patients: a run started from one trained on some of its own patients composes that run's
history for them into its statement, and releasing a model releases the runs its weights come from.
Each entry also lists its dataset's test patients (``test_patients``), so that a statement can tell
whether other runs (an audit's reference runs train on half of the train and test patients) trained them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml
from opacus.accountants import create_accountant

from artifacts import FolderLock, atomic_write_text, json_text, private_folder, read_json
from config import InputError, read_yaml

FORMAT = 2
BOOKING_WAIT_S = 120  # a booking holds the ledger's lock for a moment; a migration for longer


def default_root() -> Path:
    """``$XDG_DATA_HOME/dp-cxr/ledger``, or ``~/.local/share/dp-cxr/ledger`` (a relative XDG_DATA_HOME is
    ignored, as the XDG specification says)."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    return (Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share") / "dp-cxr" / "ledger"


def ledger_root(ledger: str | None) -> Path:
    """``output.ledger`` (resolved), or the per-user default when it is not set."""
    return (Path(ledger).expanduser() if ledger else default_root()).resolve()


def earlier_default(target_dir: str | Path) -> Path:
    """Where the ledger was kept by default before it was per patient:
    ``<output.target_dir>/private/privacy_ledger``."""
    return private_folder(target_dir) / "privacy_ledger"


def patient_keys(patient_ids) -> list[str]:
    """The ledger's names for these patients: SHA-256 of each id as text, 16 hex digits, sorted."""
    return sorted({hashlib.sha256(str(p).encode()).hexdigest()[:16] for p in patient_ids})


def dataset_identity(dataset: str, root: str | Path) -> dict:
    """What makes two runs' patients the same people: the dataset and its resolved folder, or for the
    built-in synthetic data the settings it was generated with (read from its folder's ``done.json``)."""
    root = Path(root).expanduser().resolve()
    if dataset != "synthetic":
        return {"dataset": dataset, "root": str(root)}
    made = read_json(root / "done.json")
    return {"dataset": dataset, "generator": made.get("version"), "seed": made["seed"],
            "patients_per_site": made["n_patients"]}


def provenance(ledger_key: str, run_id: str, private: bool) -> dict:
    """What a checkpoint records of the run that wrote it: its ledger (by key: the dataset, never a path),
    its entry there, and whether it was private."""
    return {"ledger": ledger_key, "run_id": run_id, "private": private}


def trained(entries: list[dict], keys: set[str]) -> tuple[list[dict], int]:
    """The runs of ``entries`` that trained any of the patients ``keys``, and how many of them they trained
    (a run that did not record its patients counts for all of them)."""
    runs = [e for e in entries if e.get("patients") is None or keys & set(e["patients"])]
    if any(e.get("patients") is None for e in runs):
        return runs, len(keys)
    return runs, len(set().union(*(keys & set(e["patients"]) for e in runs)))


def is_released(entry: dict) -> bool:
    """Whether the run left the hospital; an entry without the field predates the record: released."""
    return "released" not in entry or bool(entry["released"])


@dataclass
class Level:
    """The epsilon of the worst-off patients of some runs."""

    epsilon: float
    patients: int | None  # how many patients have it (None: only entries that did not record their patients)
    note: str  # how it came about; names runs by their folder's name, never a path (it goes on model cards)


def worst(entries: list[dict], accountant: str, delta: float | None = None, planned: bool = False,
          among: set[str] | None = None) -> Level:
    """The largest per-patient epsilon of ``entries`` at ``delta`` (None: the largest delta of the runs),
    over every patient they trained or only those ``among``; with ``planned``, each run as planned."""
    if not entries:
        return Level(0.0, 0, "no training run recorded")
    unbounded = [_unbounded_patients(e) for e in entries]
    runs_of: dict[str, list[tuple[int, bool]]] = {}
    for i, entry in enumerate(entries):
        for p in entry.get("patients") or []:
            runs_of.setdefault(p, []).append((i, unbounded[i] is None or p in unbounded[i]))
    # entries that did not record their patients (migrated ones) count for every patient
    everyone = tuple((i, unbounded[i] is None) for i, e in enumerate(entries) if e.get("patients") is None)
    sets: dict[tuple, int | None] = Counter(tuple(runs_of.get(p, ())) + everyone
                                            for p in (runs_of if among is None else among))
    if not sets:
        sets = {everyone: None}
    if delta is None:
        delta = max((e["delta"] for e in entries if e["private"]), default=None)
    levels = []
    for runs, count in sets.items():  # each distinct set of runs composed once
        epsilon, note = _compose([entries[i] for i, _ in runs], any(u for _, u in runs), accountant, delta, planned)
        levels.append(Level(epsilon, count, note))
    top = max(level.epsilon for level in levels)
    at_top = [level for level in levels if math.isclose(level.epsilon, top, rel_tol=1e-9)]
    counts = [level.patients for level in at_top]
    return Level(top, None if None in counts else sum(counts), at_top[0].note)


def released_level(entries: list[dict], accountant: str, delta: float | None = None,
                   among: set[str] | None = None) -> Level:
    """:func:`worst` of the released ``entries``, over every patient or only those ``among``; the internal
    ones (that trained any of them) are counted in the note, not composed."""
    released = [e for e in entries if is_released(e)]
    level = worst(released, accountant, delta, among=among) if released else Level(0.0, 0, "no run released")
    internal = [e for e in entries if not is_released(e)]
    internal = len(internal if among is None else trained(internal, among)[0])
    if internal:
        level.note += f"; {internal} other run(s) on these patients not released, not composed"
    return level


def carried(root: Path, key: str, start: dict | str | None, patients: set[str]) -> tuple[list[dict], int]:
    """The runs a model's weights come from (:func:`start_chain` of ``start``) in ledger ``key`` that trained
    any of ``patients``, and how many of them they trained."""
    return trained([e for e in start_chain(root, start) if e["ledger"] == key], patients)


def start_chain(root: Path, start: dict | str | None) -> list[dict]:
    """The entries of the runs a model's weights come from, nearest first: the run its checkpoint's
    provenance ``start`` names, the run that one started from, and so on, each from its ledger under
    ``root`` (with the ledger's key added as ``ledger``). A run missing from its ledger stands for every
    patient of it, non-private: whom it trained and how cannot be told."""
    chain, seen = [], set()
    while isinstance(start, dict) and start["run_id"] not in seen:
        seen.add(start["run_id"])
        path = Ledger(root, start["ledger"]).folder / f"{start['run_id']}.json"
        entry = read_json(path) if path.is_file() else {
            "experiment": f"run {start['run_id']} (no entry in ledger {start['ledger']})", "private": False,
            "unit": "patient", "patients": None, "history": None, "delta": None, "start": None, "missing": True}
        chain.append({**entry, "ledger": start["ledger"]})
        start = entry.get("start")
    return chain


def test_use(ledger: Ledger, run_id: str) -> dict | None:
    """Which other runs of ``ledger`` trained the test patients of run ``run_id`` (an audit's reference
    runs train on half of the train and test patients): their experiments' names, how many test patients
    they trained and of how many; None for an entry that did not record its test patients."""
    own = ledger.entry(run_id)
    if own.get("test_patients") is None:
        return None
    runs, count = trained(ledger.entries(exclude=run_id), set(own["test_patients"]))
    return {"runs": sorted(Path(e["experiment"]).name for e in runs), "patients": count,
            "of": len(own["test_patients"])}


def _unbounded_patients(entry: dict) -> set[str] | None:
    """The patients a run leaves without a bound: all of them (None) for a non-private run, and for an
    image-level one that did not record them; otherwise those with several images in an image-level run."""
    if not entry["private"]:
        return None
    several = entry.get("several_images", [])
    return set() if entry["unit"] != "image" else (None if several is None else set(several))


def _compose(runs: list[dict], unbounded: bool, accountant: str, delta: float | None,
             planned: bool) -> tuple[float, str]:
    """epsilon of ``runs`` composed for one patient, and how it came about."""
    def names(kept) -> str:
        return ", ".join(Path(e["experiment"]).name for e in kept)

    if not runs:
        return 0.0, "no run trained these patients"
    if unbounded:
        open_runs = [e for e in runs if not e["private"]]
        if open_runs:
            return math.inf, f"non-private training on these patients ({names(open_runs)})"
        return math.inf, (f"image-level DP runs ({names(e for e in runs if e['unit'] == 'image')}) bound no "
                          f"patient with several images")
    books = create_accountant(accountant)
    field = "planned_history" if planned else "history"
    books.history = [tuple(step) for e in runs for step in (e.get(field) or e["history"])]
    epsilon = float(books.get_epsilon(delta)) if books.history else 0.0
    return epsilon, f"{len(runs)} run(s) composed at delta {delta:g}"


class Ledger:
    """The runs recorded on one dataset's patients."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = Path(root), key
        self.folder = self.root / key

    @classmethod
    def of_dataset(cls, root: Path, dataset: str, data_root: str | Path) -> tuple[Ledger, dict]:
        """The ledger of ``dataset`` in ``data_root`` (created by its first booking), and its identity."""
        identity = dataset_identity(dataset, data_root)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return cls(root, f"{dataset}-{digest}"), identity

    @classmethod
    def of_experiment(cls, cfg, exp_dir: Path) -> Ledger:
        """The ledger an experiment was booked in (its ``private/config.yaml``)."""
        if "ledger_key" not in cfg.derived:
            raise InputError(f"{exp_dir}: booked in a ledger of an earlier DP-CXR version ({cfg.output.ledger}); "
                             f"run `python main_2D_DP.py ledger --migrate {cfg.output.ledger}` first")
        return cls(Path(cfg.output.ledger), cfg.derived["ledger_key"])

    @property
    def description(self) -> dict:
        return read_json(self.folder / "ledger.json")

    def record(self, run_id: str, entry: dict) -> None:
        """Write the run's entry, keeping its release record (a resumed run stays released)."""
        path = self.folder / f"{run_id}.json"
        kept = {"released": []}
        if path.is_file():
            kept = {k: v for k, v in read_json(path).items() if k == "released"}
        atomic_write_text(path, json_text(
            {**entry, **kept, "run_id": run_id, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    def entry(self, run_id: str) -> dict:
        """The entry of run ``run_id`` (:class:`InputError` when it has none)."""
        return self._entry(run_id)[1]

    def _entry(self, run_id: str) -> tuple[Path, dict]:
        path = self.folder / f"{run_id}.json"
        if not path.is_file():
            raise InputError(f"{path}: this run has no entry in the privacy ledger (output.ledger of its "
                             f"private/config.yaml), which records its release and the patients it trained")
        return path, read_json(path)

    def release(self, run_id: str, how: str) -> None:
        """Record that the run left the hospital (``export`` or ``published``), and with it the runs its
        weights come from (:func:`start_chain`: what they learnt is in its weights); never undone."""
        path, entry = self._entry(run_id)
        _add_release(path, how)
        for earlier in start_chain(self.root, entry.get("start")):
            if not earlier.get("missing"):
                _add_release(Ledger(self.root, earlier["ledger"]).folder / f"{earlier['run_id']}.json",
                             f"{how} in {Path(entry['experiment']).name}")

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
            if path.name == "ledger.json" or path.stem == exclude:
                continue
            found.append(read_json(path))  # a damaged entry is an input error naming it
        return found

    def total(self, entries: list[dict], accountant: str, delta: float | None = None) -> tuple[float, str]:
        """The worst patient's epsilon of ``entries`` composed with one ``accountant`` at ``delta`` (None:
        the largest delta of the runs), and how it came about."""
        level = worst(entries, accountant, delta)
        return level.epsilon, level.note


def _add_release(path: Path, how: str) -> None:
    entry = read_json(path)
    entry["released"] = [*entry.get("released", []), {"how": how, "date": time.strftime("%Y-%m-%d")}]
    atomic_write_text(path, json_text(entry))


@dataclass
class Booking:
    """One training run's entry in the ledger of its dataset."""

    ledger: Ledger
    identity: dict  # the ledger's ledger.json, written with its first entry
    run_id: str
    experiment: str
    private: bool
    unit: str
    accountant: str
    # a DP run's own; for a non-private run, the default for its patients, for dp.total_budget's composition
    # only (its entry records no delta: it has no guarantee)
    delta: float
    patients: list[str]  # patient_keys of the patients it trains
    several_images: list[str]  # of those, the ones with several training images (unbounded by an image-level run)
    test_patients: list[str]  # patient_keys of its dataset's test split
    start: dict | str | None  # the provenance of the checkpoint its weights started from ("unknown": none recorded)
    plan: tuple[list, int] = ([], 0)  # the history and steps as planned (set by open)

    def entry(self, history: list, steps: int) -> dict:
        epsilon = None
        if self.private:
            books = create_accountant(self.accountant)
            books.history = [tuple(step) for step in history]
            epsilon = float(books.get_epsilon(self.delta)) if history else 0.0
        return {"experiment": self.experiment, "private": self.private, "unit": self.unit,
                "accountant": self.accountant, "delta": self.delta if self.private else None, "epsilon": epsilon,
                "history": self._lists(history), "steps": steps, "planned_history": self._lists(self.plan[0]),
                "planned_steps": self.plan[1], "patients": self.patients,
                "several_images": self.several_images if self.unit == "image" else [],
                "test_patients": self.test_patients, "start": self.start}

    def _lists(self, history: list) -> list | None:
        return [list(step) for step in history] if self.private else None

    def open(self, history: list, steps: int, planned_history: list, planned_steps: int,
             total_budget: float | None) -> None:
        """Book the run: its ``history`` after ``steps`` and its plan; refused (:class:`InputError`, nothing
        written) when, trained as planned, it would take any of its patients past ``total_budget``. The
        check and the booking hold the ledger's lock together."""
        self.plan = ([tuple(step) for step in planned_history], planned_steps)
        with FolderLock(self.ledger.root, "booked", wait_s=BOOKING_WAIT_S):
            if total_budget is not None:
                self._check(total_budget)
            if not (self.ledger.folder / "ledger.json").is_file():
                atomic_write_text(self.ledger.folder / "ledger.json", json_text({"format": FORMAT, **self.identity}))
            self.record(history, steps)

    def record(self, history: list, steps: int) -> None:
        """Record the accountant ``history`` after ``steps`` training steps."""
        self.ledger.record(self.run_id, self.entry(history, steps))

    def _check(self, total_budget: float) -> None:
        others = self.ledger.entries(exclude=self.run_id)
        mine = set(self.patients)
        after = worst(others + [self.entry(*self.plan)], self.accountant, self.delta, planned=True, among=mine)
        if after.epsilon > total_budget:
            before = worst(others, self.accountant, self.delta, planned=True, among=mine)
            raise InputError(f"dp.total_budget = {total_budget:g}: trained as planned, this run would bring its "
                             f"worst-off patients to epsilon {after.epsilon:.4g} ({after.note}) in the ledger of "
                             f"their dataset, {self.ledger.folder}; the runs there that trained them, as planned, "
                             f"bring them to {before.epsilon:.4g} ({before.note}). `python main_2D_DP.py ledger` "
                             f"lists the runs")


def earlier_format(root: Path) -> list[Path]:
    """The ledger folders of the earlier format under ``root`` (not yet migrated)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "dataset.json").is_file() and not p.name.endswith(".migrated"))


def refuse_earlier_format(*roots: Path) -> None:
    """Refuse to book or list while a ledger of the earlier format would be left out."""
    for root in roots:
        old = earlier_format(Path(root))
        if old:
            runs = sum(1 for folder in old for p in folder.glob("*.json") if p.name != "dataset.json")
            raise InputError(f"{root} holds {len(old)} privacy ledger(s) of an earlier DP-CXR version ({runs} run(s); "
                             f"e.g. {old[0].name}), which the current ledger would leave out: run "
                             f"`python main_2D_DP.py ledger --migrate {root}` to move them into it, then run this "
                             f"again")


def migrate(old_root: Path, root: Path) -> list[tuple[Path, Ledger, int]]:
    """Move the entries of the earlier-format ledgers under ``old_root`` into the ledgers of their datasets
    under ``root``, each counted for every patient (they did not record their patients), and point the
    experiments' configs at them; each old folder is renamed ``<name>.migrated``. Returns (old folder,
    ledger, runs moved) per folder."""
    moved = []
    with FolderLock(root, "booked", wait_s=BOOKING_WAIT_S):
        for folder in earlier_format(Path(old_root)):
            about = read_json(folder / "dataset.json")
            try:
                ledger, identity = Ledger.of_dataset(root, about["dataset"], about["root"])
            except InputError as exc:
                raise InputError(f"{folder}: its dataset folder cannot be read ({exc}), so the ledger of its patients "
                                 f"cannot be told; restore it and migrate again") from None
            if not (ledger.folder / "ledger.json").is_file():
                atomic_write_text(ledger.folder / "ledger.json", json_text({"format": FORMAT, **identity}))
            runs = [read_json(p) for p in sorted(folder.glob("*.json")) if p.name != "dataset.json"]
            several = None if about["most_images_per_patient"] > 1 else []
            for entry in runs:
                atomic_write_text(ledger.folder / f"{entry['run_id']}.json", json_text(
                    {**entry, "patients": None, "several_images": several if entry["unit"] == "image" else [],
                     "migrated_from": str(folder)}))
                _point_config(Path(entry["experiment"]), root, ledger.key)
            folder.rename(folder.with_name(folder.name + ".migrated"))
            moved.append((folder, ledger, len(runs)))
    return moved


def _point_config(exp_dir: Path, root: Path, key: str) -> None:
    """An experiment's config names the ledger its entry is in (a deleted experiment has none to change)."""
    path = exp_dir / "private" / "config.yaml"
    if not path.is_file():
        return
    raw = read_yaml(path)
    raw["output"]["ledger"] = str(root)
    raw["derived"] = {**{k: v for k, v in raw["derived"].items() if k != "patients_fingerprint"}, "ledger_key": key}
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))


def describe(root: Path, accountant: str, delta: float | None) -> list[dict]:
    """Per dataset in the ledger at ``root``: its description, released and internal runs, the worst
    patient's composition of the released ones and, under ``all_runs``, of every run as planned (what
    ``dp.total_budget`` guards), each with how many patients are at that level."""
    if not root.is_dir():
        raise InputError(f"{root}: no privacy ledger here yet (it is written by the first training run)")
    out = []
    for folder in sorted(p for p in root.iterdir() if (p / "ledger.json").is_file()):
        ledger = Ledger(root, folder.name)
        entries = ledger.entries()
        shown, every = released_level(entries, accountant, delta), worst(entries, accountant, delta, planned=True)
        known = [e["patients"] for e in entries if e.get("patients") is not None]
        out.append({"key": folder.name, "folder": str(folder), "dataset": ledger.description,
                    "patients": len(set().union(*known)) if known else None,
                    "released": [e for e in entries if is_released(e)],
                    "internal": [e for e in entries if not is_released(e)], "accountant": accountant,
                    "total_epsilon": shown.epsilon, "worst_patients": shown.patients, "note": shown.note,
                    "all_runs": {"epsilon": every.epsilon, "note": every.note, "worst_patients": every.patients}})
    return out
