"""Tiny end-to-end runs: artifacts, refusal to overwrite, resume equivalence, prediction."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score, roc_curve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import Train_Valid_DP
from conftest import TINY_LABELS, assert_report
from main_2D_DP import main


def _exp(config_path, name="tiny"):
    return config_path.parent / "experiments" / name


@pytest.mark.parametrize("dp", [True, False])
def test_run_writes_every_artifact(tiny_config, capfd, dp):
    path = tiny_config(dp={"enabled": dp})
    assert main(["train", "--config", str(path)]) == 0
    console = "".join(capfd.readouterr())  # the job log people share: no un-noised training loss under DP
    assert ("train loss" in console) is not dp and ("loss=" in console) is not dp and "valid loss" in console
    exp = _exp(path)
    resolved = yaml.safe_load((exp / "private" / "config.yaml").read_text())
    derived = resolved["derived"]
    assert derived["n_train"] > 0 and derived["n_valid"] > 0 and derived["n_test"] > 0
    assert set(derived["pos_weight"]) == set(TINY_LABELS)
    summary = json.loads((exp / "private" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["steps"] == 2 * derived["steps_per_epoch"]
    assert 0 <= summary["best_valid_auroc_mean"] <= 1
    assert summary["dp"]["enabled"] is dp
    for key in ("epsilon_spent", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "accountant"):
        assert key in summary["dp"]
        assert (summary["dp"][key] is not None) is dp
    if dp:
        assert resolved["dp"]["delta"] == summary["dp"]["delta"] < 1 / derived["n_train"]
        assert derived["noise_multiplier"] == summary["dp"]["noise_multiplier"] > 0
        units = derived["n_train_units"]
        assert derived["privacy_unit"] == "patient" and units == derived["n_train_patients"] < derived["n_train"]
        assert derived["sample_rate"] == 16 / units and derived["steps_per_epoch"] == round(units / 16)
    for checkpoint in (exp / "private" / "last.pt", exp / "checkpoints" / "best.pt"):
        ckpt = torch.load(checkpoint, weights_only=True)
        assert ckpt["labels"] == TINY_LABELS
    tags = EventAccumulator(str(exp / "private" / "tensorboard")).Reload().Tags()["scalars"]
    expected = {"train/loss", "valid/loss", "valid/auroc_mean", *(f"valid/auroc/{lab}" for lab in TINY_LABELS)}
    assert expected <= set(tags)
    assert ("privacy/epsilon" in tags) is dp

    assert main(["predict", str(exp)]) == 0
    assert (exp / "private" / "predictions" / "test.csv").is_file() and (exp / "results" / "test_metrics.json").is_file()
    # row-level records of the test patients (unprotected) stay private: no file outside private/ lists images
    for table in exp.rglob("*.csv"):
        if "private" not in table.relative_to(exp).parts:
            assert not {"image_id", "patient_id"} & set(pd.read_csv(table, nrows=0).columns), table
    fairness = json.loads((exp / "results" / "test_fairness.json").read_text())
    assert set(fairness["subgroups"]) == {"sex", "age", "sex_age"} and set(fairness["fairness"]) == {"sex", "age"}
    assert len(pd.read_csv(exp / "results" / "test_fairness.csv")) > 0
    calibration = json.loads((exp / "results" / "test_calibration.json").read_text())
    assert set(calibration["calibration"]["labels"]) == set(calibration["decision_curves"]) == set(TINY_LABELS)
    assert calibration["calibration"]["binning"].startswith("equal-mass") and "brier" in calibration["calibration"]["mean"]
    assert_report(exp / "report.html", ["Summary", "Model, data and privacy", "Metrics", "ROC curves", "Calibration",
                                        "Decision curves", "Subgroup AUROC by sex",
                                        "Subgroup AUROC by age", "Fairness", "Underdiagnosis"], min_figures=4)
    page = (exp / "report.html").read_text()  # says what it is, without the private training loss or exact N
    assert ("DP for each training patient" in page) is dp and ("NOT PRIVATE" in page) is not dp
    summary = page.split("Model, data and privacy")[0]  # the box: the guarantee in words, who it leaves out
    assert ("Differentially private with epsilon" in summary and "Not protected" in summary) is dp
    assert ("Not private: trained without differential privacy" in summary) is not dp
    assert "Research use only" in summary and "mean AUROC" in summary
    assert "training loss is not shown" in page and f"{derived['n_train_units']} " not in page.split("Metrics")[0]
    tags = EventAccumulator(str(exp / "private" / "tensorboard")).Reload().Tags()["scalars"]
    assert "test/auroc_mean" in tags and "test/fairness/sex/demographic_parity_difference" in tags


def test_existing_experiment_is_never_overwritten(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1})
    assert main(["train", "--config", str(path)]) == 0
    before = (_exp(path) / "private" / "last.pt").read_bytes()
    assert main(["train", "--config", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (_exp(path) / "private" / "last.pt").read_bytes() == before


def _weights(exp):
    return torch.load(exp / "private" / "last.pt", weights_only=True)["model"]


def _assert_same_run(exp_a, exp_b):
    sa, sb = (json.loads((e / "private" / "summary.json").read_text()) for e in (exp_a, exp_b))
    assert sa["steps"] == sb["steps"] and sa["epochs_completed"] == sb["epochs_completed"]
    assert sa["dp"]["epsilon_spent"] == sb["dp"]["epsilon_spent"]
    assert sa["best_valid_auroc_mean"] == sb["best_valid_auroc_mean"]
    wa, wb = _weights(exp_a), _weights(exp_b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _killed_in_second_epoch(path, name, monkeypatch):
    real = Train_Valid_DP.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(Train_Valid_DP, "train_one_epoch", interrupted)
    assert main(["train", "--config", str(path), "--name", name]) == 130
    monkeypatch.setattr(Train_Valid_DP, "train_one_epoch", real)
    assert json.loads((_exp(path, name) / "private" / "summary.json").read_text())["epochs_completed"] == 1


def test_interrupted_run_resumes_to_the_same_epsilon_and_weights(tiny_config, monkeypatch):
    path = tiny_config()
    assert main(["train", "--config", str(path), "--name", "straight"]) == 0
    _killed_in_second_epoch(path, "broken", monkeypatch)
    assert main(["train", "--config", str(path), "--name", "broken", "--resume"]) == 0
    _assert_same_run(_exp(path, "straight"), _exp(path, "broken"))


def test_noise_and_sampling_are_secret_unless_reproducible(tiny_config, monkeypatch, capsys):
    """Same config and seed: secret noise gives other weights every run; only the private last.pt holds
    the generators' state, and an interrupted run resumes that secret stream exactly (two copies
    resumed alike end equal). The reproducible mode repeats itself and says what that costs."""
    path = tiny_config(dp={"reproducible_noise": False})
    for name in ("a", "b"):
        assert main(["train", "--config", str(path), "--name", name, "--set", "training.epochs=1"]) == 0
    assert not all(torch.equal(u, v) for u, v in zip(_weights(_exp(path, "a")).values(),
                                                     _weights(_exp(path, "b")).values()))
    assert json.loads((_exp(path, "a") / "private" / "summary.json").read_text())["dp"]["noise"] == "secret"
    assert "rng" not in torch.load(_exp(path, "a") / "checkpoints" / "best.pt", weights_only=True)
    assert "reproducible" not in capsys.readouterr().out

    _killed_in_second_epoch(path, "cut", monkeypatch)
    shutil.copytree(_exp(path, "cut"), _exp(path, "cut-copy"))
    for name in ("cut", "cut-copy"):
        assert main(["train", "--config", str(path), "--name", name, "--resume"]) == 0
    _assert_same_run(_exp(path, "cut"), _exp(path, "cut-copy"))

    path = tiny_config(dp={"reproducible_noise": True})
    for name in ("r1", "r2"):
        assert main(["train", "--config", str(path), "--name", name, "--set", "training.epochs=1"]) == 0
    _assert_same_run(_exp(path, "r1"), _exp(path, "r2"))
    assert "does not hold against anyone who knows the seed" in capsys.readouterr().out
    assert json.loads((_exp(path, "r1") / "private" / "summary.json").read_text())["dp"]["noise"].startswith(
        "reproducible: seeded from experiment.seed")


def test_one_epoch_plus_resume_equals_two_epochs(tiny_config):
    """With a fixed noise multiplier, extending a finished run by --resume continues it exactly (without
    noised label counts, whose share of the budget depends on the epochs first planned)."""
    path = tiny_config(training={"pos_weight": "none"}, dp={"epsilon": None, "noise_multiplier": 0.8})
    assert main(["train", "--config", str(path), "--name", "two"]) == 0
    assert main(["train", "--config", str(path), "--name", "one", "--set", "training.epochs=1"]) == 0
    # Without --config, resume continues the saved settings; only the epoch count changes.
    assert main(["train", "--name", "one", "--resume", "--set", "training.epochs=2",
                 f"output.target_dir={path.parent / 'experiments'}"]) == 0
    _assert_same_run(_exp(path, "two"), _exp(path, "one"))


@pytest.mark.parametrize("change", ["dp.max_grad_norm=0.5", "dp.enabled=false", "training.logical_batch_size=8"])
def test_resume_refuses_changed_privacy_settings(tiny_config, capsys, change):
    path = tiny_config(training={"epochs": 1})
    assert main(["train", "--config", str(path)]) == 0
    assert main(["train", "--config", str(path), "--resume", "--set", change, "training.epochs=2"]) == 2
    assert "--resume cannot change" in capsys.readouterr().err
    assert json.loads((_exp(path) / "private" / "summary.json").read_text())["epochs_completed"] == 1


def test_resume_without_experiment_is_an_input_error(tiny_config, capsys):
    assert main(["train", "--config", str(tiny_config()), "--name", "ghost", "--resume"]) == 2
    assert "no experiment" in capsys.readouterr().err


def test_predict_metrics_are_reproducible_from_the_csv(tiny_config):
    path = tiny_config(dp={"enabled": False}, training={"epochs": 3})
    assert main(["train", "--config", str(path)]) == 0
    exp = _exp(path)
    assert main(["predict", str(exp), "--split", "test"]) == 0
    assert main(["predict", str(exp), "--split", "valid"]) == 0
    metrics = json.loads((exp / "results" / "test_metrics.json").read_text())
    test = pd.read_csv(exp / "private" / "predictions" / "test.csv")
    valid = pd.read_csv(exp / "private" / "predictions" / "valid.csv")
    assert list(test.columns[:4]) == ["image_id", "patient_id", "sex", "age"]
    assert set(test["sex"]) <= {"F", "M"}
    assert metrics["threshold_split"] == "valid" and not metrics["thresholds_optimistic"]
    valid_metrics = json.loads((exp / "results" / "valid_metrics.json").read_text())
    assert valid_metrics["threshold_split"] == "valid" and valid_metrics["thresholds_optimistic"]  # never training data
    aurocs = []
    for label in TINY_LABELS:
        m, truth, score = metrics["labels"][label], test[label].to_numpy(), test[f"{label}_score"].to_numpy()
        # the threshold is Youden's J on the validation split, not on the scored one
        fpr, tpr, thr = roc_curve(valid[label], valid[f"{label}_score"])
        assert m["threshold"] == pytest.approx(min(thr[np.argmax(tpr - fpr)], 1.0))
        assert valid_metrics["labels"][label]["threshold"] == m["threshold"]
        pred = score >= m["threshold"]
        assert m["auroc"] == pytest.approx(roc_auc_score(truth, score))
        assert m["accuracy"] == pytest.approx((pred == truth).mean())
        assert m["sensitivity"] == pytest.approx(pred[truth == 1].mean())
        assert m["specificity"] == pytest.approx((~pred[truth == 0]).mean())
        aurocs.append(m["auroc"])
    assert metrics["auroc_mean"] == pytest.approx(np.mean(aurocs))

    # 95% bootstrap intervals for every metric, reproducible from the recorded seed
    assert metrics["bootstrap"]["resamples"] == 1000 and metrics["bootstrap"]["seed"] == 0
    lo, hi = metrics["auroc_mean_ci95"]
    assert lo < metrics["auroc_mean"] < hi
    for label in TINY_LABELS:
        ci = metrics["labels"][label]["ci95"]
        assert set(ci) == {"auroc", "accuracy", "sensitivity", "specificity", "precision", "f1"}
        assert ci["auroc"][0] <= metrics["labels"][label]["auroc"] <= ci["auroc"][1]
    before = (exp / "results" / "test_metrics.json").read_text()
    assert main(["predict", str(exp)]) == 0
    assert (exp / "results" / "test_metrics.json").read_text() == before


def test_predict_on_a_missing_folder_is_an_input_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing")]) == 2
    assert "not an experiment folder" in capsys.readouterr().err


def test_two_stage_public_pretraining_then_private_dp(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1}, data={"synthetic": {"public_patients": 120, "private_patients": 120}})
    assert main(["train", "--config", str(path), "--name", "pub", "--set", "data.site=public", "dp.enabled=false"]) == 0
    pub = _exp(path, "pub")
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--name", "priv",
                 "--set", f"model.pretrained_checkpoint={pub}"]) == 0
    assert "newly initialised: none" in capsys.readouterr().out
    resolved = yaml.safe_load((_exp(path, "priv") / "private" / "config.yaml").read_text())
    assert resolved["model"]["pretrained_checkpoint"] == str(pub) and resolved["data"]["site"] == "private"


def test_empty_poisson_batches_step_without_poisoning_the_loss(tiny_config):
    """With an expected batch of 2, about one logical batch in eight is empty."""
    path = tiny_config(training={"epochs": 1, "logical_batch_size": 2, "physical_batch_size": 2})
    assert main(["train", "--config", str(path)]) == 0
    summary = json.loads((_exp(path) / "private" / "summary.json").read_text())
    steps_per_epoch = yaml.safe_load((_exp(path) / "private" / "config.yaml").read_text())["derived"]["steps_per_epoch"]
    assert summary["steps"] == steps_per_epoch
    assert np.isfinite(summary["last_train_loss"]) and np.isfinite(summary["last_valid_loss"])
    weights = _weights(_exp(path))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_predict_refuses_a_checkpoint_for_another_model(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1}, dp={"enabled": False})
    assert main(["train", "--config", str(path)]) == 0
    exp = _exp(path)
    config = yaml.safe_load((exp / "private" / "config.yaml").read_text())
    config["model"]["name"] = "resnet18"
    (exp / "private" / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["predict", str(exp)]) == 2
    assert "weights do not fit model resnet18" in capsys.readouterr().err
