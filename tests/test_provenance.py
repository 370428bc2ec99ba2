"""Provenance of checkpoints and who an audit trains (issue 31, items 4 and 5): a DP run started from
weights trained on its own patients composes them (or is refused), an external checkpoint is stated
as such, the card composes what its own patients get, and an audit's reference runs are booked under
the test patients they train and said to."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from opacus.accountants import RDPAccountant

from config import load_config
from conftest import write_tiny_config
from data.dataset import load_table
from evaluation.compare_experiments import privacy_of
from main_2D_DP import main
from privacy.ledger import Ledger, patient_keys, worst
from privacy.release import UNKNOWN_START, rounded_up


def _setup(root: Path, data_cache: Path, **sections) -> SimpleNamespace:
    """A tiny config of one epoch in ``root`` with its own ledger, and helpers to run commands on it."""
    path = write_tiny_config(root, data_cache, training={"epochs": 1}, evaluation={"bootstrap": 20, "permutations": 0},
                             **sections)
    exps = root / "experiments"

    def train(name: str, *changes: str) -> int:
        return main(["train", "--config", str(path), "--name", name, *(["--set", *changes] if changes else [])])

    def release(name: str, *flags: str) -> dict:
        assert main(["predict", str(exps / name)]) == 0
        assert main(["export", str(exps / name), str(root / f"{name}_bundle"), *flags]) == 0
        return json.loads((root / f"{name}_bundle" / "model_card.json").read_text())["privacy"]

    def ledger() -> Ledger:
        [folder] = [p for p in (root / "ledger").iterdir() if p.is_dir()]
        return Ledger(folder.parent, folder.name)

    def entry(name: str) -> dict:
        [found] = [e for e in ledger().entries() if Path(e["experiment"]).name == name]
        return found

    def summary(name: str) -> dict:
        return json.loads((exps / name / "private" / "summary.json").read_text())

    return SimpleNamespace(path=path, root=root, exps=exps, train=train, release=release, ledger=ledger,
                           entry=entry, summary=summary)


@pytest.fixture(scope="module")
def same(tmp_path_factory, data_cache):
    """A non-private run ("open") and a DP run ("dp", epsilon 2) on the private site's patients."""
    world = _setup(tmp_path_factory.mktemp("same-patients"), data_cache)
    assert world.train("open", "dp.enabled=false") == 0
    assert world.train("dp", "dp.epsilon=2") == 0
    return world


def _refused(world, capsys, name: str, start: Path) -> str:
    """Train ``name`` from ``start``: refused with one line, nothing written (no folder, no entry)."""
    before = len(world.ledger().entries())
    capsys.readouterr()
    assert world.train(name, f"model.pretrained_checkpoint={start}") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: model.pretrained_checkpoint: ")
    assert str(world.ledger().folder) in err
    assert not (world.exps / name).exists() and len(world.ledger().entries()) == before
    return err


def test_every_checkpoint_records_its_run_and_a_start_from_the_same_patients_is_refused(same, capsys, tmp_path):
    open_entry = same.entry("open")
    for checkpoint in ("checkpoints/best.pt", "private/last.pt"):
        recorded = torch.load(same.exps / "open" / checkpoint, weights_only=True)["provenance"]
        assert recorded == {"ledger": same.ledger().key, "run_id": open_entry["run_id"], "private": False}

    # non-private on the same patients: epsilon inf, as an experiment folder or as the file copied elsewhere
    err = _refused(same, capsys, "from_open", same.exps / "open")
    assert "epsilon inf (non-private training on these patients (open))" in err
    assert "model.allow_same_patients: true" in err and "NOT DP for these patients" in err
    copy = tmp_path / "somewhere" / "weights.pt"
    copy.parent.mkdir()
    copy.write_bytes((same.exps / "open" / "checkpoints" / "best.pt").read_bytes())
    assert "epsilon inf (non-private" in _refused(same, capsys, "from_copy", copy)

    # a DP run on the same patients: the epsilon they already have from it
    err = _refused(same, capsys, "from_dp", same.exps / "dp")
    given = float(re.search(r"gives them epsilon ([0-9.]+) \(1 run\(s\) composed", err).group(1))
    assert given == pytest.approx(same.entry("dp")["epsilon"], rel=1e-3)


