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
    assert found["total_epsilon"] == 0 and len(found["internal"]) == 2  # nothing released yet
    composed = RDPAccountant()  # one accountant fed both histories
    composed.history = [tuple(step) for r in runs for step in r["history"]]
    delta = max(r["delta"] for r in runs)
    assert found["all_runs"]["epsilon"] == pytest.approx(composed.get_epsilon(delta), rel=1e-12)
    assert found["all_runs"]["epsilon"] > max(r["epsilon"] for r in runs)
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
    assert "120 patients" in out and "released runs composed (RDP)" in out and "2 run(s) composed" in out
    assert main(["ledger", "--config", str(path), "--dataset", ledger.key]) == 0
    assert main(["ledger", "--config", str(path), "--dataset", "chexpert"]) == 2
    assert "no such dataset" in capsys.readouterr().err

    # a run that would take the total past dp.total_budget is refused before anything is written
    spent = describe(ledger.root, "rdp", None)[0]["all_runs"]["epsilon"]  # the budget guards every run
    assert main(["train", "--config", str(path), "--name", "c", "--set", f"dp.total_budget={spent + 0.01}"]) == 2
    err = capsys.readouterr().err
    assert "dp.total_budget" in err and str(ledger.folder) in err and "2 other run(s) have spent" in err
    assert not any((path.parent / "experiments" / "c").iterdir()) and len(ledger.entries()) == 2
    assert main(["train", "--config", str(path), "--name", "c", "--set", f"dp.total_budget={spent + 20}"]) == 0

    # non-private training on the same patients: nothing bounds them, should any run be released
    assert main(["train", "--config", str(path), "--name", "open", "--set", "dp.enabled=false"]) == 0
    [found] = describe(ledger.root, "rdp", None)
    assert math.isinf(found["all_runs"]["epsilon"]) and "non-private training" in found["all_runs"]["note"]
    assert found["total_epsilon"] == 0  # none was
    assert main(["train", "--config", str(path), "--name", "d", "--set", "dp.total_budget=100"]) == 2
    assert "non-private" in capsys.readouterr().err


def _sections(out: str) -> dict[str, list[list[str]]]:
    """The ledger command's run rows (split on whitespace) under its released and internal headings."""
    rows, current = {"released": [], "internal": []}, None
    for line in out.splitlines():
        if line.startswith(("released (", "internal (")):
            current = line.split(" ", 1)[0]
        elif current and line.lstrip().startswith("/"):  # a run: its experiment folder, then the columns
            rows[current].append(line.split())
    return rows


def test_the_card_composes_what_left_the_hospital_and_the_ledger_lists_internal_runs_apart(tiny_config, capsys):
    """A DP run with a non-private baseline on the same patients: the baseline kept inside leaves the
    card's total finite; exported, it makes it infinite. Entries from before releases were recorded
    count as released until settled."""
    path = tiny_config(training={"epochs": 1}, evaluation={"bootstrap": 20, "permutations": 0})
    exps = path.parent / "experiments"
    assert main(["train", "--config", str(path), "--name", "dp"]) == 0
    assert main(["train", "--config", str(path), "--name", "baseline", "--set", "dp.enabled=false"]) == 0
    for name in ("dp", "baseline"):
        assert main(["predict", str(exps / name)]) == 0
    ledger = _ledger(path)
    ids = {e["experiment"].rsplit("/", 1)[1]: e["run_id"] for e in ledger.entries()}
    dp = json.loads((exps / "dp" / "private" / "summary.json").read_text())["dp"]

    def listed() -> dict[str, dict[str, list[str]]]:
        capsys.readouterr()
        assert main(["ledger", "--config", str(path)]) == 0
        return {kind: {row[0].rsplit("/", 1)[1]: row for row in rows}
                for kind, rows in _sections(capsys.readouterr().out).items()}

    def card(bundle: str, *flags: str, exp: str = "dp") -> dict:
        assert main(["export", str(exps / exp), str(path.parent / bundle), *flags]) == 0
        return json.loads((path.parent / bundle / "model_card.json").read_text())["privacy"]

    # before any export: both internal, nothing composed; a non-private run shows no epsilon and no delta
    runs = listed()
    assert runs["released"] == {} and set(runs["internal"]) == {"dp", "baseline"}
    assert runs["internal"]["baseline"][4:6] == ["-", "-"]  # experiment, private, unit, steps, epsilon, delta
    assert runs["internal"]["dp"][5] == f"{dp['delta']:.4g}"
    assert f"{dp['delta']:.4g}" not in " ".join(runs["internal"]["baseline"])

    # the DP model exported: its card composes itself only; the baseline stays inside, counted apart
    first = card("dp_bundle")
    assert first["ledger_total"]["epsilon"] == first["epsilon"] and math.isfinite(first["epsilon"])
    assert "1 run(s) composed" in first["ledger_total"]["note"]
    assert "1 other run(s) on these patients not released" in first["ledger_total"]["note"]
    assert "composed: epsilon" in (path.parent / "dp_bundle" / "model_card.md").read_text()
    runs = listed()
    assert set(runs["released"]) == {"dp"} and set(runs["internal"]) == {"baseline"}
    assert runs["released"]["dp"][6] == "export"  # then its date

    # publishing is recorded with ledger --released; a release is never undone, and a resumed run keeps it
    assert main(["ledger", "--config", str(path), "--released", str(exps / "dp")]) == 0
    assert [r["how"] for r in json.loads((ledger.folder / f"{ids['dp']}.json").read_text())["released"]] == [
        "export", "published"]
    assert main(["ledger", "--config", str(path), "--internal", str(exps / "dp")]) == 2
    assert "cannot be called back" in capsys.readouterr().err
    entry = json.loads((ledger.folder / f"{ids['dp']}.json").read_text())
    ledger.record(ids["dp"], {k: v for k, v in entry.items() if k not in ("released", "run_id", "updated")})
    assert json.loads((ledger.folder / f"{ids['dp']}.json").read_text())["released"] == entry["released"]

    # an entry written before releases were recorded has no field: it counts as released until settled
    baseline = ledger.folder / f"{ids['baseline']}.json"
    old = {k: v for k, v in json.loads(baseline.read_text()).items() if k != "released"}
    baseline.write_text(json.dumps(old))
    [found] = describe(ledger.root, "rdp", None)
    assert math.isinf(found["total_epsilon"]) and found["internal"] == []
    assert listed()["released"]["baseline"][6:9] == ["before", "the", "record"]
    assert main(["ledger", "--config", str(path), "--internal", str(exps / "baseline")]) == 0
    [found] = describe(ledger.root, "rdp", None)
    assert math.isfinite(found["total_epsilon"]) and [e["run_id"] for e in found["internal"]] == [ids["baseline"]]

    # the baseline exported: every later card of a model on these patients is unbounded
    assert not card("baseline_bundle", "--non-private", exp="baseline")["private"]
    after = card("dp_bundle_after")
    assert after["ledger_total"]["epsilon"] is None and "(baseline)" in after["ledger_total"]["note"]
    assert "composed: unbounded" in (path.parent / "dp_bundle_after" / "model_card.md").read_text()
    runs = listed()
    assert set(runs["released"]) == {"dp", "baseline"} and runs["internal"] == {}
    assert runs["released"]["baseline"][4:7] == ["-", "-", "export"]
