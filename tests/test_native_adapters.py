"""Native layouts: MIMIC-CXR-JPG, PadChest and VinDr-CXR fixtures with their real headers and quirks."""
from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from config import InputError, validate
from data.adapters import read_mimic, read_padchest, read_vindr
from data.dataset import load_table
from main_2D_DP import main

MIMIC_METADATA = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                  "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                  "PatientOrientationCodeSequence_CodeMeaning")
MIMIC_LABELS = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,"
                "Support Devices")
MIMIC_SPLIT = "dicom_id,study_id,subject_id,split"
MIMIC_PATIENTS = "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod"
PADCHEST_HEADER = (",ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
                   "ViewPosition_DICOM,Projection,MethodProjection,Pediatric,Modality_DICOM,Manufacturer_DICOM,"
                   "PhotometricInterpretation_DICOM,PixelRepresentation_DICOM,PixelAspectRatio_DICOM,"
                   "SpatialResolution_DICOM,BitsStored_DICOM,WindowCenter_DICOM,WindowWidth_DICOM,Rows_DICOM,"
                   "Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,ExposureInuAs_DICOM,ExposureTime,"
                   "RelativeXRayExposure_DICOM,ReportID,Report,MethodLabel,Labels,Localizations,"
                   "LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS")
VINDR_FINDINGS = ("Aortic enlargement,Atelectasis,Calcification,Cardiomegaly,Clavicle fracture,Consolidation,Edema,"
                  "Emphysema,Enlarged PA,ILD,Infiltration,Lung Opacity,Lung cavity,Lung cyst,Mediastinal shift,"
                  "Nodule/Mass,Pleural effusion,Pleural thickening,Pneumothorax,Pulmonary fibrosis,Rib fracture,"
                  "Other lesion,COPD,Lung tumor,Pneumonia,Tuberculosis,Other diseases,No finding").split(",")