def test_an_allowed_start_from_the_same_patients_is_composed_into_the_statement_and_the_card(same):
    # from the DP run: both runs' histories composed for these patients, in the statement and on the card
    assert same.train("dp2", f"model.pretrained_checkpoint={same.exps / 'dp'}", "model.allow_same_patients=true",
                      "dp.epsilon=2") == 0
    dp = same.summary("dp2")["dp"]
    first, second = same.entry("dp"), same.entry("dp2")
    assert second["start"] == {"ledger": same.ledger().key, "run_id": first["run_id"], "private": True}
    books = RDPAccountant()
    books.history = [tuple(step) for e in (first, second) for step in e["history"]]
    composed = books.get_epsilon(dp["delta"])
    assert dp["start"]["same_patients"] == len(second["patients"]) and not dp["start"]["unbounded"]
    assert dp["start"]["epsilon"] == pytest.approx(composed, rel=1e-9) and composed > dp["epsilon_spent"] + 0.5
    assert dp["statement"].startswith(f"({composed:.4g}, ") and "this run alone: epsilon" in dp["statement"]
    card = same.release("dp2")
    assert card["epsilon"] >= composed > card["epsilon_this_run"]
    assert card["statement"].startswith(f"({card['epsilon']:g}, ") and "composed with the runs" in card["statement"]
    assert f"epsilon {card['epsilon']:g}" in card["in_words"]
    assert privacy_of(same.exps / "dp2") == f"private, epsilon {rounded_up(composed):g} (delta {dp['delta']:g}) per " \
                                            f"training patient"  # compare names the composed epsilon
    assert [r["how"] for r in same.entry("dp")["released"]] == ["export in dp2"]  # its weights left with dp2's

    # from the non-private run: NOT DP for these patients, said first, on the card and in the ledger's total
    assert same.train("notdp", f"model.pretrained_checkpoint={same.exps / 'open'}",
                      "model.allow_same_patients=true") == 0
    dp = same.summary("notdp")["dp"]
    assert dp["start"]["unbounded"] and dp["start"]["epsilon"] is None  # infinite: null in JSON
    assert dp["statement"].startswith("NOT DP for the training patients its starting weights were trained on "
                                      "(non-private training on these patients (open)); ")
    card = same.release("notdp")
    assert card["statement"].startswith("NOT DP for the training patients its starting weights were trained on")
    assert "for each other training patient" in card["statement"]
    assert card["in_words"].startswith("Not private for the training patients its starting weights were trained on")
    assert card["covers"] == "the training patients its starting weights were not trained on"
    assert any(note.startswith("NOT DP for the training patients") for note in card["does_not_cover"])
    assert card["ledger_total"]["epsilon"] is None and "(open)" in card["ledger_total"]["note"]
    assert [r["how"] for r in same.entry("open")["released"]] == ["export in notdp"]
    markdown = (same.root / "notdp_bundle" / "model_card.md").read_text()
    assert markdown.count("NOT DP for the training patients") >= 2 and "composed: unbounded" in markdown
    assert privacy_of(same.exps / "notdp").startswith("not private for the patients its starting weights")


@pytest.fixture(scope="module")
def disjoint(tmp_path_factory, data_cache):
    """A DP run on the public site (epsilon 4), exported; a DP run on the private site (epsilon 1) from it."""
    world = _setup(tmp_path_factory.mktemp("disjoint-patients"), data_cache)
    assert world.train("pub", "data.site=public", "dp.epsilon=4") == 0
    world.pub = world.release("pub")
    assert world.train("priv", "dp.epsilon=1", f"model.pretrained_checkpoint={world.exps / 'pub'}") == 0
    world.priv = world.release("priv")
    return world


