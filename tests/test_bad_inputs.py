"""Every kind of bad input a user can hand over ends with exit code 2 and a message naming the file and
the row, key or value, never with a traceback: configs, dataset CSVs, images, checkpoints and
experiment folders."""
from __future__ import annotations

import shutil
import struct
import zlib

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
        "output": {"target_dir": str(tmp_path / "out")}, "model": {"pretrained_checkpoint": None}}))
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
    "no noise": (None, ["dp.epsilon=null", "dp.noise_multiplier=0", "training.logical_batch_size=2",
                        "training.physical_batch_size=2"], ["dp.noise_multiplier", "dp.enabled: false"]),
    "noise too small to account": (None, ["dp.epsilon=null", "dp.noise_multiplier=1e-160"],
                                   ["dp.noise_multiplier = 1e-160", "below 0.01"]),
    "epsilon too large to search": (None, ["dp.epsilon=1e300"], ["dp.epsilon = 1e+300", "above 1000"]),
    "unknown dataset": (None, ["data.dataset=imagenet"], ["data.dataset", "'imagenet'"]),
    "missing file": ("missing", [], ["config file not found", "nowhere.yaml"]),
    "a directory": ("directory", [], ["config file", "is a directory"]),
    "not UTF-8": ("data:\n  site: caf\xe9\n".encode("latin-1"), [], ["not UTF-8 text"]),
    "duplicate key": ("training:\n  epochs: 2\n  lr: 0.1\n  epochs: 5\n", [], ["duplicate key 'epochs'", "line 4"]),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{x}: &{x} [{', '.join(['*' + w] * 10)}]\n" for w, x in zip("abcdefghijk", "bcdefghijkl")), [],
        ["more than 100 YAML aliases"]),
    # 82 aliases, each repeating the one before nine times: a few hundred bytes standing for 9^10 values
    "nested aliases": ("derived:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {x}: &{x} [{', '.join(['*' + w] * 9)}]\n" for w, x in zip("abcdefghi", "bcdefghij")) +
        "data:\n  labels: *j\n", [], ["cfg.yaml", "expand", "1,000,000 characters"]),
    "deep nesting": ("data:\n  labels: " + "[" * 2000 + "]" * 2000 + "\n", [], ["cfg.yaml", "nests deeper than"]),
    "many wrong values": ("data:\n  labels: [" + "[], " * 50_000 + "]\n", [], ["data.labels.0", "more"]),
    "nan learning rate": (None, ["training.lr=.nan"], ["training.lr", "finite"]),
    "infinite clipping norm": (None, ["dp.max_grad_norm=.inf"], ["dp.max_grad_norm", "finite"]),
    "nan weight decay": (None, ["training.weight_decay=.nan"], ["training.weight_decay", "finite"]),
    "nan noise multiplier": (None, ["dp.epsilon=null", "dp.noise_multiplier=.nan"], ["dp.noise_multiplier", "finite"]),
    "nan age bin": (None, ["evaluation.age_bins=[0, .nan, 100]"], ["evaluation.age_bins"]),
    "seed overflow": (None, ["experiment.seed=99999999999999999999"], ["experiment.seed", "less than or equal"]),
    "impossible resample count": (None, ["evaluation.bootstrap=2000000000"], ["evaluation.bootstrap"]),
    "huge value not echoed": (None, ["training.epochs=" + "9" * 5000], ["--set training.epochs", "characters)"]),
    "unknown no-finding label": (None, ["evaluation.no_finding_label=No Finding"], ["'No Finding' is not one of"]),
    "unreachable epsilon": (None, ["dp.epsilon=1e-9", "training.logical_batch_size=2",
                                   "training.physical_batch_size=2"], ["dp.epsilon = 1e-09", "cannot be reached"]),
    "no augmented view": (None, ["dp.augmult=0"], ["dp.augmult", "greater than or equal to 1"]),
    "absurd augmult": (None, ["dp.augmult=65"], ["dp.augmult", "less than or equal to 64"]),
    "average that never moves": (None, ["training.ema=1"], ["training.ema", "less than 1"]),
    "average that keeps nothing": (None, ["training.ema=0"], ["training.ema", "greater than 0"]),
    "flip without the other side": (None, ["data.labels=[effusion_right]", "training.augment.flip=true"],
                                    ["training.augment.flip", "'effusion_right'", "partner"]),
    "old flip key": (None, ["data.augment_flip=true"], ["data.augment_flip moved to training.augment.flip"]),
    "nothing trainable": (None, ["training.trainable=[layer9]", "training.logical_batch_size=2",
                                 "training.physical_batch_size=2"], ["training.trainable", "'layer9'",
                                                                   "top-level modules"]),
    "public pretraining on the private site": (None, ["model.pretrained_checkpoint=public", "pretraining.site=private"],
                                               ["pretraining.site", "another site than data.site"]),
    "public pretraining of the same patients": (None, ["model.pretrained_checkpoint=public",
                                                       "training.logical_batch_size=2", "training.physical_batch_size=2"],
                                                ["pretraining.site 'public' has", "training patients"]),
    "output is a file": ("file:output.target_dir", [], ["output.target_dir", "is a file, expected a folder"]),
    "data root is a file": ("file:data.root", [], ["data.root", "is a file, expected a folder"]),
    "cache dir is a file": ("file:data.cache.dir", [], ["data.cache.dir", "is a file, expected a folder"]),
}


