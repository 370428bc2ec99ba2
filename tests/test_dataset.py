"""Reading a dataset folder in the study's layout (master_list.csv + images/), and its errors."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import TINY_LABELS
from data import synthetic
from main_2D_DP import main


@pytest.fixture
def hospital(tmp_path, data_cache):
    """A user's folder: the built-in private site, copied, without the site column."""
    source = synthetic.generate(data_cache, 32, {"public": 30, "private": 120}, seed=0)
    folder = tmp_path / "hospital"
    shutil.copytree(source / "images", folder / "images")
    frame = pd.read_csv(source / "master_list.csv")
    frame[frame["site"] == "private"].drop(columns="site").to_csv(folder / "master_list.csv", index=False)
    return folder


def _train(tiny_config, folder, *extra):
    path = tiny_config(data={"dataset": "master_list", "root": str(folder), "site": "all"},
                       training={"epochs": 1})
    return main(["train", "--config", str(path), *extra]), path


def test_trains_on_a_master_list_folder(tiny_config, hospital):
    code, path = _train(tiny_config, hospital)
    assert code == 0
    assert (path.parent / "experiments" / "tiny" / "checkpoints" / "best.pt").is_file()


def test_bad_grade_names_file_row_and_column(tiny_config, hospital, capsys):
    frame = pd.read_csv(hospital / "master_list.csv")
    frame.loc[3, TINY_LABELS[1]] = 7
    frame.to_csv(hospital / "master_list.csv", index=False)
    code, _ = _train(tiny_config, hospital)
    err = capsys.readouterr().err
    assert code == 2 and "master_list.csv: row 5" in err and TINY_LABELS[1] in err and "expected 1-5" in err


def test_missing_column_and_bad_split_are_named(tiny_config, hospital, capsys):
    frame = pd.read_csv(hospital / "master_list.csv")
    frame.drop(columns="age").to_csv(hospital / "master_list.csv", index=False)
    assert _train(tiny_config, hospital)[0] == 2
    assert "missing column(s) ['age']" in capsys.readouterr().err
    frame.loc[0, "split"] = "training"
    frame.to_csv(hospital / "master_list.csv", index=False)
    assert _train(tiny_config, hospital, "--name", "other")[0] == 2
    assert "row 2, column 'split': 'training'" in capsys.readouterr().err


def test_site_filter_needs_a_site_column(tiny_config, hospital, capsys):
    path = tiny_config(data={"dataset": "master_list", "root": str(hospital), "site": "private"})
    assert main(["train", "--config", str(path)]) == 2
    assert "missing column(s) ['site']" in capsys.readouterr().err


def test_blank_grades_are_unlabelled_and_masked(tiny_config, hospital):
    frame = pd.read_csv(hospital / "master_list.csv")
    frame.loc[frame.index[::5], TINY_LABELS[0]] = None  # not assessed
    frame.to_csv(hospital / "master_list.csv", index=False)
    code, path = _train(tiny_config, hospital)
    assert code == 0
    exp = path.parent / "experiments" / "tiny"
    assert main(["predict", str(exp)]) == 0
    test = pd.read_csv(exp / "predictions" / "test.csv")
    blank = test[TINY_LABELS[0]].isna()
    assert blank.any() and not test[TINY_LABELS[1]].isna().any()
    metrics = json.loads((exp / "results" / "test_metrics.json").read_text())
    assert metrics["labels"][TINY_LABELS[0]]["n"] == int((~blank).sum())
    assert metrics["labels"][TINY_LABELS[1]]["n"] == len(test)
    assert metrics["labels"][TINY_LABELS[0]]["auroc"] == pytest.approx(
        roc_auc_score(test.loc[~blank, TINY_LABELS[0]], test.loc[~blank, f"{TINY_LABELS[0]}_score"]))
