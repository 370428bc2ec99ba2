"""The privacy ledger: every run on the same patients composed, and the total budget enforced."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

import Train_Valid_DP
from config import load_config
from data.dataset import load_table
from main_2D_DP import main
from privacy.ledger import Ledger, describe

REPO = Path(__file__).resolve().parents[1]


def _ledger(path):
    """The one ledger of the tiny config's runs (output.ledger: <its folder>/ledger)."""
    [folder] = [p for p in (path.parent / "ledger").iterdir() if p.is_dir()]
    return Ledger(folder.parent, folder.name)


def test_runs_on_the_same_patients_compose_and_the_total_budget_holds(tiny_config, tmp_path, capsys):
    path = tiny_config(dp={"epsilon": 2.0}, training={"epochs": 1})
    assert main(["train", "--config", str(path), "--name", "a"]) == 0
    # the same patients at another path (the synthetic data drawn again elsewhere) are the same ledger
    assert main(["train", "--config", str(path), "--name", "b", "--set", f"data.root={tmp_path / 'copy'}"]) == 0
    ledger = _ledger(path)
    runs = ledger.entries()
    assert sorted(r["experiment"].rsplit("/", 1)[1] for r in runs) == ["a", "b"]
    trained = load_config(path.parent / "experiments" / "a" / "private" / "config.yaml").derived["n_train_patients"]
    assert ledger.description["dataset"] == "synthetic" and [len(r["patients"]) for r in runs] == [trained] * 2

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
    assert f"{trained} patients trained on" in out and "released runs composed per patient (RDP)" in out
    assert "2 run(s) composed" in out and f"{trained} patient(s) at that level" in out
    assert main(["ledger", "--config", str(path), "--dataset", ledger.key]) == 0
    assert main(["ledger", "--config", str(path), "--dataset", "chexpert"]) == 2
    assert "no such dataset" in capsys.readouterr().err

    # a run that would take the total past dp.total_budget is refused before anything is written
    spent = describe(ledger.root, "rdp", None)[0]["all_runs"]["epsilon"]  # the budget guards every run
    assert main(["train", "--config", str(path), "--name", "c", "--set", f"dp.total_budget={spent + 0.01}"]) == 2
    err = capsys.readouterr().err
    assert "dp.total_budget" in err and str(ledger.folder) in err and "2 run(s) composed" in err
    assert not (path.parent / "experiments" / "c").exists() and len(ledger.entries()) == 2
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


def _entries(path) -> list[Path]:
    """The run entries under the tiny config's ledger root, whatever its layout."""
    return [p for p in (path.parent / "ledger").rglob("*.json") if p.name not in ("ledger.json", "dataset.json")]