def _tree(root) -> dict:
    """Every file under ``root`` with its size and modification time: a snapshot to compare."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config(tmp_path, site, capsys, case):
    text, sets, expected = CONFIG_CASES[case]
    config = _config(tmp_path, site)
    if text == "missing":
        config = str(tmp_path / "nowhere.yaml")
    elif text == "directory":
        config = str(tmp_path)
    elif isinstance(text, str) and text.startswith("file:"):
        (tmp_path / "in_the_way").write_text("a file")
        sets = [f"{text[5:]}={tmp_path / 'in_the_way'}"]
    elif isinstance(text, bytes):
        (tmp_path / "cfg.yaml").write_bytes(text)
    elif text:
        (tmp_path / "cfg.yaml").write_text(text)
    before = _tree(tmp_path)
    assert main(["train", "--config", config, *(["--set", *sets] if sets else [])]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    assert len(err) < 2000 and "Traceback" not in err  # one cause, never the whole input echoed back
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("cache")} == {
        k: v for k, v in before.items() if not k.startswith("cache")}  # nothing written (the data cache aside)


NAME_CASES = {"parent": ["train", ".."], "dot": ["train", "."], "separator": ["train", "a/b"],
              "control character": ["train", "run\x01"], "too long": ["train", "x" * 300], "blank": ["train", " "],
              "sweep parent": ["sweep", "../elsewhere"], "sweep separator": ["sweep", "a/../../b"],
              "sweep too long": ["sweep", "y" * 300]}


@pytest.mark.parametrize("case", NAME_CASES)
def test_names_that_would_leave_the_target_folder_are_refused(tmp_path, site, capsys, case):
    command, name = NAME_CASES[case]
    extra = ["--epsilons", "8"] if command == "sweep" else []
    config = _config(tmp_path, site)
    before = _tree(tmp_path)
    assert main([command, "--config", config, "--name", name, *extra]) == 2
    err = capsys.readouterr().err
    assert "--name" in err and "is not a usable folder name" in err and len(err) < 600, err
    assert _tree(tmp_path) == before


def test_a_name_that_links_outside_the_target_folder_is_refused(tmp_path, site, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "linked").symlink_to(tmp_path / "elsewhere")
    assert main(["train", "--config", _config(tmp_path, site), "--name", "linked"]) == 2
    assert "outside" in capsys.readouterr().err and not any((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize("name", ["null", "42", "2024-06-01"])
def test_names_that_look_like_yaml_values_stay_names(tmp_path, site, name):
    assert main(["train", "--config", _config(tmp_path, site), "--name", name, "--set", "dp.enabled=false",
                 "training.epochs=1", "training.logical_batch_size=4", "training.physical_batch_size=4"]) == 0
    assert (tmp_path / "out" / name / "private" / "config.yaml").is_file()
    assert yaml.safe_load((tmp_path / "out" / name / "private" / "config.yaml").read_text())["experiment"]["name"] == name


def test_home_is_expanded_in_every_path(tmp_path, site, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", _config(tmp_path, site), "--name", "tilde", "--set", "dp.enabled=false",
                 "training.epochs=1", "output.target_dir=~/runs", "output.ledger=~/ledger"]) == 0
    assert (tmp_path / "home" / "runs" / "tilde" / "checkpoints" / "best.pt").is_file()
    assert any((tmp_path / "home" / "ledger").iterdir()) and not (tmp_path / "~").exists()


CSV_CASES = {
    "missing column": (lambda f: f.pop("age"), ["labels.csv: missing column(s) ['age']"]),
    "unparseable age": (_set("age", 4, "forty"), ["labels.csv: row 6, column 'age': 'forty'"]),
    "unknown sex code": (_set("sex", 5, "X"), ["labels.csv: row 7, column 'sex': 'X', expected one of"]),
    "unknown split": (_set("split", 2, "holdout"), ["labels.csv: row 4, column 'split': 'holdout'"]),
    "label value": (_set("cardiomegaly", 3, "2"), ["row 5, column 'cardiomegaly': '2', expected 1, 0, -1 or blank"]),
    "duplicate image": (_set("path", 3, "img/00.png"), ["image file 'img/00.png' is listed twice"]),
    "one file, two spellings": (_set("path", 3, "./img/00.png"), ["image file 'img/00.png' is listed twice",
                                                                 "'./img/00.png'"]),
    "blank patient id": (_set("patient_id", 6, " "), ["labels.csv: row 8, column 'patient_id'", "a patient id"]),
    "age 300": (_set("age", 2, "300"), ["age 300 for image 'img/02.png'", "expected 0-120 years"]),
    "negative age": (_set("age", 9, "-5"), ["age -5 for image 'img/09.png'"]),
    "no rows": (lambda f: f.drop(f.index, inplace=True), ["lists no rows"]),
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
    config = _config(tmp_path, site)
    before = _tree(tmp_path)
    assert main(["data", "describe", "--config", config]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    assert _tree(tmp_path) == before


def test_two_files_of_one_stem_are_two_images(tmp_path, site, capsys):
    cv2.imwrite(str(site / "img" / "05.jpg"), np.full((40, 40), 128, np.uint8))
    _edit_csv(site, _set("path", 4, "img/05.jpg"))  # img/05.png (row 6) and img/05.jpg (row 5)
    assert main(["data", "describe", "--config", _config(tmp_path, site)]) == 0
    from data.dataset import load_table
    from config import load_config
    frame = load_table(load_config(_config(tmp_path, site)).data, 0, use_cache=False).frame
    assert {"img/05.png", "img/05.jpg"} <= set(frame["image_id"]) and frame["image_id"].is_unique


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
    elif kind == "decompression bomb":  # a valid header promising 30,000 x 30,000 pixels, and little data
        name = "img/bomb.png"
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        (site / name).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                                  + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    elif kind == "symlink leaving the root":
        outside = site.parent / "outside.png"
        shutil.copy(source, outside)
        name = "img/link.png"
        (site / name).symlink_to(outside)
    else:
        name = "img/missing.png"
    _edit_csv(site, _set("path", 5, name))
    return name


IMAGE_CASES = {"truncated jpeg": "unreadable image", "zero bytes": "unreadable image",
               "wrong bit depth": "unreadable DICOM", "dicom without pixel data": "unreadable DICOM",
               "missing file": "missing file", "decompression bomb": "refused as a decompression bomb",
               "symlink leaving the root": "leaves the dataset root through a symbolic link"}


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
    raw["model"]["pretrained_checkpoint"] = None
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


def _replace_best(content):
    return lambda exp: torch.save(content, exp / "checkpoints" / "best.pt")


def _non_finite(exp):
    state = load_checkpoint(exp / "checkpoints" / "best.pt")
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, exp / "checkpoints" / "best.pt")


def _more_bins_than_images(exp):
    raw = yaml.safe_load((exp / "private" / "config.yaml").read_text())
    raw["evaluation"]["calibration_bins"] = 1000
    (exp / "private" / "config.yaml").write_text(yaml.safe_dump(raw))


def _best_is_a_folder(exp):
    (exp / "checkpoints" / "best.pt").unlink()
    (exp / "checkpoints" / "best.pt").mkdir()


EXPERIMENT_CASES = {
    "checkpoint holding a list": (_replace_best([1, 2, 3]), ["best.pt: not a DP-CXR checkpoint (holds a list"]),
    "checkpoint without labels": (_replace_best({"model": {}, "epoch": 1}), ["not a DP-CXR checkpoint (no labels)"]),
    "tensor for a state dict": (_replace_best({"model": torch.zeros(3), "labels": TINY_LABELS, "epoch": 1}),
                                ["expected a state dict of tensors"]),
    "non-finite weights": (_non_finite, ["not a DP-CXR checkpoint (non-finite weights in"]),
    "checkpoint is a folder": (_best_is_a_folder, ["best.pt is a directory"]),
    "damaged summary": (lambda exp: (exp / "private" / "summary.json").write_text('{"epochs_completed": 1,'),
                        ["summary.json is damaged or unreadable"]),
    "checkpoint of another model": (_wrong_model, ["best.pt: weights do not fit model resnet9"]),
    "checkpoint of another label set": (_wrong_labels, ["best.pt was trained on labels ['edema', 'fracture'"]),
    "truncated checkpoint": (_truncated, ["best.pt: not a readable DP-CXR checkpoint"]),
    "experiment from an older schema": (_older_schema, ["config.yaml: invalid configuration", "data.dataset",
                                                        "'master_list'"]),
    "missing experiment": (lambda exp: shutil.rmtree(exp), ["not an experiment folder (no private/config.yaml)"]),
    "more calibration bins than images": (_more_bins_than_images, ["(evaluation.calibration_bins) = 1000 is more than the"]),
}


@pytest.mark.parametrize("case", EXPERIMENT_CASES)
def test_bad_checkpoint_or_experiment_folder(tmp_path, trained, capsys, case):
    damage, expected = EXPERIMENT_CASES[case]
    exp = tmp_path / "exp"
    shutil.copytree(trained, exp)
    damage(exp)
    before = _tree(tmp_path)
    assert main(["predict", str(exp)]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    assert _tree(tmp_path) == before  # nothing written, nothing overwritten

