"""Privacy budget sweep: one experiment per budget, skip/resume, table and correlations."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.special import expit, logit

import Train_Valid_DP
from conftest import assert_report
from evaluation.bootstrap import resampling
from evaluation.sweep import add_q_values, paired_differences, run_resamples, trends
from main_2D_DP import main
from privacy.release import rounded, rounded_up


def test_trend_on_log_epsilon_needs_five_private_runs():
    table = pd.DataFrame({"epsilon": [np.inf, 8.0, 4.0, 1.0], "sex_auroc_gap": [0.5, 0.1, 0.2, 0.3]})
    few = trends(table, ["sex_auroc_gap"])["sex_auroc_gap"]
    assert few["slope_per_log_epsilon"] is None and few["pearson_r"] is None and "not meaningful" in few["note"]
    eps = np.array([8.0, 8.0, 4.0, 4.0, 1.0, 1.0])
    gap = np.array([0.10, 0.12, 0.16, 0.15, 0.31, 0.27])
    table = pd.DataFrame({"epsilon": [np.inf, *eps], "sex_auroc_gap": [0.5, *gap]})
    fit = trends(table, ["sex_auroc_gap"])["sex_auroc_gap"]
    slope, intercept = np.polyfit(np.log(eps), gap, 1)  # the non-private run is not in the fit
    assert fit["runs"] == 6 and fit["budgets"] == 3 and fit["slope_per_log_epsilon"] == pytest.approx(slope)
    assert fit["ci95"][0] < slope < fit["ci95"][1] < 0 and fit["p_value"] < 0.05
    assert fit["pearson_r"] == pytest.approx(np.corrcoef(eps, gap)[0, 1])


def test_paired_difference_to_non_private_resamples_patients_and_seeds():
    rng = np.random.default_rng(0)
    base = rng.normal(0.8, 0.02, 500)  # one run's resampled values; the same resamples for every run
    runs = {(np.inf, 0): {"auroc_mean": (0.80, base)}, (8.0, 0): {"auroc_mean": (0.75, base - 0.05)}}
    one = paired_differences(runs, seed=0)["8"]["auroc_mean"]
    assert one["difference"] == pytest.approx(-0.05) and one["ci95"] == pytest.approx([-0.05, -0.05])
    assert one["p_value"] == pytest.approx(2 / 501)  # every resample below 0, and still not 0
    runs.update({(np.inf, 1): {"auroc_mean": (0.82, base + 0.02)}, (8.0, 1): {"auroc_mean": (0.79, base - 0.01)}})
    two = paired_differences(runs, seed=0)["8"]["auroc_mean"]
    assert two["difference"] == pytest.approx((0.75 + 0.79) / 2 - 0.81) and two["seeds"] == 2
    assert two["ci95"][1] - two["ci95"][0] > 0.02  # seed-to-seed variation widens the interval
    assert add_q_values({"8": {"auroc_mean": two}}, {}) == 1 and two["q_value"] == pytest.approx(two["p_value"])


def test_calibration_differences_to_non_private_flag_an_over_confident_budget():
    """Fabricated test predictions: at epsilon 8 the non-private ranking pushed towards 0 and 1 (logits
    x 3), at epsilon 4 the non-private scores themselves."""
    rng = np.random.default_rng(1)
    risk = rng.uniform(0.05, 0.95, (400, 2))
    frame = pd.DataFrame({"image_id": np.arange(400).astype(str), "patient_id": np.repeat(np.arange(200), 2).astype(str),
                          "sex": rng.choice(["F", "M"], 400), "age": rng.uniform(20, 90, 400)})
    for i, label in enumerate("ab"):
        frame[label] = (rng.random(400) < risk[:, i]).astype(int)
    metrics = {"labels": {label: {"threshold": 0.5} for label in "ab"}}
    weights = resampling(frame["patient_id"].to_numpy(), 200, 0, "patient")[0]

    def run(scores):
        scored = frame.assign(**{f"{label}_score": scores[:, i] for i, label in enumerate("ab")})
        return run_resamples(scored, metrics, weights, [0, 60, 100], 10, 10, 10, bins=10)

    calibrated = run(risk)
    runs = {(np.inf, 0): calibrated, (8.0, 0): run(expit(3 * logit(risk))), (4.0, 0): calibrated}
    differences = paired_differences(runs, seed=0)
    for column in ("brier_mean", "ece_mean"):
        worse, same = differences["8"][column], differences["4"][column]
        assert 0 < worse["ci95"][0] < worse["difference"] < worse["ci95"][1] and worse["p_value"] < 0.01
        assert same["difference"] == 0 and same["ci95"] == [0, 0] and same["p_value"] == 1


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
    assert main(["sweep", "--epsilons", "inf,8,2", "--config", str(path), "--name", "budgets"]) == 130
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
    for row in (1, 2):  # published rounded as on the model card, so that N cannot be solved for
        dp = json.loads((sweep / table["run"][row] / "private" / "summary.json").read_text())["dp"]
        assert table["epsilon_spent"][row] == rounded_up(dp["epsilon_spent"]) >= dp["epsilon_spent"]
        assert table["noise_multiplier"][row] == rounded(dp["noise_multiplier"])
    assert {"sex_demographic_parity_difference", "age_equalized_odds_difference", "sex_spd_F-M"} <= set(table.columns)
    result = json.loads((sweep / "sweep.json").read_text())
    assert "not meaningful" in result["trend_on_log_epsilon"]["auroc_mean"]["note"]  # 2 private runs
    for budget in ("8", "2"):  # paired against the non-private run on the same test patients
        for column in ("auroc_mean", "brier_mean", "ece_mean"):
            d = result["difference_to_non_private"][budget][column]
            row = table.loc[table["epsilon"] == float(budget), column].item()
            assert d["difference"] == pytest.approx(row - table[column][0])
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] and d["p_value"] > 0 and "q_value" in d
    for run in ("eps_inf", "eps_8"):  # the runs' own calibration results
        own = json.loads((sweep / run / "results" / "test_metrics.json").read_text())["calibration_mean"]
        assert table.loc[table["run"] == run, "brier_mean"].item() == pytest.approx(own["brier"]["value"])
    assert result["bootstrap"]["unit"] == "patient"
    # the runs are in the ledger of the base config; with the non-private run among them, their total
    # is unbounded (null in JSON)
    assert result["privacy_total"]["epsilon"] is None and "non-private" in result["privacy_total"]["note"]
    assert result["privacy_total"]["ledger"].startswith(str(path.parent / "ledger"))
    assert_report(sweep / "report.html", ["Runs", "Privacy-utility curve", "Difference to non-private (paired)",
                                          "Trend on log epsilon"], min_figures=2)
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


def test_sweep_seeds_share_the_test_patients(tiny_config, capsys):
    """... and the non-private reference may have a recipe of its own (--non-private-set)."""
    path = tiny_config(training={"epochs": 1})
    assert main(["sweep", "--epsilons", "inf,8", "--seeds", "2", "--config", str(path), "--name", "seeds",
                 "--non-private-set", "training.lr=0.002", "training.ema=null"]) == 0
    sweep = path.parent / "experiments" / "seeds"
    for run, lr, ema in (("eps_inf_seed1", 0.002, None), ("eps_8_seed1", 0.01, 0.99)):
        resolved = yaml.safe_load((sweep / run / "private" / "config.yaml").read_text())["training"]
        assert (resolved["lr"], resolved["ema"]) == (lr, ema)
    table = pd.read_csv(sweep / "sweep.csv")
    assert list(table["run"]) == ["eps_inf_seed0", "eps_inf_seed1", "eps_8_seed0", "eps_8_seed1"]
    assert list(table["seed"]) == [0, 1, 0, 1]
    tests = [pd.read_csv(sweep / run / "private" / "predictions" / "test.csv")["image_id"] for run in table["run"]]
    assert all(t.equals(tests[0]) for t in tests)  # one split for every seed
    assert table["auroc_mean"][2] != table["auroc_mean"][3]  # yet the seeds trained differently
    d = json.loads((sweep / "sweep.json").read_text())["difference_to_non_private"]["8"]["auroc_mean"]
    assert d["seeds"] == 2 and d["difference"] == pytest.approx(table["auroc_mean"][2:].mean() - table["auroc_mean"][:2].mean())
    assert "minus non-private" in capsys.readouterr().out
    assert main(["sweep", "--epsilons", "8", "--seeds", "0", "--config", str(path)]) == 2


@pytest.mark.parametrize("text", ["8,abc", "0,8", "8,8", ""])
def test_bad_epsilon_lists_are_input_errors(tiny_config, capsys, text):
    assert main(["sweep", "--epsilons", text, "--config", str(tiny_config())]) == 2
    assert "--epsilons" in capsys.readouterr().err
