"""External validation: a trained model scored on another dataset (`predict --data`), and the
transfer matrix (`transfer`)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY_LABELS, write_tiny_config
from main_2D_DP import main
from Prediction_DP import load_experiment_config, youden_threshold
from data.dataset import load_table

RENAMED = {"cardiomegaly": "Cardiomegaly", "pleural_effusion_right": "Effusion R", "pleural_effusion_left": "Effusion L"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """A non-private and a DP run on the private site, each predicted on its own test split."""
    root = tmp_path_factory.mktemp("external")
    for site in ("public", "private"):  # the same settings, one per site of the built-in data
        write_tiny_config(root, data_cache, data={"site": site}, training={"epochs": 1},
                          evaluation={"bootstrap": 100, "permutations": 20},
                          output={"target_dir": str(root)}).rename(root / f"{site}.yaml")
    config = root / "private.yaml"
    for name, privacy in (("np", "dp.enabled=false"), ("dp", "dp.epsilon=8")):
        assert main(["train", "--config", str(config), "--name", name, "--set", privacy]) == 0
        assert main(["predict", str(root / name)]) == 0
    return root


def _renamed_csv(root, experiment, drop=()):
    """The experiment's private-site images as an in-house CSV with other label names and the
    experiment's own split, minus the label columns in ``drop``; returns its data config."""
    cfg = load_experiment_config(experiment)
    table = load_table(cfg.data, cfg.experiment.seed)
    frame = table.frame.rename(columns=RENAMED).drop(columns=[RENAMED[d] for d in drop])
    frame = frame.assign(sex=frame["sex"].replace("", "U"))
    frame[["path", "patient_id", "sex", "age", "split", *[RENAMED[x] for x in TINY_LABELS if x not in drop]]].to_csv(
        root / "renamed.csv", index=False)
    raw = yaml.safe_load((root / "private.yaml").read_text())
    raw["data"].update(dataset="csv", root=str(table.root), label_map={v: k for k, v in RENAMED.items()},
                       csv={"file": str(root / "renamed.csv"), "view": None})
    path = root / f"renamed{len(drop)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _scores(folder, split="test"):
    return pd.read_csv(folder / "private" / "predictions" / f"{split}.csv")


def test_renamed_labels_score_like_the_experiments_own_dataset(trained):
    exp = trained / "np"
    config = _renamed_csv(trained, exp)
    assert main(["predict", str(exp), "--data", str(config)]) == 0
    folder = exp / "external" / "csv-private-test"
    own, external = _scores(exp), _scores(folder)
    assert len(external) == len(own) > 0
    for label in TINY_LABELS:
        assert np.allclose(external[f"{label}_score"], own[f"{label}_score"], atol=1e-6)
        assert external[label].equals(own[label])
    mine = json.loads((exp / "results" / "test_metrics.json").read_text())
    theirs = json.loads((folder / "results" / "test_metrics.json").read_text())
    assert theirs["threshold_split"] == "experiment valid" and not theirs["thresholds_optimistic"]
    for label in TINY_LABELS:  # the experiment's own thresholds, hence the same metrics
        assert theirs["labels"][label]["threshold"] == pytest.approx(mine["labels"][label]["threshold"])
        assert theirs["labels"][label]["auroc"] == pytest.approx(mine["labels"][label]["auroc"])
        assert theirs["labels"][label]["sensitivity"] == pytest.approx(mine["labels"][label]["sensitivity"])
    assert theirs["data"]["absent"] == [] and theirs["data"]["label_map"]["Effusion R"] == "pleural_effusion_right"
    assert (folder / "report.html").is_file() and (folder / "results" / "test_fairness.json").is_file()
    assert mine == json.loads((exp / "results" / "test_metrics.json").read_text())  # own results untouched


def test_a_label_the_other_dataset_lacks_is_reported_absent(trained, capsys):
    exp = trained / "np"
    config = _renamed_csv(trained, exp, drop=["pleural_effusion_left"])
    out = trained / "absent"
    assert main(["predict", str(exp), "--data", str(config), "--out", str(out)]) == 0
    assert "absent from this dataset, not scored: pleural_effusion_left" in capsys.readouterr().out
    metrics = json.loads((out / "results" / "test_metrics.json").read_text())
    assert metrics["data"]["absent"] == ["pleural_effusion_left"]
    assert sorted(metrics["labels"]) == ["cardiomegaly", "pleural_effusion_right"]
    assert "pleural_effusion_left_score" not in _scores(out)
    assert "pleural_effusion_left" in (out / "report.html").read_text()  # named as absent in the report
    # a folder holding another dataset's results is not overwritten
    assert main(["predict", str(exp), "--data", str(trained / "public.yaml"), "--out", str(out)]) == 2
    assert "choose another --out" in capsys.readouterr().err


