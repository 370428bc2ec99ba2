"""Privacy budget sweep: one experiment per budget, skip/resume, table and correlations."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import Train_Valid_DP
from conftest import assert_report
from evaluation.sweep import correlations
from main_2D_DP import main


def test_pearson_over_private_runs_only():
    table = pd.DataFrame({"epsilon": [np.inf, 8.0, 4.0, 1.0], "sex_auroc_gap": [0.5, 0.1, 0.2, 0.3],
                          "age_worst_group_auroc": [0.9, 0.8, 0.8, 0.8]})
    result = correlations(table)
    assert result["sex_auroc_gap"]["n"] == 3
    assert result["sex_auroc_gap"]["r"] == pytest.approx(np.corrcoef([8, 4, 1], [0.1, 0.2, 0.3])[0, 1])
    assert result["age_worst_group_auroc"]["r"] is None  # constant: not estimable


def test_sweep_trains_each_budget_resumes_and_skips(tiny_config, monkeypatch, capsys):
    path = tiny_config(training={"epochs": 2})
    real = Train_Valid_DP.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # killed in the second epoch of the second budget
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(Train_Valid_DP, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["sweep", "--epsilons", "inf,8,2", "--config", str(path), "--name", "budgets"])
    monkeypatch.setattr(Train_Valid_DP, "train_one_epoch", real)
    capsys.readouterr()
    assert main(["sweep", "--epsilons", "inf,8,2", "--config", str(path), "--name", "budgets"]) == 0
    out = capsys.readouterr().out
    assert "eps_inf: finished earlier, skipped" in out and "eps_8: resuming" in out and "eps_2: training" in out

    sweep = path.parent / "experiments" / "budgets"
    table = pd.read_csv(sweep / "sweep.csv")
    assert list(table["epsilon"]) == [np.inf, 8.0, 2.0]
    assert np.isnan(table["epsilon_spent"][0]) and table["epsilon_spent"][1] <= 8 and table["epsilon_spent"][2] <= 2
    assert table["noise_multiplier"][2] > table["noise_multiplier"][1]
    assert {"sex_demographic_parity_difference", "age_equalized_odds_difference", "sex_spd_F-M"} <= set(table.columns)
    result = json.loads((sweep / "sweep.json").read_text())
    assert result["pearson_epsilon_vs_fairness"]["sex_auroc_gap"]["n"] == 2
    # the runs are in the ledger of the base target_dir, not of the sweep folder; with the
    # non-private run among them, their total is unbounded (null in JSON)
    assert result["privacy_total"]["epsilon"] is None and "non-private" in result["privacy_total"]["note"]
    assert result["privacy_total"]["ledger"].startswith(str(path.parent / "experiments" / "private" / "privacy_ledger"))
    assert not (sweep / "privacy_ledger").exists()
    assert_report(sweep / "report.html", ["Runs", "Privacy-utility curve", "Fairness vs epsilon", "Pearson"],
                  min_figures=2)
    hparam_runs = [p for p in (sweep / "tensorboard").iterdir() if p.is_dir()]
    assert sorted(p.name for p in hparam_runs) == ["eps_2", "eps_8", "eps_inf"]
    for run in ("eps_inf", "eps_8", "eps_2"):
        assert json.loads((sweep / run / "private" / "summary.json").read_text())["epochs_completed"] == 2

    capsys.readouterr()  # finished runs are skipped; --audit audits them and adds its columns
    assert main(["sweep", "--epsilons", "inf,8,2", "--config", str(path), "--name", "budgets", "--audit"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3
    table = pd.read_csv(sweep / "sweep.csv")
    for run in ("eps_inf", "eps_8", "eps_2"):
        audit = json.loads((sweep / run / "private" / "audit" / "audit.json").read_text())
        assert table.loc[table["epsilon"] == float(run[4:]), "attack_auroc"].item() == pytest.approx(
            audit["attacks"]["loss"]["overall"]["auroc"]["value"])
    assert table["epsilon_lower_bound"].isna().all()  # trained without canaries: no bound
    assert_report(sweep / "report.html", ["Runs", "Privacy audit vs epsilon"], min_figures=3)


@pytest.mark.parametrize("text", ["8,abc", "0,8", "8,8", ""])
def test_bad_epsilon_lists_are_input_errors(tiny_config, capsys, text):
    assert main(["sweep", "--epsilons", text, "--config", str(tiny_config())]) == 2
    assert "--epsilons" in capsys.readouterr().err