def test_two_runs_started_at_once_cannot_both_pass_the_total_budget(tiny_config):
    """Each alone fits dp.total_budget, both do not: the check and the booking are one step under the
    ledger's lock, so exactly one trains, whichever comes first."""
    path = tiny_config(dp={"epsilon": 2.0, "total_budget": 2.5}, training={"epochs": 1})
    cfg = load_config(path)
    load_table(cfg.data, cfg.experiment.seed)  # the synthetic data generated once, before the race
    runs = {name: subprocess.Popen([sys.executable, str(REPO / "main_2D_DP.py"), "train", "--config", str(path),
                                    "--name", name], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name in ("a", "b")}
    done = {name: (proc.communicate(timeout=600)[1], proc.returncode) for name, proc in runs.items()}
    assert sorted(code for _, code in done.values()) == [0, 2], {n: e[-2000:] for n, (e, _) in done.items()}
    [(refused, (err, _))] = [(name, run) for name, run in done.items() if run[1] == 2]
    assert "dp.total_budget = 2.5" in err and not (path.parent / "experiments" / refused).exists()
    assert len(_entries(path)) == 1


def test_one_ledger_per_dataset_whatever_the_filters_and_each_patient_composes_the_runs_that_trained_them(
        tiny_config, tmp_path, monkeypatch, capsys):
    """Runs on PA views only or on all sites, into another target folder, train patients of the first
    run: refused, with nothing written. A run on other patients (the public site) has the budget to
    itself; the total is the worst-off patient's. The default ledger is the user's, not the target's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    path = tiny_config(dp={"epsilon": 2.0, "total_budget": 2.5}, training={"epochs": 1}, output={"ledger": None})
    exps, elsewhere = path.parent / "experiments", tmp_path / "elsewhere"
    assert main(["train", "--config", str(path), "--name", "first"]) == 0
    [folder] = (tmp_path / "data-home" / "dp-cxr" / "ledger").iterdir()
    ledger = Ledger(folder.parent, folder.name)
    capsys.readouterr()
    for name, change in (("pa", "data.views=[PA]"), ("all", "data.site=all")):
        assert main(["train", "--config", str(path), "--name", name, "--set", change,
                     f"output.target_dir={elsewhere}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "dp.total_budget = 2.5" in err and str(ledger.folder) in err
        assert float(re.search(r"worst-off patients to epsilon ([0-9.]+)", err).group(1)) > 2.5
        assert not (elsewhere / name).exists() and len(ledger.entries()) == 1

    assert main(["train", "--config", str(path), "--name", "public", "--set", "data.site=public", "dp.epsilon=1"]) == 0
    assert [p for p in ledger.root.iterdir() if p.is_dir()] == [ledger.folder]  # the same ledger
    runs = {Path(e["experiment"]).name: e for e in ledger.entries()}
    assert not set(runs["first"]["patients"]) & set(runs["public"]["patients"])
    [found] = describe(ledger.root, "rdp", None)
    assert found["all_runs"]["epsilon"] == pytest.approx(runs["first"]["epsilon"], rel=1e-9)
    assert found["all_runs"]["worst_patients"] == len(runs["first"]["patients"])
    assert found["patients"] == len(runs["first"]["patients"]) + len(runs["public"]["patients"])
    assert not (exps / "private").exists()  # no ledger beside the experiments


def test_resume_keeps_where_and_under_which_budget_a_run_is_booked_and_the_ledger_never_lags(
        tiny_config, tmp_path, monkeypatch, capsys):
    """A resume may not move the run to another ledger, target folder or budget (exit 2, one line naming
    the key, nothing written); every checkpoint is written after the ledger has booked its steps."""
    path = tiny_config(dp={"epsilon": 2.0}, training={"epochs": 1, "checkpoint_every_steps": 2})
    exps = path.parent / "experiments"
    checkpoints, save = [], Train_Valid_DP.save_checkpoint

    def booked_first(state, where):
        [entry] = _ledger(path).entries()
        checkpoints.append((Path(where).name, entry["steps"], state.get("steps"), state["epoch"]))
        save(state, where)

    monkeypatch.setattr(Train_Valid_DP, "save_checkpoint", booked_first)
    assert main(["train", "--config", str(path), "--name", "a"]) == 0
    capsys.readouterr()
    for change in (f"output.ledger={tmp_path / 'fresh'}", "dp.total_budget=100"):
        assert main(["train", "--name", "a", "--resume", "--set", f"output.target_dir={exps}", "training.epochs=2",
                     change]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--resume cannot change {change.split('=')[0]}" in err
    shutil.copytree(exps / "a", tmp_path / "moved" / "a")  # the experiment folder copied elsewhere
    assert main(["train", "--name", "a", "--resume", "--set", f"output.target_dir={tmp_path / 'moved'}"]) == 2
    assert "--resume cannot change output.target_dir" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists() and len(_ledger(path).entries()) == 1

    assert main(["train", "--name", "a", "--resume", "--allow-budget-increase", "--set", f"output.target_dir={exps}",
                 "training.epochs=2"]) == 0
    per_epoch = load_config(exps / "a" / "private" / "config.yaml").derived["steps_per_epoch"]
    assert {name for name, *_ in checkpoints} == {"last.pt", "best.pt"} and len(checkpoints) >= 4
    for name, booked, steps, epoch in checkpoints:  # last.pt holds its steps, best.pt its epoch's
        assert booked == (steps if name == "last.pt" else epoch * per_epoch), checkpoints
    [entry] = _ledger(path).entries()
    summary = json.loads((exps / "a" / "private" / "summary.json").read_text())
    assert entry["steps"] == entry["planned_steps"] == summary["steps"] == 2 * per_epoch


def test_a_ledger_of_the_earlier_format_is_refused_until_migrated_and_then_counts_for_every_patient(
        tiny_config, capsys):
    """Before the ledger was per patient, a run's entry sat in <target_dir>/private/privacy_ledger/<fingerprint
    of the patients>/ without the patients it trained: new runs would leave it out, so they are refused
    until `ledger --migrate` has moved it into the ledger of its dataset, counted for every patient."""
    path = tiny_config(training={"epochs": 1})
    exps = path.parent / "experiments"
    assert main(["train", "--config", str(path), "--name", "old"]) == 0
    ledger = _ledger(path)
    [entry] = ledger.entries()
    # the run as the earlier version recorded it
    old = exps / "private" / "privacy_ledger" / "0123456789abcdef0123"
    old.mkdir(parents=True)
    root = load_config(exps / "old" / "private" / "config.yaml").derived["dataset_folder"]
    (old / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "site": "private", "root": root,
                                                  "patients": 120, "images": 400, "most_images_per_patient": 4}))
    kept = ("experiment", "private", "unit", "accountant", "delta", "epsilon", "history", "steps", "released",
            "run_id", "updated")
    (old / f"{entry['run_id']}.json").write_text(json.dumps({k: entry[k] for k in kept}))
    shutil.rmtree(ledger.folder)
    config = exps / "old" / "private" / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["output"]["ledger"] = str(old.parent)
    raw["derived"]["patients_fingerprint"] = old.name
    del raw["derived"]["ledger_key"]
    config.write_text(yaml.safe_dump(raw))

    capsys.readouterr()
    assert main(["train", "--config", str(path), "--name", "new"]) == 2
    err = capsys.readouterr().err
    assert f"ledger --migrate {old.parent}" in err and not (exps / "new").exists()
    assert main(["ledger", "--config", str(path)]) == 2 and "--migrate" in capsys.readouterr().err
    assert main(["ledger", "--config", str(path), "--released", str(exps / "old")]) == 2

    assert main(["ledger", "--config", str(path), "--migrate", str(old.parent)]) == 0
    assert "1 run(s) moved" in capsys.readouterr().out and (old.parent / f"{old.name}.migrated").is_dir()
    [moved] = ledger.entries()
    assert moved["patients"] is None and moved["history"] == entry["history"]
    # the experiment's config names the ledger its entry is in now: its release is recorded there
    assert main(["ledger", "--config", str(path), "--released", str(exps / "old")]) == 0
    [found] = describe(ledger.root, "rdp", None)
    assert found["total_epsilon"] == pytest.approx(entry["epsilon"]) and found["worst_patients"] is None
    assert "every patient at that level" in capsys.readouterr().out
