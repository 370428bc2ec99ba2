"""Reading a dataset folder in the study's layout (UKA-CXR: master_list.csv + UKA_preprocessed/), and its errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from config import InputError, validate
from conftest import TINY_LABELS
from data import synthetic
from data.dataset import load_table
from main_2D_DP import main


@pytest.fixture
def hospital(tmp_path, data_cache):
    """A hospital's folder: the built-in private site, copied, without the site column."""
    source = synthetic.generate(data_cache, 32, {"public": 30, "private": 120}, seed=0)
    folder = tmp_path / "hospital"
    shutil.copytree(source / "UKA_preprocessed" / "private", folder / "UKA_preprocessed" / "private")
    frame = pd.read_csv(source / "master_list.csv")
    frame[frame["site"] == "private"].drop(columns="site").to_csv(folder / "final_UKA_master_list.csv", index=False)
    return folder


def _train(tiny_config, folder, *extra):
    path = tiny_config(data={"dataset": "uka", "root": str(folder), "blank": "ignore"}, training={"epochs": 1})
    return main(["train", "--config", str(path), *extra]), path


def test_trains_on_a_uka_folder(tiny_config, hospital):
    code, path = _train(tiny_config, hospital)
    assert code == 0
    assert (path.parent / "experiments" / "tiny" / "checkpoints" / "best.pt").is_file()


def test_bad_grade_names_file_row_and_column(tiny_config, hospital, capsys):
    frame = pd.read_csv(hospital / "final_UKA_master_list.csv")
    frame.loc[3, TINY_LABELS[1]] = 7
    frame.to_csv(hospital / "final_UKA_master_list.csv", index=False)
    code, _ = _train(tiny_config, hospital)
    err = capsys.readouterr().err
    assert code == 2 and "final_UKA_master_list.csv: row 5" in err and TINY_LABELS[1] in err and "expected a grade 1-5" in err


def test_missing_column_and_bad_split_are_named(tiny_config, hospital, capsys):
    frame = pd.read_csv(hospital / "final_UKA_master_list.csv")
    frame.drop(columns="age").to_csv(hospital / "final_UKA_master_list.csv", index=False)
    assert _train(tiny_config, hospital)[0] == 2
    assert "missing column(s) ['age']" in capsys.readouterr().err
    frame.loc[0, "split"] = "training"
    frame.to_csv(hospital / "final_UKA_master_list.csv", index=False)
    assert _train(tiny_config, hospital, "--name", "other")[0] == 2
    assert "row 2, column 'split': 'training', expected one of" in capsys.readouterr().err
    (hospital / "old_master_list.csv").write_text("")
    assert _train(tiny_config, hospital, "--name", "third")[0] == 2
    assert "several master list" in capsys.readouterr().err
    (hospital / "master_list.csv").write_text("")  # the canonical name wins, and must be a table
    assert _train(tiny_config, hospital, "--name", "fourth")[0] == 2
    assert "master_list.csv: not a readable CSV table" in capsys.readouterr().err


def test_left_and_right_grades_merge_into_one_label(hospital):
    frame = pd.read_csv(hospital / "final_UKA_master_list.csv")
    frame.loc[0, "pleural_effusion_right"] = None
    frame.loc[0, "pleural_effusion_left"] = 1
    frame.loc[1, ["pleural_effusion_right", "pleural_effusion_left"]] = None
    frame.to_csv(hospital / "final_UKA_master_list.csv", index=False)
    data = validate({"data": {"dataset": "uka", "root": str(hospital), "merge_sides": True, "blank": "ignore",
                              "labels": ["cardiomegaly", "pleural_effusion"]}}).data
    table = load_table(data, seed=0)
    merged = table.frame.set_index("image_id")["pleural_effusion"]
    either = frame[["pleural_effusion_right", "pleural_effusion_left"]].isin([3, 4]).any(axis=1)
    expected = pd.Series(either.astype(float).to_numpy(), index=frame["image_id"])
    expected.iloc[1] = np.nan  # both sides not assessed
    pd.testing.assert_series_equal(merged, expected, check_names=False, check_dtype=False)
    assert expected.iloc[2:].sum() > 5  # the fixture has positives on some side
    with pytest.raises(InputError, match="merge X_right/X_left with data.merge_sides"):
        load_table(data.model_copy(update={"merge_sides": False}), seed=0)


def test_blank_grades_are_unlabelled_and_masked(tiny_config, hospital):
    frame = pd.read_csv(hospital / "final_UKA_master_list.csv")
    frame.loc[frame.index[::5], TINY_LABELS[0]] = None  # not assessed
    frame.to_csv(hospital / "final_UKA_master_list.csv", index=False)
    code, path = _train(tiny_config, hospital)
    assert code == 0
    exp = path.parent / "experiments" / "tiny"
    assert main(["predict", str(exp)]) == 0
    test = pd.read_csv(exp / "private" / "predictions" / "test.csv")
    blank = test[TINY_LABELS[0]].isna()
    assert blank.any() and not test[TINY_LABELS[1]].isna().any()
    metrics = json.loads((exp / "results" / "test_metrics.json").read_text())
    assert metrics["labels"][TINY_LABELS[0]]["n"] == int((~blank).sum())
    assert metrics["labels"][TINY_LABELS[1]]["n"] == len(test)
    assert metrics["labels"][TINY_LABELS[0]]["auroc"] == pytest.approx(
        roc_auc_score(test.loc[~blank, TINY_LABELS[0]], test.loc[~blank, f"{TINY_LABELS[0]}_score"]))
