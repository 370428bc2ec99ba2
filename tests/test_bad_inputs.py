"""Every kind of bad input a user can hand over ends with exit code 2 and a message naming the file and
the row, key or value, never with a traceback: configs, dataset CSVs, images, checkpoints and
experiment folders."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from artifacts import load_checkpoint
from conftest import REPO, TINY_LABELS
from main_2D_DP import main
from models import build_model
from test_native_adapters import write_dicom


@pytest.fixture
def site(tmp_path):
    """An in-house export: 24 PNGs of 12 patients and labels.csv with the default column names."""
    root = tmp_path / "site"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        cv2.imwrite(str(root / "img" / f"{i:02d}.png"), rng.integers(0, 255, (40, 40), dtype=np.uint8))
        rows.append({"path": f"img/{i:02d}.png", "patient_id": f"p{i // 2}", "sex": "FM"[i % 2], "age": 40 + i,
                     "split": ["train", "train", "valid", "test"][(i // 2) % 4], "cardiomegaly": i % 3 == 0})
    pd.DataFrame(rows).astype({"cardiomegaly": int}).to_csv(root / "labels.csv", index=False)
    return root


def _config(tmp_path, site, **data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"dataset": "csv", "root": str(site), "image_size": 32, "labels": ["cardiomegaly"],
                 "cache": {"dir": str(tmp_path / "cache"), "max_bad_fraction": 0.0}, **data},
        "output": {"target_dir": str(tmp_path / "out")}}))
    return str(path)


def _edit_csv(site, change):
    frame = pd.read_csv(site / "labels.csv", dtype=str, keep_default_na=False)
    change(frame)
    frame.to_csv(site / "labels.csv", index=False)


def _set(column, row, value):
    return lambda frame: frame.__setitem__(column, [value if i == row else v for i, v in enumerate(frame[column])])


CONFIG_CASES = {
    "yaml syntax": ("data:\n  dataset: [csv\n  root: x\n", [], ["YAML syntax error at line 3"]),
    "unknown key": (None, ["data.datset=csv"], ["data.datset: unknown key"]),
    "wrong type": (None, ["training.epochs=many"], ["training.epochs", "'many'"]),
    "out of range": (None, ["dp.max_grad_norm=-1"], ["dp.max_grad_norm", "greater than 0", "-1"]),
    "both noise sources": (None, ["dp.noise_multiplier=1.0"], ["set exactly one of dp.epsilon"]),
    "unknown dataset": (None, ["data.dataset=imagenet"], ["data.dataset", "'imagenet'"]),
    "missing file": ("missing", [], ["config file not found", "nowhere.yaml"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config(tmp_path, site, capsys, case):
    text, sets, expected = CONFIG_CASES[case]
    config = _config(tmp_path, site)
    if text == "missing":
        config = str(tmp_path / "nowhere.yaml")
    elif text:
        (tmp_path / "cfg.yaml").write_text(text)
    assert main(["train", "--config", config, *(["--set", *sets] if sets else [])]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err


CSV_CASES = {
    "missing column": (lambda f: f.pop("age"), ["labels.csv: missing column(s) ['age']"]),
    "unparseable age": (_set("age", 4, "forty"), ["labels.csv: row 6, column 'age': 'forty'"]),
    "unknown sex code": (_set("sex", 5, "X"), ["labels.csv: row 7, column 'sex': 'X', expected one of"]),
    "unknown split": (_set("split", 2, "holdout"), ["labels.csv: row 4, column 'split': 'holdout'"]),
    "label value": (_set("cardiomegaly", 3, "2"), ["row 5, column 'cardiomegaly': '2', expected 1, 0, -1 or blank"]),
    "duplicate image": (_set("path", 3, "img/00.png"), ["labels.csv: row 5, column 'path': 'img/00.png'",
                                                        "no duplicate image"]),
    "patient in two splits": (_set("split", 1, "test"), ["patient 'p0' has images in several splits"]),
    "path leaving the root": (_set("path", 0, "../../etc/passwd"), ["'../../etc/passwd' leaves the dataset root"]),
    "not a table": (None, ["labels.csv: not a readable CSV table"]),
}


@pytest.mark.parametrize("case", CSV_CASES)
def test_bad_dataset_csv(tmp_path, site, capsys, case):
    change, expected = CSV_CASES[case]
    if change is None:
        (site / "labels.csv").write_bytes(bytes(range(256)) * 4)
    else:
        _edit_csv(site, change)
    assert main(["data", "describe", "--config", _config(tmp_path, site)]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err


def _bad_image(site, kind: str) -> str:
    """Replace image 5 by a broken one of ``kind``; return its path relative to the site."""
    source = site / "img" / "05.png"
    if kind == "truncated jpeg":
        ok, encoded = cv2.imencode(".jpg", cv2.imread(str(source)))
        (site / "img" / "05.jpg").write_bytes(encoded.tobytes()[: len(encoded) // 2])
        name = "img/05.jpg"
    elif kind == "zero bytes":
        source.write_bytes(b"")
        name = "img/05.png"
    elif kind in ("wrong bit depth", "dicom without pixel data"):
        import pydicom

        name = "img/05.dcm"
        write_dicom(site / name, np.arange(64, dtype=np.uint16).reshape(8, 8))
        ds = pydicom.dcmread(site / name)
        if kind == "wrong bit depth":  # the header promises 32 bits per pixel, the data holds 16
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        else:
            del ds.PixelData
        ds.save_as(site / name, enforce_file_format=True)
    else:
        name = "img/missing.png"
    _edit_csv(site, _set("path", 5, name))
    return name


IMAGE_CASES = {"truncated jpeg": "unreadable image", "zero bytes": "unreadable image",
               "wrong bit depth": "unreadable DICOM", "dicom without pixel data": "unreadable DICOM",
               "missing file": "missing file"}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_image_is_reported_by_prepare_and_named_by_training(tmp_path, site, capsys, case):
    name = _bad_image(site, case)
    config = _config(tmp_path, site)
    assert main(["prepare", "--config", config]) == 2  # data.cache.max_bad_fraction: 0
    err = capsys.readouterr().err
    assert "1 of 24 images (4.2%) are missing or unreadable" in err and "bad_images.csv" in err
    report = pd.read_csv(next((tmp_path / "cache").glob("csv_32px_*")) / "bad_images.csv")
    assert report["path"].tolist() == [name] and report["reason"][0].startswith(IMAGE_CASES[case])
    shutil.rmtree(tmp_path / "cache")  # without a cache, training names the image when it reaches it
    assert main(["train", "--config", config, "--set", "dp.enabled=false", "training.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert f"{site / name}: {IMAGE_CASES[case]}" in err and "prepare" in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """One small finished experiment, copied for each case that damages it."""
    root = tmp_path_factory.mktemp("trained")
    raw = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())
    raw["data"].update(root=str(data_cache), image_size=32, labels=TINY_LABELS,
                       synthetic={"public_patients": 30, "private_patients": 120})
    raw["training"].update(epochs=1, logical_batch_size=16, physical_batch_size=8, device="cpu")
    raw["dp"]["enabled"] = False
    raw["output"]["target_dir"] = str(root)
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(root / "cfg.yaml"), "--name", "exp"]) == 0
    return root / "exp"


def _wrong_model(exp):
    other = build_model("resnet18", len(TINY_LABELS), "mish", 32).state_dict()
    torch.save({**load_checkpoint(exp / "checkpoints" / "best.pt"), "model": other}, exp / "checkpoints" / "best.pt")


def _wrong_labels(exp):
    state = load_checkpoint(exp / "checkpoints" / "best.pt")
    torch.save({**state, "labels": ["edema", "fracture", "mass"]}, exp / "checkpoints" / "best.pt")


def _truncated(exp):
    best = exp / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:5000])


def _older_schema(exp):  # before the uka reader the study layout was called master_list
    raw = yaml.safe_load((exp / "private" / "config.yaml").read_text())
    raw["data"]["dataset"] = "master_list"
    (exp / "private" / "config.yaml").write_text(yaml.safe_dump(raw))


EXPERIMENT_CASES = {
    "checkpoint of another model": (_wrong_model, ["best.pt: weights do not fit model resnet9"]),
    "checkpoint of another label set": (_wrong_labels, ["best.pt was trained on labels ['edema', 'fracture'"]),
    "truncated checkpoint": (_truncated, ["best.pt: not a readable DP-CXR checkpoint"]),
    "experiment from an older schema": (_older_schema, ["config.yaml: invalid configuration", "data.dataset",
                                                        "'master_list'"]),
    "missing experiment": (lambda exp: shutil.rmtree(exp), ["not an experiment folder (no private/config.yaml)"]),
}


@pytest.mark.parametrize("case", EXPERIMENT_CASES)
def test_bad_checkpoint_or_experiment_folder(tmp_path, trained, capsys, case):
    damage, expected = EXPERIMENT_CASES[case]
    exp = tmp_path / "exp"
    shutil.copytree(trained, exp)
    damage(exp)
    assert main(["predict", str(exp)]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err