def test_recalibration_uses_a_split_of_the_other_dataset_and_leaves_it_out(trained, capsys):
    exp = trained / "np"
    public = str(trained / "public.yaml")
    assert main(["predict", str(exp), "--data", public, "--split", "valid", "--recalibrate", "valid"]) == 2
    assert "optimistic" in capsys.readouterr().err
    assert main(["predict", str(exp), "--data", public, "--split", "all", "--recalibrate", "valid"]) == 0
    folder = exp / "external" / "synthetic-public-all-recalibrated-valid"
    metrics = json.loads((folder / "results" / "all_metrics.json").read_text())
    assert metrics["threshold_split"] == "external valid" and metrics["data"]["left_out_split"] == "valid"
    cfg = load_experiment_config(exp)
    table = load_table(cfg.data.model_copy(update={"site": "public"}), cfg.experiment.seed)
    scored = _scores(folder, "all")
    assert set(scored["image_id"]) == set(table.frame.loc[table.frame["split"] != "valid", "image_id"])
    assert main(["predict", str(exp), "--data", public, "--split", "valid", "--out", str(trained / "pv")]) == 0
    valid = _scores(trained / "pv", "valid")  # Youden's J on the public valid split, at the model's scores
    for label in TINY_LABELS:
        truth = valid[label].to_numpy(dtype=float)
        assert metrics["labels"][label]["threshold"] == pytest.approx(youden_threshold(truth, valid[f"{label}_score"]))


def test_training_images_are_never_scored_as_external_data(trained, capsys):
    exp = trained / "np"
    for split in ("train", "all"):
        assert main(["predict", str(exp), "--data", str(trained / "private.yaml"), "--split", split]) == 2
        assert "training images of" in capsys.readouterr().err
    assert main(["predict", str(exp), "--split", "all"]) == 2  # an experiment's own data: test or valid only
    assert not (exp / "external" / "synthetic-private-train").exists()


def test_transfer_matrix_puts_private_beside_non_private(trained, capsys):
    configs = [str(trained / "private.yaml"), str(trained / "public.yaml")]
    args = ["transfer", "--experiments", str(trained / "dp"), str(trained / "np"), "--data", *configs]
    assert main(args) == 0
    out = trained / "transfer"
    result = json.loads((out / "transfer.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["np", "dp"]  # non-private first, then its private counterpart
    assert result["columns"] == ["synthetic-private", "synthetic-public"]
    table = pd.read_csv(out / "transfer.csv")
    assert len(table) == 4 and table["ci95_low"].le(table["auroc_mean"]).all()
    own = table[(table["experiment"] == "np") & (table["tested_on"] == "synthetic-private")].iloc[0]
    mine = json.loads((trained / "np" / "results" / "test_metrics.json").read_text())
    assert own["in_distribution"] and own["auroc_mean"] == pytest.approx(mine["auroc_mean"])
    ratio = mine["calibration_mean"]["observed_expected"]  # calibration-in-the-large, from the cell's own results
    assert own["observed_expected_mean"] == pytest.approx(ratio["value"])
    assert [own["observed_expected_ci95_low"], own["observed_expected_ci95_high"]] == pytest.approx(ratio["ci95"])
    pairs = result["private_minus_non_private"]
    assert [(p["private"], p["non_private"]) for p in pairs] == [("dp", "np")] * 2
    assert pairs[0]["difference"] == pytest.approx(pairs[0]["auroc_private"] - pairs[0]["auroc_non_private"])
    assert pairs[0]["ci95"][0] <= pairs[0]["difference"] <= pairs[0]["ci95"][1]
    report = (out / "report.html").read_text()
    assert "Transfer matrix" in report and "Private minus non-private" in report and "data:image/png" in report
    assert "Calibration-in-the-large on each dataset" in report and "O/E, mean over labels [95% CI]" in report
    assert "observed/expected ratio, mean over labels, rows trained on" in capsys.readouterr().out
    assert main(args) == 0  # unchanged models and settings: every cell is reused
    assert capsys.readouterr().out.count("(reused)") == 4


def test_merged_sides_score_either_side(trained):
    """A dataset graded without sides: the model's right and left outputs are scored as one label,
    positive when either side is, scored by the higher side's probability."""
    exp, public = trained / "np", str(trained / "public.yaml")
    assert main(["predict", str(exp), "--data", public, "--out", str(trained / "sided")]) == 0
    assert main(["predict", str(exp), "--data", public, "--set", "data.merge_sides=true",
                 "--out", str(trained / "merged")]) == 0
    sided, merged = _scores(trained / "sided"), _scores(trained / "merged")
    sides = ["pleural_effusion_right", "pleural_effusion_left"]
    assert np.allclose(merged["pleural_effusion_score"], sided[[f"{s}_score" for s in sides]].max(axis=1))
    assert merged["pleural_effusion"].tolist() == sided[sides].max(axis=1).tolist()
    metrics = json.loads((trained / "merged" / "results" / "test_metrics.json").read_text())
    assert sorted(metrics["labels"]) == ["cardiomegaly", "pleural_effusion"] and metrics["data"]["absent"] == []