def test_the_card_composes_what_its_own_training_patients_get(disjoint):
    """The public run's patients are at epsilon 4, the private run's at 1: the private model's card gives
    what its patients get from every released run (1), not the worst patient of the whole ledger (4)."""
    pub, priv = disjoint.entry("pub"), disjoint.entry("priv")
    assert not set(pub["patients"]) & set(priv["patients"])
    assert disjoint.pub["ledger_total"]["epsilon"] == disjoint.pub["epsilon"] >= 3.9
    assert disjoint.priv["ledger_total"]["epsilon"] == disjoint.priv["epsilon"] <= 1.1
    assert disjoint.priv["epsilon"] == disjoint.priv["epsilon_this_run"]
    assert "2 run(s) composed" not in disjoint.priv["ledger_total"]["note"]
    # a start from other patients composes nothing and limits nothing; it is still recorded
    dp = disjoint.summary("priv")["dp"]
    assert dp["start"]["provenance"] == "recorded" and dp["start"]["same_patients"] == 0
    assert priv["start"]["run_id"] == pub["run_id"] and disjoint.priv["starting_weights"] is None
    assert "starting weights" not in disjoint.priv["statement"]


def test_a_checkpoint_without_provenance_is_stated_as_such(disjoint, tmp_path):
    weights = torch.load(disjoint.exps / "pub" / "checkpoints" / "best.pt", weights_only=True)["model"]
    torch.save(weights, tmp_path / "external.pt")  # a plain state dict: nothing says whom it was trained on
    assert disjoint.train("ext", "dp.epsilon=1", f"model.pretrained_checkpoint={tmp_path / 'external.pt'}") == 0
    assert disjoint.entry("ext")["start"] == "unknown"
    dp = disjoint.summary("ext")["dp"]
    assert dp["start"]["provenance"] == "unknown" and UNKNOWN_START in dp["statement"]
    card = disjoint.release("ext")
    assert UNKNOWN_START in card["statement"] and UNKNOWN_START in card["does_not_cover"]
    assert UNKNOWN_START in (disjoint.root / "ext_bundle" / "model_card.md").read_text()


def test_audit_reference_runs_are_booked_under_the_test_patients_they_train_and_said_to(
        tmp_path_factory, data_cache, capsys):
    world = _setup(tmp_path_factory.mktemp("audit"), data_cache)
    assert world.train("audited") == 0
    cfg = load_config(world.exps / "audited" / "private" / "config.yaml")
    tests = set(patient_keys(load_table(cfg.data, cfg.experiment.seed).split("test")["patient_id"]))
    assert world.entry("audited")["test_patients"] == sorted(tests)
    assert "test patients are not used in training" in world.summary("audited")["dp"]["statement"]
    assert worst(world.ledger().entries(), "rdp", planned=True, among=tests).epsilon == 0

    capsys.readouterr()
    assert main(["audit", str(world.exps / "audited"), "--reference-models", "2"]) == 0
    out = capsys.readouterr().out
    references = [world.entry(f"ref-{k}") for k in range(2)]
    trained = [tests & set(r["patients"]) for r in references]
    assert all(0 < len(t) < len(tests) for t in trained)  # about half of the test patients each
    assert worst(world.ledger().entries(), "rdp", planned=True, among=tests).epsilon > 0
    count = len(trained[0] | trained[1])

    dp = world.summary("audited")["dp"]
    assert "test patients are not used in training" not in dp["statement"]
    assert dp["statement"].endswith(dp["covers"]) and dp["test_patients_trained"]["runs"] == ["ref-0", "ref-1"]
    assert f"2 other run(s) on this dataset trained {count} of its {len(tests)} test patients (ref-0, ref-1" in (
        dp["covers"])
    audit = json.loads((world.exps / "audited" / "private" / "audit" / "audit.json").read_text())
    assert audit["reference_training"].startswith("2 reference runs were trained, each on about half of the train "
                                                  "and test patients, and are booked in the privacy ledger")
    assert audit["reference_training"] in audit["attacks_note"]
    assert "2 reference runs were trained" in out
    assert "booked in the privacy ledger" in (world.exps / "audited" / "private" / "audit" / "report.html").read_text()

    card = world.release("audited")
    [note] = [n for n in card["does_not_cover"] if n.startswith("test patients: 2 other run(s)")]
    assert "trained some of its test patients (ref-0, ref-1" in note  # no exact count on the card
    assert math.isfinite(card["ledger_total"]["epsilon"])  # the reference runs stay internal
