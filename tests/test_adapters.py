"""Native layouts: CheXpert and ChestX-ray14 fixtures with their real headers and quirks."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pandas as pd
import pytest

from config import load_config
from data import synthetic
from data.dataset import apply_label_policy, load_table, patient_split
from main_2D_DP import main

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
                   "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
                   "Fracture,Support Devices")
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def _radiograph(seed: int, cardiomegaly: bool, size: int = 48) -> np.ndarray:
    case = synthetic.sample_patient_cases(np.random.default_rng(seed), "public", seed)[0]
    case = copy.deepcopy(case)
    case.severity = {label: 0.0 for label in synthetic.LABELS}  # what is drawn (grades are the reader's)
    case.severity["cardiomegaly"] = 1.0 if cardiomegaly else 0.0
    return synthetic.render(case, size)


@pytest.fixture
def chexpert(tmp_path):
    """CheXpert-v1.0-small with 40 patients, laterals, uncertain and blank labels."""
    root = tmp_path / "CheXpert-v1.0-small"
    rng = np.random.default_rng(0)
    for name, patients in (("train", range(1, 41)), ("valid", range(64541, 64551))):
        lines = [CHEXPERT_HEADER]
        for p in patients:
            for study in (1, 2):
                sick = rng.random() < 0.4
                cardio = "1.0" if sick else rng.choice(["0.0", "", "-1.0"])
                sex = rng.choice(["Male", "Female", "Unknown"], p=[0.5, 0.45, 0.05])
                for view, fl, appa in (("view1_frontal", "Frontal", rng.choice(["AP", "PA"])),
                                       ("view2_lateral", "Lateral", "")):
                    rel = f"{name}/patient{p:05d}/study{study}/{view}.jpg"
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(root / rel), _radiograph(p * 10 + study, sick))
                    effusion = rng.choice(["1.0", "0.0", "-1.0", ""])
                    values = ["" if rng.random() < 0.5 else "0.0" for _ in range(14)]
                    values[0] = "" if sick else "1.0"
                    values[2], values[10] = cardio, effusion  # Cardiomegaly, Pleural Effusion
                    lines.append(f"CheXpert-v1.0-small/{rel},{sex},{rng.integers(18, 91)},{fl},{appa},{','.join(values)}")
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return root


def _cfg(tmp_path, dataset, root, **data):
    path = tmp_path / "cfg.yaml"
    path.write_text("{}")
    sets = [f"data.dataset={dataset}", f"data.root={root}", "data.image_size=32", "training.epochs=1",
            "training.logical_batch_size=16", "training.physical_batch_size=8", "training.device=cpu",
            f"output.target_dir={tmp_path / 'experiments'}", "model.pretrained_checkpoint=null"]
    sets += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(path, sets), sets


def test_chexpert_table_counts_labels_and_demographics(tmp_path, chexpert):
    cfg, _ = _cfg(tmp_path, "chexpert", chexpert, labels="[Cardiomegaly,Pleural Effusion]")
    table = load_table(cfg.data, seed=0)
    frame = table.frame
    raw = pd.concat([pd.read_csv(chexpert / "train.csv"), pd.read_csv(chexpert / "valid.csv")], ignore_index=True)
    frontal = raw[raw["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    assert len(frame) == len(frontal) == 100  # laterals dropped by the default view filter
    assert set(frame["view"]) <= {"AP", "PA"}
    assert (frame["split"] == "test").sum() == 20  # valid.csv is the official test split
    assert set(frame["sex"]) <= {"F", "M", ""} and (frame["sex"] == "").sum() == (frontal["Sex"] == "Unknown").sum()
    assert frame["age"].tolist() == frontal["Age"].tolist()
    # uncertain (-1) ignored (NaN), blank zero, by default
    cardio = frontal["Cardiomegaly"]
    assert frame["Cardiomegaly"].isna().sum() == (cardio == -1).sum()
    assert (frame["Cardiomegaly"] == 0).sum() == ((cardio == 0) | cardio.isna()).sum()
    assert (frame["Cardiomegaly"] == 1).sum() == (cardio == 1).sum()
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert all((chexpert / p).is_file() for p in frame["path"])


def test_chexpert_policies_views_and_label_map(tmp_path, chexpert):
    cfg, _ = _cfg(tmp_path, "chexpert", chexpert, uncertain="one", blank="ignore", views="[LATERAL]",
                  label_map="{Cardiomegaly: cardiomegaly}", labels="[cardiomegaly]")
    frame = load_table(cfg.data, seed=0).frame
    raw = pd.read_csv(chexpert / "train.csv")
    lateral = pd.concat([raw, pd.read_csv(chexpert / "valid.csv")])
    lateral = lateral[lateral["Frontal/Lateral"] == "Lateral"]["Cardiomegaly"]
    assert len(frame) == 100 and set(frame["view"]) == {"LATERAL"}
    assert (frame["cardiomegaly"] == 1).sum() == ((lateral == 1) | (lateral == -1)).sum()
    assert frame["cardiomegaly"].isna().sum() == lateral.isna().sum()


def test_unknown_label_names_what_the_dataset_has(tmp_path, chexpert):
    cfg, _ = _cfg(tmp_path, "chexpert", chexpert, labels="[cardiomegaly]")
    with pytest.raises(Exception, match=r"not in the chexpert dataset; it has \['No Finding'"):
        load_table(cfg.data, seed=0)


def test_trains_and_predicts_on_chexpert_layout(tmp_path, chexpert):
    _, sets = _cfg(tmp_path, "chexpert", chexpert, labels="[Cardiomegaly]")
    config = tmp_path / "cfg.yaml"
    assert main(["train", "--config", str(config), "--name", "cx", "--set", *sets]) == 0
    assert main(["predict", str(tmp_path / "experiments" / "cx")]) == 0
    test = pd.read_csv(tmp_path / "experiments" / "cx" / "private" / "predictions" / "test.csv")
    assert len(test) == 20 and test["image_id"].str.startswith("valid/patient").all()


@pytest.mark.parametrize("version", ["v2020", "2017"])
def test_nih_both_csv_versions_with_official_split(tmp_path, version):
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    rows, train_val, test = [], [], []
    findings = ["No Finding", "Cardiomegaly|Effusion", "Pleural_Thickening", "Infiltration|Effusion|Mass", "Hernia"]
    for patient in range(1, 13):
        for follow in range(2):
            name = f"{patient:08d}_{follow:03d}.png"
            cv2.imwrite(str(root / "images" / name), _radiograph(patient, patient % 3 == 0))
            age = 40 + patient
            age_text = f"{age:03d}Y" if version == "2017" else str(age)
            label = findings[(patient + follow) % len(findings)]
            line = f"{name},{label},{follow},{patient},{age_text},{'MF'[patient % 2]},{'PA' if follow else 'AP'},2500,2048,0.143,0.143"
            rows.append(line + ("," if version == "2017" else ""))
            (test if patient > 9 else train_val).append(name)
    csv = "Data_Entry_2017.csv" if version == "2017" else "Data_Entry_2017_v2020.csv"
    header = NIH_HEADER + ("," if version == "2017" else "")
    (root / csv).write_text("\n".join([header, *rows]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")

    cfg, _ = _cfg(tmp_path, "nih", root, labels="[Cardiomegaly,Effusion,Pleural_Thickening]")
    frame = load_table(cfg.data, seed=1).frame
    assert len(frame) == 24
    assert sorted(frame.loc[frame["split"] == "test", "image_id"]) == sorted(n[:-4] for n in test)
    assert set(frame["split"]) <= {"train", "valid", "test"}
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert frame["age"].tolist() == [40 + p for p in range(1, 13) for _ in range(2)]
    assert frame["sex"].tolist()[:4] == ["F", "F", "M", "M"]
    effusion = frame["Effusion"].to_numpy()
    expected = [float("Effusion" in findings[(p + f) % 5]) for p in range(1, 13) for f in range(2)]
    assert effusion.tolist() == expected
    assert frame["Pleural_Thickening"].sum() == sum("Pleural_Thickening" in findings[(p + f) % 5]
                                                    for p in range(1, 13) for f in range(2))


def test_label_policy_and_patient_split_rules():
    values = pd.Series([1.0, 0.0, -1.0, np.nan])
    assert apply_label_policy(values, "zero", "zero").tolist() == [1, 0, 0, 0]
    assert apply_label_policy(values, "one", "zero").tolist() == [1, 0, 1, 0]
    out = apply_label_policy(values, "ignore", "ignore")
    assert out[:2].tolist() == [1, 0] and out[2:].isna().all()
    patients = pd.Series([f"p{i // 3}" for i in range(3000)])
    official = pd.Series([""] * 3000)
    official[:2] = "test"  # images without a split follow their patient's: p0's third image is test too
    split = patient_split(patients, official, 0.1, 0.2, seed=0)
    assert (split[:3] == "test").all()
    official[2] = "train"
    with pytest.raises(Exception, match=r"patient 'p0' has images in several splits \['test', 'train'\]"):
        patient_split(patients, official, 0.1, 0.2, seed=0)
    assert (pd.DataFrame({"p": patients, "s": split}).groupby("p")["s"].nunique() == 1).all()
    share = split.value_counts(normalize=True)
    assert 0.07 < share["valid"] < 0.13 and share.get("test", 0) < 0.01  # official test exists: none drawn
    split2 = patient_split(patients, pd.Series([""] * 3000), 0.1, 0.2, seed=0)
    assert 0.16 < (split2 == "test").mean() < 0.24
    assert split2.equals(patient_split(patients, pd.Series([""] * 3000), 0.1, 0.2, seed=0))


@pytest.fixture
def in_house(tmp_path):
    """A hospital export: own column names, free-text sex codes, some blanks and no view column."""
    root = tmp_path / "hospital"
    (root / "png").mkdir(parents=True)
    rng = np.random.default_rng(5)
    lines = ["file_name,mrn,gender,age_years,partition,cardiomegaly,effusion"]
    for i in range(60):
        sick = rng.random() < 0.4
        cv2.imwrite(str(root / "png" / f"img{i:03d}.png"), _radiograph(i, sick))
        gender = ["Female", "male", "F", "", "M"][i % 5]
        partition = ["train", "train", "validation", "test", ""][(i // 2) % 5] if i < 50 else ""
        lines.append(f"png/img{i:03d}.png,MRN{i // 2},{gender},{'' if i == 7 else 30 + i},{partition},"
                     f"{int(sick)},{['1', '0', '-1', ''][i % 4]}")
    (root / "export.csv").write_text("\n".join(lines) + "\n")
    return root


def _in_house_sets(root):
    return ["data.csv.file=export.csv", "data.csv.path=file_name", "data.csv.patient_id=mrn",
            "data.csv.sex=gender", "data.csv.age=age_years", "data.csv.split=partition",
            "data.labels=[cardiomegaly,pleural_effusion]", "data.label_map={effusion: pleural_effusion}"]


def test_in_house_csv_with_a_column_mapping(tmp_path, in_house):
    config = tmp_path / "cfg.yaml"
    config.write_text("{}")
    cfg = load_config(config, ["data.dataset=csv", f"data.root={in_house}", *_in_house_sets(in_house)])
    frame = load_table(cfg.data, seed=0).frame
    assert len(frame) == 60 and set(frame["sex"]) == {"F", "M", ""}
    assert frame["sex"].tolist()[:5] == ["F", "M", "F", "", "M"]
    assert np.isnan(frame["age"][7]) and frame["age"][8] == 38
    assert frame["pleural_effusion"].isna().sum() == 15  # the -1 values, ignored by default; blanks are zero
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(frame["split"]) == {"train", "valid", "test"}


@pytest.mark.parametrize("column, value, message", [
    ("gender", "X", "column 'gender': 'X', expected one of"),
    ("age_years", "forty", "column 'age_years': 'forty', expected a number"),
    ("partition", "holdout", "column 'partition': 'holdout', expected one of"),
    ("cardiomegaly", "2", "column 'cardiomegaly': '2', expected 1, 0, -1 or blank"),
    ("file_name", "../../etc/passwd.png", "leaves the dataset root"),
])
def test_in_house_csv_errors_name_row_and_column(tmp_path, in_house, capsys, column, value, message):
    frame = pd.read_csv(in_house / "export.csv", dtype=str, keep_default_na=False)
    frame.loc[4, column] = value
    frame.to_csv(in_house / "export.csv", index=False)
    config = tmp_path / "cfg.yaml"
    config.write_text("{}")
    sets = ["data.dataset=csv", f"data.root={in_house}", *_in_house_sets(in_house),
            f"output.target_dir={tmp_path / 'experiments'}"]
    assert main(["train", "--config", str(config), "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert message in err and ("row 6" in err or "leaves" in message)


def test_data_describe_counts_what_training_would_see(tmp_path, chexpert, capsys):
    import json

    config = tmp_path / "cfg.yaml"
    config.write_text("{}")
    sets = ["data.dataset=chexpert", f"data.root={chexpert}", "data.labels=[Cardiomegaly,Pleural Effusion]",
            f"output.target_dir={tmp_path / 'out'}"]
    assert main(["data", "describe", "--config", str(config), "--set", *sets]) == 0
    assert "100 images of 50 patients" in capsys.readouterr().out
    description = json.loads((tmp_path / "out" / "private" / "data_description" / "chexpert" / "description.json").read_text())
    raw = pd.concat([pd.read_csv(chexpert / "train.csv"), pd.read_csv(chexpert / "valid.csv")])
    frontal = raw[raw["Frontal/Lateral"] == "Frontal"]
    assert description["source_label_values"]["Cardiomegaly"] == {
        "uncertain": int((frontal["Cardiomegaly"] == -1).sum()), "blank": int(frontal["Cardiomegaly"].isna().sum())}
    splits = description["splits"]
    assert sum(s["images"] for s in splits.values()) == 100 and splits["test"]["images"] == 20
    assert sum(splits["test"]["view"].values()) == 20 and set(splits["train"]["view"]) <= {"AP", "PA"}
    positives = sum(s["labels"]["Cardiomegaly"]["positives"] for s in splits.values())
    assert positives == (frontal["Cardiomegaly"] == 1).sum()
    labelled = sum(s["labels"]["Cardiomegaly"]["labelled"] for s in splits.values())
    assert labelled == 100 - (frontal["Cardiomegaly"] == -1).sum()  # uncertain ignored by default
