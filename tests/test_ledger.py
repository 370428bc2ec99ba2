"""The privacy ledger: every run on the same patients composed, and the total budget enforced."""
from __future__ import annotations

import json
import math

import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from main_2D_DP import main
from privacy.ledger import Ledger, describe


def _ledger(path):
    [folder] = [p for p in (path.parent / "experiments" / "private" / "privacy_ledger").iterdir()]
    return Ledger(folder.parent, folder.name)


def test_runs_on_the_same_patients_compose_and_the_total_budget_holds(tiny_config, tmp_path, capsys):
    path = tiny_config(dp={"epsilon": 2.0}, training={"epochs": 1})
    assert main(["train", "--config", str(path), "--name", "a"]) == 0
    # the same patients at another path (the synthetic data drawn again elsewhere) are the same ledger
    assert main(["train", "--config", str(path), "--name", "b", "--set", f"data.root={tmp_path / 'copy'}"]) == 0
    ledger = _ledger(path)
    runs = ledger.entries()
    assert sorted(r["experiment"].rsplit("/", 1)[1] for r in runs) == ["a", "b"]
    assert ledger.dataset["patients"] == 120 and ledger.dataset["most_images_per_patient"] > 1

    [found] = describe(ledger.root, "rdp", None)
    composed = RDPAccountant()  # one accountant fed both histories
    composed.history = [tuple(step) for r in runs for step in r["history"]]
    delta = max(r["delta"] for r in runs)
    assert found["total_epsilon"] == pytest.approx(composed.get_epsilon(delta), rel=1e-12)
    assert found["total_epsilon"] > max(r["epsilon"] for r in runs)
    orders = list(range(2, 65))
    independent = RdpAccountant(orders=orders)
    for r in runs:
        for sigma, q, steps in r["history"]:
            independent.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), int(steps))
    assert composed.get_privacy_spent(delta=delta, alphas=orders)[0] == pytest.approx(
        independent.get_epsilon(delta), rel=1e-9)

    # resuming a run updates its own entry
    assert main(["train", "--config", str(path), "--name", "a", "--resume", "--allow-budget-increase",
                 "--set", "training.epochs=2"]) == 0
    entries = {r["experiment"].rsplit("/", 1)[1]: r for r in ledger.entries()}
    assert len(entries) == 2
    summary = json.loads((path.parent / "experiments" / "a" / "private" / "summary.json").read_text())
    assert entries["a"]["steps"] == summary["steps"] and entries["a"]["epsilon"] == pytest.approx(
        summary["dp"]["epsilon_spent"])

    capsys.readouterr()
    assert main(["ledger", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "120 patients" in out and "all runs composed (RDP)" in out and "2 run(s) composed" in out
    assert main(["ledger", "--config", str(path), "--dataset", ledger.key]) == 0
    assert main(["ledger", "--config", str(path), "--dataset", "chexpert"]) == 2
    assert "no such dataset" in capsys.readouterr().err

    # a run that would take the total past dp.total_budget is refused before anything is written
    spent = describe(ledger.root, "rdp", None)[0]["total_epsilon"]
    assert main(["train", "--config", str(path), "--name", "c", "--set", f"dp.total_budget={spent + 0.01}"]) == 2
    err = capsys.readouterr().err
    assert "dp.total_budget" in err and str(ledger.folder) in err and "2 other run(s) have spent" in err
    assert not any((path.parent / "experiments" / "c").iterdir()) and len(ledger.entries()) == 2
    assert main(["train", "--config", str(path), "--name", "c", "--set", f"dp.total_budget={spent + 20}"]) == 0

    # non-private training on the same patients: nothing bounds them any more
    assert main(["train", "--config", str(path), "--name", "open", "--set", "dp.enabled=false"]) == 0
    [found] = describe(ledger.root, "rdp", None)
    assert math.isinf(found["total_epsilon"]) and "non-private training on these patients" in found["note"]
    assert main(["train", "--config", str(path), "--name", "d", "--set", "dp.total_budget=100"]) == 2
    assert "non-private" in capsys.readouterr().err