def write_dicom(path: Path, array: np.ndarray, photometric: str = "MONOCHROME2", sex: str | None = None,
                age: str | None = None, view: str | None = None) -> None:
    """A minimal digital X-ray DICOM file (12 of 16 bits stored), with the optional patient tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.Modality = "DX"
    ds.PatientID = path.stem[:16]
    for keyword, value in (("PatientSex", sex), ("PatientAge", age), ("ViewPosition", view)):
        if value is not None:
            setattr(ds, keyword, value)
    ds.set_pixel_data(array.astype(np.uint16), photometric_interpretation=photometric, bits_stored=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _data(dataset: str, root: Path, **data):
    return validate({"data": {"dataset": dataset, "root": str(root), **data}}).data


def _write(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt") if path.suffix == ".gz" else open(path, "w")) as f:
        f.write("\n".join([header, *rows]) + "\n")


def _assert_patient_disjoint(frame: pd.DataFrame) -> None:
    assert set(frame["split"]) <= {"train", "valid", "test"}
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------------------------

# subject, study, dicom_id, ViewPosition, StudyDate, ViewCodeSequence_CodeMeaning, split ('' = not in the split file)
MIMIC_IMAGES = [tuple(line.split(",")) for line in """\
10000032,50414267,02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,PA,21800506,postero-anterior,train
10000032,50414267,174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,LATERAL,21800506,lateral,train
10000032,53189527,2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,AP,21820101,antero-posterior,train
10000764,57375967,096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4,,21340517,antero-posterior,test
10000764,57375967,b79e55c3-735ce5ac-64412506-cdc9ea79-f1af521f,LL,21340517,left lateral,test
10001176,54684191,e5f2a8a9-4a0f5f38-61f6c1d3-0e7c1a44-1d0b3f1e,,21861019,,validate
10003400,59258269,8b5b2d8e-7c3a1f09-2e4d6a11-93c0b7f2-5a6e8d14,AP,21420315,antero-posterior,test
11000011,51178377,0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c,PA,21480808,postero-anterior,train
11000011,51178377,7a1c43f9-9f3a0e21-5c6b8d40-2e1f7a93-0b4c6d28,PA,21480808,postero-anterior,""".splitlines()]
# study -> values of (Cardiomegaly, Pleural Effusion, No Finding); study 54684191 has no label row
MIMIC_STUDY_LABELS = {"50414267": ("1.0", "-1.0", ""), "53189527": ("0.0", "1.0", ""), "57375967": ("", "", "1.0"),
                      "59258269": ("-1.0", "0.0", ""), "51178377": ("1.0", "", "")}


@pytest.fixture
def mimic(tmp_path):
    """MIMIC-CXR-JPG 2.0.0 as distributed (gzipped tables) plus a MIMIC-IV patients.csv.gz."""
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    meta = [f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,{date},213014.531,CHEST (PA AND LAT),"
            f"{meaning},Erect" for subject, study, dicom, view, date, meaning, _ in MIMIC_IMAGES]
    _write(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA, meta)
    studies = {(subject, study) for subject, study, *_ in MIMIC_IMAGES}
    for labeler, flip in (("chexpert", False), ("negbio", True)):
        rows = []
        for subject, study in sorted(studies):
            if study in MIMIC_STUDY_LABELS:
                cardio, effusion, normal = MIMIC_STUDY_LABELS[study]
                cardio = {"1.0": "0.0", "0.0": "1.0"}.get(cardio, cardio) if flip else cardio
                values = ["0.0", cardio, "", "", "", "", "", "", normal, effusion, "", "", "", "1.0"]
                rows.append(f"{subject},{study},{','.join(values)}")
        _write(root / f"mimic-cxr-2.0.0-{labeler}.csv.gz", MIMIC_LABELS, rows)
    _write(root / "mimic-cxr-2.0.0-split.csv.gz", MIMIC_SPLIT,
           [f"{dicom},{study},{subject},{split}" for subject, study, dicom, *_, split in MIMIC_IMAGES if split])
    _write(tmp_path / "mimic-iv" / "patients.csv.gz", MIMIC_PATIENTS,
           ["10000032,F,52,2180,2014 - 2016,2180-09-09", "10000764,M,91,2132,2014 - 2016,",
            "10003400,M,88,2137,2008 - 2010,", "11000011,F,30,2150,2017 - 2019,"])  # 10001176 is not in MIMIC-IV
    return root


def test_mimic_study_labels_views_splits_and_demographics(tmp_path, mimic):
    patients = str(tmp_path / "mimic-iv" / "patients.csv.gz")
    frame, native = read_mimic(mimic, _data("mimic", mimic, mimic={"patients_csv": patients}))
    assert native == tuple(MIMIC_LABELS.split(",")[2:])
    assert len(frame) == len(MIMIC_IMAGES)
    assert frame["path"][0] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert frame["image_id"].tolist() == [image[2] for image in MIMIC_IMAGES]
    assert frame["view"].tolist() == ["PA", "LATERAL", "AP", "AP", "LATERAL", "", "AP", "PA", "PA"]
    assert frame["split"].tolist() == ["train"] * 3 + ["test"] * 2 + ["valid", "test", "train", ""]
    assert frame["sex"].tolist() == ["F", "F", "F", "M", "M", "", "M", "F", "F"]
    # anchor_age + years since anchor_year; 91 (= over 89) stays 91, 88 + 5 years is capped at 91
    assert frame["age"].tolist()[:5] + frame["age"].tolist()[6:] == [52, 52, 54, 91, 91, 91, 28, 28]
    assert np.isnan(frame["age"][5])
    # labels are per study: both images of study 50414267 share them; study 54684191 is unlabelled
    assert frame["Cardiomegaly"].tolist()[:3] == [1, 1, 0] and frame["Pleural Effusion"][0] == -1
    assert frame.loc[5, list(native)].isna().all() and np.isnan(frame["Cardiomegaly"][3])
    negbio, _ = read_mimic(mimic, _data("mimic", mimic, mimic={"labeler": "negbio"}))
    assert negbio["Cardiomegaly"].tolist()[:3] == [0, 0, 1] and (negbio["sex"] == "").all()
    assert negbio["age"].isna().all()


def test_mimic_accepts_unpacked_tables_and_keeps_patients_in_one_split(tmp_path, mimic):
    for packed in mimic.glob("*.csv.gz"):
        with gzip.open(packed, "rb") as src, open(packed.with_suffix(""), "wb") as dst:
            shutil.copyfileobj(src, dst)
        packed.unlink()
    frame = load_table(_data("mimic", mimic, labels=["Cardiomegaly", "Pleural Effusion"]), seed=0).frame
    assert len(frame) == 7 and set(frame["view"]) == {"PA", "AP", ""}  # laterals dropped by default
    _assert_patient_disjoint(frame)
    assert frame["split"].tolist()[-1] == "train"  # the image missing from the split file follows its patient
    assert (frame["split"] == "valid").sum() == 1 and (frame["split"] == "test").sum() == 2


def test_mimic_input_errors(tmp_path, mimic):
    with pytest.raises(InputError, match=r"data.mimic.patients_csv: .*nowhere.csv not found"):
        read_mimic(mimic, _data("mimic", mimic, mimic={"patients_csv": "nowhere.csv"}))
    _write(mimic / "mimic-cxr-2.0.0-split.csv.gz", MIMIC_SPLIT,
           [f"{MIMIC_IMAGES[0][2]},50414267,10000032,train", f"{MIMIC_IMAGES[1][2]},50414267,10000032,holdout"])
    with pytest.raises(InputError, match=r"split.csv.gz: row 3, column 'split': 'holdout', expected one of"):
        read_mimic(mimic, _data("mimic", mimic))
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(InputError, match=r"mimic-cxr-2.0.0-split.csv.gz not found"):
        read_mimic(mimic, _data("mimic", mimic))


# --- PadChest ----------------------------------------------------------------------------------------------------

# PatientID, ImageDir, StudyDate_DICOM, PatientBirth, PatientSex_DICOM, Projection, Labels
PADCHEST_IMAGES = [
    ("839860488694292331637988235681460987", "0", "20150612", "1950.0", "F", "PA", "['normal']"),
    ("839860488694292331637988235681460987", "0", "20150612", "1950.0", "F", "L", "['normal']"),
    ("313572750430997347502932654319389875", "1", "20120103", "1930.0", "O", "AP_horizontal",
     "['pleural effusion', 'cardiomegaly']"),
    ("313572750430997347502932654319389875", "1", "20130201", "1930.0", "O", "AP",
     "['cardiomegaly', ' pleural effusion', '']"),
    ("266000154209458137426880488658931718", "54", "20091120", "", "M", "PA", "[]"),
    ("108264712648397442837593116217402640", "54", "20160707", "1970.0", "", "COSTAL", ""),
    ("172617298305446891066285337734219516", "0", "20101010", "1985.0", "M", "EXCLUDE", "['chronic changes']"),
] + [(f"{9000 + p}52941672438195028336501784", "2", "20140301", f"{1940 + p}.0", "MF"[p % 2], "PA",
      "['cardiomegaly']" if p % 3 == 0 else "['normal']") for p in range(12)]


def _padchest_rows(images) -> list[list[str]]:
    rows = []
    for i, (patient, folder, date, birth, sex, projection, labels) in enumerate(images):
        image = f"2168401113669640{i:04d}8339383415200903310_00-{i:03d}-160.png"
        rows.append([str(i), image, folder, date, f"2053668664013634823614867989{i:04d}", patient, birth, sex,
                     "POSTEROANTERIOR" if projection == "PA" else "", projection, "Manual review of DICOM fields", "No",
                     "CR", "PhilipsMedicalSystems", "MONOCHROME2", "0", "None", "0.139", "12", "2048", "4096", "2828",
                     "2320", "250", "5", "5000", "20", "None", str(4765777 + i), "sin hallazgos patologicos",
                     "Physician", labels, "[]", str([[labels]]), "[]", "[]"])
    return rows


@pytest.fixture
def padchest(tmp_path):
    """PadChest: the 36-column table with its unnamed index column and 16-bit PNGs in numbered folders."""
    root = tmp_path / "padchest"
    rows = _padchest_rows(PADCHEST_IMAGES)
    root.mkdir()
    with open(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "w", newline="") as f:
        f.write(PADCHEST_HEADER + "\n")
        csv.writer(f).writerows(rows)
    rng = np.random.default_rng(0)
    for row in rows:
        (root / row[2]).mkdir(exist_ok=True)
        cv2.imwrite(str(root / row[2] / row[1]), rng.integers(0, 65535, (40, 48), dtype=np.uint16))
    return root


def test_padchest_labels_demographics_and_views(padchest):
    frame, native = read_padchest(padchest, _data("padchest", padchest,
                                                  labels=["cardiomegaly", "pleural effusion", "normal"]))
    assert native == ("cardiomegaly", "chronic changes", "normal", "pleural effusion")
    assert len(frame) == len(PADCHEST_IMAGES) and (frame["split"] == "").all()
    assert all((padchest / p).is_file() for p in frame["path"])
    assert frame["path"][4].startswith("54/") and frame["image_id"][0] == frame["path"][0][2:-4]
    assert frame["view"].tolist()[:7] == ["PA", "LATERAL", "AP", "AP", "PA", "COSTAL", "EXCLUDE"]
    assert frame["sex"].tolist()[:7] == ["F", "F", "", "", "M", "", "M"]
    assert frame["age"].tolist()[:4] == [65, 65, 82, 83] and np.isnan(frame["age"][4])
    assert frame["patient_id"][0] == PADCHEST_IMAGES[0][0]
    labels = frame[["cardiomegaly", "pleural effusion", "normal"]]
    assert labels.iloc[0].tolist() == [0, 0, 1]
    assert labels.iloc[2].tolist() == labels.iloc[3].tolist() == [1, 1, 0]  # spaces and '' entries stripped
    assert labels.iloc[4:6].isna().all().all()  # '[]' and a blank cell: unlabelled
    assert labels.iloc[6].tolist() == [0, 0, 0]


def test_padchest_pipeline_and_file_name_fallback(padchest):
    (padchest / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").rename(
        padchest / "PADCHEST_chest_x_ray_images_labels_160K.csv")
    table = load_table(_data("padchest", padchest, labels=["cardiomegaly", "pleural_effusion"],
                             label_map={"pleural effusion": "pleural_effusion"}), seed=3)
    frame = table.frame
    assert len(frame) == len(PADCHEST_IMAGES) - 3  # lateral, COSTAL and EXCLUDE dropped
    _assert_patient_disjoint(frame)
    assert table.source_counts["pleural_effusion"] == {"uncertain": 0, "blank": 1}  # '[]' (the blank row is COSTAL)
    assert frame["pleural_effusion"].sum() == 2 and frame["cardiomegaly"].sum() == 6  # blank -> 0 by default
    shutil.copy(padchest / "PADCHEST_chest_x_ray_images_labels_160K.csv", padchest / "PADCHEST_copy.csv")
    with pytest.raises(InputError, match="several PadChest tables"):
        read_padchest(padchest, _data("padchest", padchest))


def test_padchest_malformed_labels_name_the_row(padchest):
    source = padchest / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    rows = _padchest_rows(PADCHEST_IMAGES)
    rows[2][-5] = "['pleural effusion', 'cardiomegaly'"
    with open(source, "w", newline="") as f:
        f.write(PADCHEST_HEADER + "\n")
        csv.writer(f).writerows(rows)
    with pytest.raises(InputError, match=r"row 4, column 'Labels': \"\['pleural effusion', 'cardiomegaly'\", "
                                         r"expected a list"):
        read_padchest(padchest, _data("padchest", padchest))
    source.unlink()
    with pytest.raises(InputError, match=r"PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz not found"):
        read_padchest(padchest, _data("padchest", padchest))


def _padchest_table(root: Path, rows: list[list[str]]) -> None:
    with open(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "w", newline="") as f:
        f.write(PADCHEST_HEADER + "\n")
        csv.writer(f).writerows(rows)


def test_two_images_of_one_stem_keep_their_own_ids(padchest, tmp_path, capsys):
    rows = _padchest_rows(PADCHEST_IMAGES)
    png, jpg = rows[8][1], rows[8][1].replace(".png", ".jpg")  # 05.png and 05.jpg in one folder
    cv2.imwrite(str(padchest / rows[9][2] / jpg), np.full((40, 48), 128, np.uint8))
    rows[9][1] = jpg
    _padchest_table(padchest, rows)
    frame = load_table(_data("padchest", padchest, labels=["cardiomegaly"]), seed=0, use_cache=False).frame
    assert frame["image_id"].is_unique and {png[:-4], jpg} <= set(frame["image_id"])
    # one ImageID in two folders: the reader's id (the file name without .png) names two files; refused
    # (exit 2, one line naming both), since predictions, comparisons and audits are matched by the id
    rows[9][1], rows[9][2] = png, "0"
    shutil.copy(padchest / rows[8][2] / png, padchest / "0" / png)
    _padchest_table(padchest, rows)
    config = tmp_path / "padchest.yaml"
    config.write_text(f"data:\n  dataset: padchest\n  root: {padchest}\n  labels: [cardiomegaly]\n"
                      f"  cache: {{dir: {tmp_path / 'cache'}}}\noutput: {{target_dir: {tmp_path / 'out'}}}\n")
    before = sorted(tmp_path.rglob("*"))
    assert main(["data", "describe", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"image id {png[:-4]!r} names two files" in err, err
    assert f"'0/{png}'" in err and f"'{rows[8][2]}/{png}'" in err, err
    assert sorted(tmp_path.rglob("*")) == before


# --- VinDr-CXR ---------------------------------------------------------------------------------------------------

VINDR_TRAIN = [f"{i:02d}0434271f63a053c4128a0ba6352c{i:02d}" for i in range(6)]
VINDR_TEST = [f"{i:02d}2dd0e7f5a1b8c3d6e9f0a1b2c3d4e5{i:02d}" for i in range(3)]
# training image -> finding -> the three readers' votes (all other findings 0)
VINDR_VOTES = {
    0: {"Cardiomegaly": (1, 1, 0), "Aortic enlargement": (1, 1, 1)},
    1: {"Cardiomegaly": (1, 0, 0), "No finding": (0, 1, 1)},
    2: {"No finding": (1, 1, 1)},
    3: {"Pleural effusion": (0, 1, 1), "Other diseases": (1, 0, 0)},
    4: {"No finding": (1, 1, 1)},
    5: {"No finding": (1, 1, 1)},
}
VINDR_CONSENSUS = [{"Cardiomegaly": 1, "Other diseases": 1}, {"No finding": 1}, {"Pleural effusion": 1}]


def _vindr_tables(root: Path, votes=VINDR_VOTES) -> None:
    def row(image, reader, positives):
        return ",".join([image, reader, *(str(positives.get(f, 0)) for f in VINDR_FINDINGS)])

    train = [row(VINDR_TRAIN[i], f"R{8 + r + 3 * (i % 2)}", {f: v[r] for f, v in findings.items()})
             for i, findings in votes.items() for r in range(3)]
    _write(root / "annotations" / "image_labels_train.csv", "image_id,rad_id," + ",".join(VINDR_FINDINGS), train)
    test_header = ",".join(["image_id", "rad_id", *VINDR_FINDINGS]).replace("Other diseases", "Other disease")
    _write(root / "annotations" / "image_labels_test.csv", test_header,
           [row(image, "R1", positives) for image, positives in zip(VINDR_TEST, VINDR_CONSENSUS)])


@pytest.fixture
def vindr(tmp_path):
    """VinDr-CXR 1.0.0: three readers per training image, consensus test labels, DICOM headers."""
    root = tmp_path / "vindr-cxr" / "1.0.0"
    _vindr_tables(root)
    rng = np.random.default_rng(0)
    headers = {f"train/{VINDR_TRAIN[0]}": dict(photometric="MONOCHROME1", sex="M", age="045Y"),
               f"train/{VINDR_TRAIN[1]}": dict(sex="F", age="062Y", view="PA"),
               f"train/{VINDR_TRAIN[2]}": {},  # no PatientSex / PatientAge
               f"train/{VINDR_TRAIN[3]}": dict(sex="O", age=""),
               f"train/{VINDR_TRAIN[4]}": dict(sex="M", age="018M"),  # train/VINDR_TRAIN[5]: file missing
               f"test/{VINDR_TEST[0]}": dict(sex="F", age="070Y"),
               f"test/{VINDR_TEST[1]}": dict(sex="M", age="033Y"), f"test/{VINDR_TEST[2]}": {}}
    for stem, tags in headers.items():
        write_dicom(root / f"{stem}.dicom", rng.integers(0, 4096, (16, 20)), **tags)
    return root


@pytest.mark.parametrize("vote, cardio, effusion, other", [
    ("majority", [1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]),
    ("any", [1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]),
])
def test_vindr_reader_votes_and_dicom_demographics(vindr, vote, cardio, effusion, other):
    frame, native = read_vindr(vindr, _data("vindr", vindr, reader_vote=vote))
    assert native == tuple(VINDR_FINDINGS)  # the test file's 'Other disease' harmonised
    assert len(frame) == 9 and frame["image_id"].tolist() == VINDR_TRAIN + VINDR_TEST
    assert frame["path"][0] == f"train/{VINDR_TRAIN[0]}.dicom" and frame["path"][6] == f"test/{VINDR_TEST[0]}.dicom"
    assert frame["split"].tolist() == [""] * 6 + ["test"] * 3
    assert frame["patient_id"].equals(frame["image_id"])
    assert frame["Cardiomegaly"].tolist() == cardio + [1, 0, 0]
    assert frame["Pleural effusion"].tolist() == effusion + [0, 0, 1]
    assert frame["Other diseases"].tolist() == other + [1, 0, 0]
    assert frame["No finding"].tolist() == [0, 1, 1, 0, 1, 1, 0, 1, 0]
    assert frame["sex"].tolist() == ["M", "F", "", "", "M", "", "F", "M", ""]
    age = frame["age"].tolist()
    assert age[:2] == [45, 62] and age[4] == 1.5 and age[6:8] == [70, 33]
    assert np.isnan([age[2], age[3], age[5], age[8]]).all()
    assert frame["view"].tolist() == ["", "PA"] + [""] * 7


def test_vindr_pipeline_and_bad_votes(vindr):
    frame = load_table(_data("vindr", vindr, labels=["Cardiomegaly", "Other diseases"]), seed=0).frame
    assert len(frame) == 9 and (frame["split"] == "test").sum() == 3
    _assert_patient_disjoint(frame)
    votes = {**VINDR_VOTES, 2: {"Cardiomegaly": (0, 2, 0)}}
    _vindr_tables(vindr, votes)
    with pytest.raises(InputError, match=r"image_labels_train.csv: row 9, column 'Cardiomegaly': '2', expected 0 or 1"):
        read_vindr(vindr, _data("vindr", vindr))
    _vindr_tables(vindr)
    (vindr / "annotations" / "image_labels_test.csv").unlink()
    with pytest.raises(InputError, match=r"image_labels_test.csv not found"):
        read_vindr(vindr, _data("vindr", vindr))
