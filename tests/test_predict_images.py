"""`predict SOURCE --images PATH`: new, unlabelled images scored like the experiment's own test images,
at the model's thresholds; bad files listed with their reason; earlier results never replaced. And
`predict --calibrated` (an experiment's split, another dataset, new images) on this module's model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from artifacts import Layout
from conftest import TINY_LABELS, write_tiny_config
from data.dataset import load_table
from data.images import decode
from evaluation.calibration import apply_recalibration, stored_map
from main_2D_DP import main
from Prediction_DP import load_experiment_config, load_trained, score_frame
from privacy.release import FILES, rounded_count
from test_native_adapters import write_dicom

COPIED = 4  # test images copied as JPEG, of which the last goes into a subfolder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """A tiny finished experiment with its test predictions and release bundle, and a folder of new
    images: copies of test images (JPEG, one in a subfolder, one as PNG), DICOM files (one named
    without a suffix), and bad or irrelevant files."""
    root = tmp_path_factory.mktemp("images")
    # non-private and few resamples: half the time of a DP run, and scoring does not depend on either
    config = write_tiny_config(root, data_cache, training={"epochs": 1}, dp={"enabled": False},
                               evaluation={"bootstrap": 20, "permutations": 0})
    exp, bundle = root / "experiments" / "tiny", root / "bundle"
    assert main(["train", "--config", str(config)]) == 0
    assert main(["predict", str(exp)]) == 0
    assert main(["export", str(exp), str(bundle), "--non-private"]) == 0
    cfg = load_experiment_config(exp)
    table = load_table(cfg.data, cfg.experiment.seed)
    test = table.split("test").head(COPIED + 1)
    folder = root / "new"
    copied = {}  # path in the folder -> image_id of the experiment's test split
    for i, (image_id, relative) in enumerate(zip(test["image_id"], test["path"])):
        source = table.root / relative
        if i < COPIED:
            name = f"scan{i}.jpg" if i < COPIED - 1 else f"ward/b/scan{i}.jpg"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, folder / name)
        else:  # the same pixels, losslessly as PNG
            name = "scan_png.png"
            cv2.imwrite(str(folder / name), cv2.imread(str(source), cv2.IMREAD_GRAYSCALE))
        copied[name] = image_id
    pixels = cv2.imread(str(table.root / test["path"].iloc[0]), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
    write_dicom(folder / "ward" / "chest.dcm", pixels)
    write_dicom(folder / "ward" / "1.2.840.10008.99", pixels[::-1])  # PACS export: named by UID
    data = (table.root / test["path"].iloc[0]).read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.txt").write_text("ignored")
    (folder / ".hidden.png").write_text("skipped")
    return SimpleNamespace(exp=exp, bundle=bundle, folder=folder, copied=copied, root=root)


def _read(out: Path):
    return (pd.read_csv(out / "scores.csv", keep_default_na=False), pd.read_csv(out / "bad_images.csv"),
            json.loads((out / "inference.json").read_text()))


def test_a_folder_is_scored_like_the_experiments_own_test_images_at_its_thresholds(trained, capsys):
    assert main(["predict", str(trained.exp), "--images", str(trained.folder)]) == 0
    out = trained.exp / "inference" / "new"
    scores, bad, about = _read(out)
    # walked in a stable order, a folder's files before its subfolders; hidden and non-image files left out
    assert list(scores["path"]) == ["scan0.jpg", "scan1.jpg", "scan2.jpg", "scan_png.png", "ward/1.2.840.10008.99",
                                    "ward/chest.dcm", "ward/b/scan3.jpg"]
    assert list(scores.columns) == ["path", *[c for label in TINY_LABELS for c in (label, f"{label}_positive")]]
    assert dict(zip(bad["path"], bad["reason"].str.split(":").str[0])) == {
        "cut.jpg": "unreadable image", "notes.png": "unreadable image"}
    assert "truncated" in bad.set_index("path")["reason"]["cut.jpg"]

    # the same probabilities as predict gave these images through the experiment's dataset
    test = pd.read_csv(trained.exp / "private" / "predictions" / "test.csv").set_index("image_id")
    mine = scores.set_index("path").loc[list(trained.copied)]
    for label in TINY_LABELS:
        expected = test.loc[list(trained.copied.values()), f"{label}_score"].to_numpy()
        assert np.allclose(mine[label].to_numpy(), expected, rtol=1e-5, atol=1e-6), label
    # the binary calls at the experiment's own thresholds (Youden on its validation split)
    metrics = json.loads((trained.exp / "results" / "test_metrics.json").read_text())
    for label in TINY_LABELS:
        threshold = metrics["labels"][label]["threshold"]
        assert about["thresholds"][label] == pytest.approx(threshold)
        assert (scores[f"{label}_positive"] == (scores[label] >= threshold).astype(int)).all()
    assert scores[TINY_LABELS].apply(np.isfinite).all().all()

    assert about["threshold_split"] == "experiment valid" and about["source"]["kind"] == "experiment"
    assert about["counts"] == {"images": 9, "scored": 7, "bad": 2, "bad_per_reason": {"unreadable image": 2},
                               "other_files_ignored": 1}
    assert about["preprocessing"] == {"image_size": 32, "fit": "pad", "histogram_equalization": True}
    assert about["privacy"].startswith("NOT PRIVATE")  # the experiment's privacy statement, whatever it is
    printed = capsys.readouterr().out
    assert "scored 7 of 9 images, 2 bad (unreadable image: 2), 1 other files ignored" in printed


def test_a_csv_carries_patient_sex_and_age_and_is_checked_by_row(trained, capsys):
    listing = trained.root / "lists" / "batch.csv"
    listing.parent.mkdir(exist_ok=True)
    first, second = sorted(trained.copied)[:2]
    listing.write_text("path,patient_id,sex,age,note\n"
                       f"../new/{first},p1,female,61,x\n"
                       f"{trained.folder / second},p2,M,,y\n"
                       "gone.png,p3,,40,z\n")
    assert main(["predict", str(trained.exp), "--images", str(listing)]) == 0
    scores, bad, about = _read(trained.exp / "inference" / "batch")
    assert list(scores.columns[:4]) == ["path", "patient_id", "sex", "age"] and "note" not in scores
    assert scores[["patient_id", "sex"]].values.tolist() == [["p1", "F"], ["p2", "M"]]
    assert scores["age"].tolist() == ["61.0", ""]
    assert bad.values.tolist() == [["gone.png", "missing file"]]
    assert about["counts"]["scored"] == 2
    test = pd.read_csv(trained.exp / "private" / "predictions" / "test.csv").set_index("image_id")
    expected = test.loc[[trained.copied[first], trained.copied[second]], [f"{label}_score" for label in TINY_LABELS]]
    assert np.allclose(scores[TINY_LABELS].to_numpy(float), expected.to_numpy(), rtol=1e-5, atol=1e-6)

    for text, where in (("path,age\nscan0.jpg,200\n", "row 2, column 'age'"),
                        ("path,sex\nscan0.jpg,F\nscan1.jpg,X\n", "row 3, column 'sex'"),
                        ("path,sex\nscan0.jpg,F\n./scan0.jpg,F\n", "row 3, column 'path'"),
                        ("file,age\nscan0.jpg,3\n", "missing column(s) ['path']")):
        wrong = trained.folder.parent / "lists" / "wrong.csv"
        wrong.write_text(text)
        assert main(["predict", str(trained.exp), "--images", str(wrong), "--out", str(trained.root / "w")]) == 2
        err = capsys.readouterr().err
        assert str(wrong) in err and where in err, err


def test_a_bundle_gives_the_same_scores_at_the_thresholds_it_carries(trained):
    assert main(["predict", str(trained.bundle), "--images", str(trained.folder)]) == 0
    scores, bad, about = _read(trained.root / "bundle_inference" / "new")
    assert about["threshold_split"] == "bundle" and about["source"]["kind"] == "release bundle"
    card = json.loads((trained.bundle / "model_card.json").read_text())
    assert about["privacy"] == card["privacy"]["statement"]
    metrics = json.loads((trained.exp / "results" / "test_metrics.json").read_text())
    assert about["thresholds"] == {label: m["threshold"] for label, m in metrics["labels"].items()}
    out = trained.root / "from_experiment"
    assert main(["predict", str(trained.exp), "--images", str(trained.folder), "--out", str(out)]) == 0
    theirs, _, _ = _read(out)
    assert list(scores["path"]) == list(theirs["path"]) and len(bad) == 2
    assert np.allclose(scores[TINY_LABELS].to_numpy(float), theirs[TINY_LABELS].to_numpy(float), rtol=1e-5, atol=1e-6)
    positive = [f"{label}_positive" for label in TINY_LABELS]
    assert (scores[positive] == theirs[positive]).all().all()


def test_earlier_results_nonsense_options_and_unreadable_folders_are_refused(trained, capsys):
    out = trained.root / "once"
    assert main(["predict", str(trained.exp), "--images", str(trained.folder), "--out", str(out)]) == 0
    before = (out / "scores.csv").read_text()
    assert main(["predict", str(trained.exp), "--images", str(trained.folder), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and (out / "scores.csv").read_text() == before

    for extra in (["--split", "test"], ["--data", str(trained.root / "config.yaml")], ["--recalibrate", "valid"],
                  ["--set", "data.fit=crop"]):
        assert main(["predict", str(trained.exp), "--images", str(trained.folder), *extra]) == 2
        assert f"{extra[0]} cannot be combined with --images" in capsys.readouterr().err

    broken = trained.root / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("text")
    assert main(["predict", str(trained.exp), "--images", str(broken)]) == 2
    assert "none of the 1 images is readable (unreadable image: 1)" in capsys.readouterr().err
    assert not (trained.exp / "inference" / "broken").exists()
    (broken / "a.png").unlink()
    assert main(["predict", str(trained.exp), "--images", str(broken)]) == 2
    assert "no image found" in capsys.readouterr().err
    assert main(["predict", str(trained.exp), "--images", str(trained.root / "absent")]) == 2
    assert "not found" in capsys.readouterr().err

    # the experiment's own training images: their scores are not covered by the privacy guarantee
    cfg = load_experiment_config(trained.exp)
    table = load_table(cfg.data, cfg.experiment.seed)
    listed = trained.root / "training.csv"
    pd.DataFrame({"path": [str(table.root / p) for p in table.split("train")["path"].head(2)]}).to_csv(listed,
                                                                                                     index=False)
    assert main(["predict", str(trained.exp), "--images", str(listed)]) == 2
    assert "2 image(s) are training images of" in capsys.readouterr().err


def test_a_training_image_under_another_name_is_refused_by_its_pixels(trained, capsys):
    """A byte-for-byte copy of a training image, or its pixels re-encoded, among new images: exit 2 naming
    it, found through digests kept privately with the experiment; a bundle holds none and cannot tell."""
    cfg = load_experiment_config(trained.exp)
    table = load_table(cfg.data, cfg.experiment.seed)
    train = table.split("train")
    first = table.root / train["path"].iloc[0]
    kept = Layout(trained.exp).training_pixels
    kept.unlink(missing_ok=True)  # computed on first use, whatever the other tests did
    for name, write in (("renamed.jpg", lambda to: shutil.copyfile(first, to)),
                        ("ward/reencoded.png", lambda to: Image.fromarray(decode(first)).save(to))):
        folder = trained.root / f"copied_{Path(name).stem}"
        shutil.copytree(trained.folder, folder)
        write(folder / name)
        assert main(["predict", str(trained.exp), "--images", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"--images {folder}: {name} has the pixels of a training image of {trained.exp}" in err, err
        assert not (trained.exp / "inference" / folder.name).exists()
    digests = json.loads(kept.read_text())["digests"]
    assert len(digests) == len(train) and kept.parent.name == "private"
    made = kept.stat().st_mtime_ns
    assert main(["predict", str(trained.exp), "--images", str(folder)]) == 2 and kept.stat().st_mtime_ns == made

    bundle = trained.root / "bundle_after_digests"
    assert main(["export", str(trained.exp), str(bundle), "--non-private"]) == 0
    assert sorted(p.name for p in bundle.iterdir()) == sorted(FILES)
    with open(bundle / "model.safetensors", "rb") as handle:  # its JSON header: names and metadata
        text = handle.read(int.from_bytes(handle.read(8), "little")).decode()
    text += "".join((bundle / name).read_text() for name in FILES if not name.endswith(".safetensors"))
    assert not any(digest[:16] in text for digest in digests)
    capsys.readouterr()
    assert main(["predict", str(bundle), "--images", str(folder)]) == 0  # documented: only the experiment can tell


# A temperature, a Platt and an identity map: the tiny model ranks its few validation images worse than
# chance, so the maps it was fit (identities) would not show that scores change and calls do not.
MAPS = {"cardiomegaly": {"method": "temperature", "temperature": 2.5},
        "pleural_effusion_right": {"method": "platt", "a": 0.6, "b": -0.8},
        "pleural_effusion_left": {"method": "identity", "reason": "not fitted: set by the test"}}


def _copy(trained, name: str, calibration) -> Path:
    """A copy of the experiment (same weights, ledger entry and test results) whose best.pt stores
    ``calibration`` (None: no key, as a checkpoint of a version before recalibration)."""
    exp = trained.root / "experiments" / name
    shutil.copytree(trained.exp, exp, ignore=shutil.ignore_patterns("inference"))
    ckpt = torch.load(Layout(exp).best, weights_only=True)
    ckpt.pop("calibration")
    torch.save({**ckpt, **({"calibration": calibration} if calibration else {})}, Layout(exp).best)
    return exp


@pytest.fixture(scope="module")
def mapped(trained):
    """The experiment with :data:`MAPS` as its calibration map, and its release bundle."""
    best = torch.load(Layout(trained.exp).best, weights_only=True)
    exp = _copy(trained, "mapped", {**best["calibration"], "labels": MAPS})
    bundle = trained.root / "mapped_bundle"
    assert main(["export", str(exp), str(bundle), "--non-private"]) == 0
    return SimpleNamespace(exp=exp, bundle=bundle)


def test_the_map_is_fit_on_the_validation_predictions_of_best_pt(trained):
    stored = torch.load(Layout(trained.exp).best, weights_only=True)["calibration"]
    best = load_trained(trained.exp)
    cfg = best.cfg
    table = load_table(cfg.data, cfg.experiment.seed)
    valid = table.split("valid")
    truth, scores = score_frame(best.model, best.device, valid, table, cfg.data, 8, "valid")
    assert cfg.evaluation.recalibration == "platt"  # the default
    assert stored == stored_map(truth, scores, TINY_LABELS, valid["patient_id"].nunique(), "platt",
                                cfg.evaluation.min_positives, cfg.evaluation.min_negatives)
    assert (stored["split"], stored["images"]) == ("valid", len(valid))
    card = json.loads((trained.bundle / "model_card.json").read_text())
    assert card["calibration"].startswith(f"Platt scaling per label, fit on about "
                                          f"{rounded_count(stored['patients'])} validation patients")


def test_calibrated_predictions_keep_auroc_and_calls_beside_the_uncalibrated_ones(mapped, capsys):
    results = Layout(mapped.exp).results
    before = {path.name: path.read_bytes() for path in results.iterdir()}
    assert main(["predict", str(mapped.exp), "--calibrated"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert ("private/predictions/test_calibrated.csv, results/test_calibrated_metrics.json, "
            "results/test_calibrated_fairness.json and .csv, results/test_calibrated_calibration.json, "
            "report_test_calibrated.html") in last
    assert all((results / name).read_bytes() == text for name, text in before.items())  # nothing replaced

    raw, mine = (json.loads((results / f"test{s}_metrics.json").read_text()) for s in ("", "_calibrated"))
    assert mine["recalibration"]["labels"] == MAPS
    for label in TINY_LABELS:
        a, b = raw["labels"][label], mine["labels"][label]
        threshold = apply_recalibration(np.array([[a["threshold"]]]), [label], MAPS)[0, 0]
        assert b["threshold"] == pytest.approx(threshold, rel=1e-12)
        assert {k: v for k, v in a.items() if k != "threshold"} == {k: v for k, v in b.items() if k != "threshold"}
    assert (raw["auroc_mean"], raw["auroc_mean_ci95"]) == (mine["auroc_mean"], mine["auroc_mean_ci95"])

    predictions = Layout(mapped.exp).predictions
    own, calibrated = pd.read_csv(predictions / "test.csv"), pd.read_csv(predictions / "test_calibrated.csv")
    scores = own[[f"{label}_score" for label in TINY_LABELS]].to_numpy()
    assert np.allclose(calibrated[[f"{label}_score_uncalibrated" for label in TINY_LABELS]].to_numpy(), scores)
    assert np.allclose(calibrated[[f"{label}_score" for label in TINY_LABELS]].to_numpy(),
                       apply_recalibration(scores, TINY_LABELS, MAPS))
    assert not np.allclose(calibrated["cardiomegaly_score"], own["cardiomegaly_score"])

    calibration = json.loads((results / "test_calibrated_calibration.json").read_text())
    assert calibration["uncalibrated"] == json.loads((results / "test_calibration.json").read_text())
    assert calibration["recalibration"]["labels"] == MAPS
    assert calibration["calibration"]["labels"]["pleural_effusion_left"] == \
        calibration["uncalibrated"]["calibration"]["labels"]["pleural_effusion_left"]  # identity
    assert calibration["calibration"]["labels"]["cardiomegaly"] != \
        calibration["uncalibrated"]["calibration"]["labels"]["cardiomegaly"]
    page = (mapped.exp / "report_test_calibrated.html").read_text()
    assert "After recalibration" in page and "Before recalibration" in page and "T = 2.5" in page


def test_a_bundle_carries_the_map_and_applies_it_to_another_dataset_and_new_images(trained, mapped):
    rebuild = json.loads((mapped.bundle / "model.json").read_text())
    assert rebuild["calibration"]["labels"] == MAPS and rebuild["calibration"]["counts_rounded"] is True
    card = json.loads((mapped.bundle / "model_card.json").read_text())
    assert card["calibration"].startswith("Platt scaling per label, fit on about ")
    assert f"- Calibration map: {card['calibration']}." in (mapped.bundle / "model_card.md").read_text()

    assert main(["predict", str(mapped.bundle), "--images", str(trained.folder), "--calibrated"]) == 0
    scores, _, about = _read(trained.root / "mapped_bundle_inference" / "new_calibrated")
    assert about["recalibration"]["labels"] == MAPS and "mapped by the calibration map" in about["thresholds_from"]
    raw = scores[[f"{label}_uncalibrated" for label in TINY_LABELS]].to_numpy(float)
    assert np.allclose(scores[TINY_LABELS].to_numpy(float), apply_recalibration(raw, TINY_LABELS, MAPS))
    for i, label in enumerate(TINY_LABELS):  # the same calls as at the bundle's own thresholds
        assert (scores[f"{label}_positive"] == (raw[:, i] >= rebuild["thresholds"][label])).all()

    # sides merged: the merged label's sides have different maps, so it keeps its scores (AUROC unchanged)
    assert main(["predict", str(mapped.bundle), "--data", str(trained.root / "config.yaml"), "--calibrated",
                 "--set", "data.merge_sides=true"]) == 0
    out = trained.root / "mapped_bundle_external" / "synthetic-private-test"
    metrics = json.loads((out / "results" / "test_calibrated_metrics.json").read_text())
    maps = metrics["recalibration"]["labels"]
    assert maps["cardiomegaly"] == MAPS["cardiomegaly"] and "different maps" in maps["pleural_effusion"]["reason"]
    predictions = pd.read_csv(out / "private" / "predictions" / "test_calibrated.csv")
    for label in ("cardiomegaly", "pleural_effusion"):
        known = predictions[label].notna()
        truth = predictions.loc[known, label]
        assert metrics["labels"][label]["auroc"] == pytest.approx(
            roc_auc_score(truth, predictions.loc[known, f"{label}_score_uncalibrated"]), abs=1e-12)
    assert not (out / "results" / "test_metrics.json").exists()  # only the calibrated results were asked for


def test_calibrated_is_refused_on_the_validation_split_and_without_a_map(trained, capsys):
    assert main(["predict", str(trained.exp), "--split", "valid", "--calibrated"]) == 2
    assert "--calibrated --split valid: the calibration map was fit on the validation split" in capsys.readouterr().err
    assert not list(trained.exp.rglob("*valid_calibrated*"))

    old = _copy(trained, "before_recalibration", None)  # a checkpoint without the key still predicts
    assert main(["predict", str(old), "--images", str(trained.folder)]) == 0
    assert main(["predict", str(old), "--calibrated"]) == 2
    err = capsys.readouterr().err
    assert f"{Layout(old).best} has no calibration map" in err and "evaluation.recalibration: platt" in err
    assert not list(old.rglob("*_calibrated*"))
    bundle = trained.root / "bundle_without_map"
    assert main(["export", str(old), str(bundle), "--non-private"]) == 0
    assert json.loads((bundle / "model.json").read_text())["calibration"] is None
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["calibration"] == "none" and "- Calibration map: none." in (bundle / "model_card.md").read_text()
    capsys.readouterr()
    assert main(["predict", str(bundle), "--images", str(trained.folder), "--calibrated"]) == 2
    err = capsys.readouterr().err
    assert f"{bundle / 'model.json'} has no calibration map" in err and "export it again" in err
    assert not (trained.root / "bundle_without_map_inference").exists()
