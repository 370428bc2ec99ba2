"""The preprocessing cache: same pixels as a direct load, resumable, bad images reported and left out."""
from __future__ import annotations


import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from config import validate
from data import cache as cache_module
from data.dataset import CXRDataset, cache_location, load_table, preprocessing
from data.images import BadImage, Preprocessing, decode, fit_square, preprocess, to_uint8
from main_2D_DP import main

SIZE = 32


def _picture(h: int, w: int, seed: int, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    ramp = np.linspace(0.1, 0.9, w)[None, :] * np.linspace(0.5, 1.0, h)[:, None]
    return np.clip((ramp + rng.normal(0, 0.05, (h, w))) * top, 0, top).astype(dtype)


@pytest.fixture
def mixed(tmp_path):
    """An in-house export pointing at every kind of image a hospital folder holds, and at broken ones."""
    root = tmp_path / "site"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(40):
        kind = ["png8", "png16", "jpg", "rgba"][i % 4]
        h, w = (30 + i, 40) if i % 2 else (48, 36)  # portrait and landscape, never square
        name = f"img/{i:03d}.{'jpg' if kind == 'jpg' else 'png'}"
        if kind == "png16":
            cv2.imwrite(str(root / name), _picture(h, w, i, np.uint16))
        elif kind == "rgba":
            cv2.imwrite(str(root / name), cv2.cvtColor(_picture(h, w, i), cv2.COLOR_GRAY2BGRA))
        else:
            cv2.imwrite(str(root / name), _picture(h, w, i))
        rows.append((name, f"p{i // 2}", int(i % 3 == 0)))
    good = (root / "img" / "001.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = (root / "img" / "002.jpg").read_bytes()
    (root / "img" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "img" / "notes.png").write_text("not an image")
    rows += [("img/truncated.png", "p90", 1), ("img/truncated.jpg", "p91", 0), ("img/notes.png", "p92", 0),
             ("img/missing.png", "p93", 1)]
    pd.DataFrame(rows, columns=["path", "patient_id", "cardiomegaly"]).to_csv(root / "labels.csv", index=False)
    return root


def _settings(root, tmp_path, **extra):
    data = {"dataset": "csv", "root": str(root), "image_size": SIZE, "labels": ["cardiomegaly"],
            "csv": {"sex": None, "age": None, "split": None}, "cache": {"dir": str(tmp_path / "cache"),
                                                                        "max_bad_fraction": 0.2}}
    for key, value in extra.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return data


def _config_file(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": data, "output": {"target_dir": str(tmp_path / "out")},
                                    "model": {"pretrained_checkpoint": None},
                                    "training": {"epochs": 1, "logical_batch_size": 8, "physical_batch_size": 4,
                                                 "device": "cpu"}, "experiment": {"name": "cached"}}))
    return str(path)


def test_prepare_reports_bad_images_and_caches_the_same_pixels(tmp_path, mixed, capsys):
    data = _settings(mixed, tmp_path)
    assert main(["prepare", "--config", _config_file(tmp_path, data)]) == 0
    out = capsys.readouterr().out
    assert "44 images" in out and "44 prepared now" in out and "4 bad (9.09%)" in out
    cfg = validate({"data": data}).data
    uncached = load_table(cfg, seed=0, use_cache=False)
    folder = cache_location(uncached, cfg)
    report = pd.read_csv(folder / "bad_images.csv").set_index("path")["reason"]
    assert report["img/missing.png"] == "missing file"
    assert {"img/truncated.png", "img/truncated.jpg", "img/notes.png"} <= set(report.index)
    assert all(report[p].startswith("unreadable image") for p in ["img/truncated.png", "img/truncated.jpg", "img/notes.png"])

    table = load_table(cfg, seed=0)  # the cache is found and the bad images are left out
    assert table.cache is not None and len(table.frame) == 40
    assert not table.frame["path"].isin(report.index).any()
    prep = preprocessing(cfg)
    cached = CXRDataset(table.frame, table.root, cfg.labels, prep, table.cache)
    direct = CXRDataset(table.frame, table.root, cfg.labels, prep)
    for i in range(len(table.frame)):
        assert torch_equal(cached[i][0], direct[i][0]), table.frame["path"][i]
        assert cached[i][0].shape == (1, SIZE, SIZE)
    assert len(np.unique(cached[0][0].numpy())) > 10  # real content, not an empty slot
    workers = DataLoader(cached, batch_size=8, num_workers=2)  # each worker maps the file itself
    assert torch_equal(torch.cat([x for x, _ in workers]), torch.stack([direct[i][0] for i in range(len(direct))]))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_too_many_bad_images_stop_prepare_and_training(tmp_path, mixed, capsys):
    data = _settings(mixed, tmp_path, cache={"max_bad_fraction": 0.05})
    config = _config_file(tmp_path, data)
    assert main(["prepare", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "4 of 44 images (9.1%) are missing or unreadable" in err and "bad_images.csv" in err
    assert main(["train", "--config", config]) == 2  # the finished cache is found; the same limit applies
    assert "max_bad_fraction" in capsys.readouterr().err


def test_interrupted_prepare_resumes_without_redoing_work(tmp_path, mixed, monkeypatch):
    data = validate({"data": _settings(mixed, tmp_path)}).data
    table = load_table(data, seed=0, use_cache=False)
    folder, paths, prep = cache_location(table, data), table.frame["path"].tolist(), preprocessing(data)
    monkeypatch.setattr(cache_module, "CHUNK", 4)
    calls = {"n": 0}

    def flaky(root, path, settings):
        calls["n"] += 1
        if calls["n"] == 23:
            raise KeyboardInterrupt
        return preprocess(root, path, settings)

    monkeypatch.setattr(cache_module, "preprocess", flaky)
    with pytest.raises(KeyboardInterrupt):
        cache_module.prepare(folder, "csv", table.root, paths, prep, workers=1, progress=False)
    assert cache_module.open_cache(folder) is None  # unfinished: training will not read it
    status = np.load(folder / "status.npy")
    assert (status != cache_module.TODO).sum() == 20  # five whole chunks were settled
    monkeypatch.setattr(cache_module, "preprocess", preprocess)
    result = cache_module.prepare(folder, "csv", table.root, paths, prep, workers=2, progress=False)
    assert (result.reused, result.prepared, len(result.bad)) == (20, 24, 4)
    images = np.load(folder / "images.npy")
    order = pd.read_csv(folder / "index.csv")["path"]
    for row, path in enumerate(order):
        if path not in set(result.bad["path"]):
            assert np.array_equal(images[row], preprocess(table.root, path, prep)), path
    again = cache_module.prepare(folder, "csv", table.root, paths, prep, workers=2, progress=False)
    assert (again.reused, again.prepared, len(again.bad)) == (44, 0, 4)


def test_changed_settings_select_another_cache(tmp_path, mixed):
    base = validate({"data": _settings(mixed, tmp_path)}).data
    table = load_table(base, seed=0, use_cache=False)
    folders = {cache_location(table, base)}
    for change in ({"fit": "crop"}, {"image_size": 40}, {"histogram_equalization": False}):
        folders.add(cache_location(table, base.model_copy(update=change)))
    fewer = table.frame.iloc[1:]
    folders.add(cache_module.cache_folder(tmp_path / "cache", "csv", table.root, fewer["path"].tolist(),
                                          preprocessing(base)))
    assert len(folders) == 5


def test_training_reads_the_cache(tmp_path, mixed):
    data = _settings(mixed, tmp_path)
    config = _config_file(tmp_path, data)
    assert main(["prepare", "--config", config]) == 0
    assert main(["train", "--config", config, "--set", "dp.enabled=false"]) == 0
    saved = yaml.safe_load((tmp_path / "out" / "cached" / "private" / "config.yaml").read_text())
    assert saved["derived"]["preprocessing_cache"].startswith(str(tmp_path / "cache"))
    assert sum(saved["derived"][f"n_{s}"] for s in ("train", "valid", "test")) == 40


def test_without_a_cache_a_bad_image_is_a_clear_error(tmp_path, mixed, capsys):
    config = _config_file(tmp_path, _settings(mixed, tmp_path))
    assert main(["train", "--config", config, "--set", "dp.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert "img/" in err and "prepare" in err


def test_fit_pads_or_crops_keeping_the_aspect():
    wide = np.full((10, 20), 200, np.uint8)
    padded = fit_square(wide, 8, "pad")
    assert padded.shape == (8, 8) and (padded[:2] == 0).all() and (padded[-2:] == 0).all()
    assert (padded[2:6] == 200).all()
    cropped = fit_square(np.hstack([np.zeros((10, 5), np.uint8), wide, np.zeros((10, 5), np.uint8)]), 10, "crop")
    assert cropped.shape == (10, 10) and (cropped == 200).all()  # the black margins are cut away


def test_wide_grey_values_are_min_max_scaled():
    deep = np.array([[1000, 3000], [2000, 1000]], np.uint16)
    assert to_uint8(deep).tolist() == [[0, 255], [128, 0]]
    eight = np.array([[3, 9]], np.uint8)
    assert to_uint8(eight) is eight  # 8-bit data is kept as it is
    with pytest.raises(BadImage, match="constant"):
        to_uint8(np.full((3, 3), 7, np.uint16))


def test_sixteen_bit_png_uses_its_full_depth(tmp_path):
    path = tmp_path / "deep.png"
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 16 + 20000)  # all in the top byte's 78..82
    cv2.imwrite(str(path), pixels)
    image = preprocess(path.parent, path.name, Preprocessing(8, "pad", equalize=False))
    assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) == 64


def test_dicom_monochrome1_is_inverted_and_uses_its_full_depth(tmp_path):
    from test_native_adapters import write_dicom

    pixels = _picture(20, 16, 3, np.uint16) >> 4  # 12 bits stored
    write_dicom(tmp_path / "normal.dicom", pixels)
    write_dicom(tmp_path / "inverted.dicom", pixels, photometric="MONOCHROME1")
    prep = Preprocessing(16, "crop", equalize=False)
    normal, inverted = preprocess(tmp_path, "normal.dicom", prep), preprocess(tmp_path, "inverted.dicom", prep)
    full = to_uint8(decode(tmp_path / "normal.dicom"))
    assert full.shape == (20, 16) and full.min() == 0 and full.max() == 255
    assert np.array_equal(normal, full[2:18])  # centre crop of an unscaled image
    assert np.abs(normal.astype(int) + inverted.astype(int) - 255).max() <= 1  # white is low in MONOCHROME1
    (tmp_path / "broken.dicom").write_bytes((tmp_path / "normal.dicom").read_bytes()[:300])
    with pytest.raises(BadImage, match="unreadable DICOM"):
        preprocess(tmp_path, "broken.dicom", prep)


def test_resume_is_refused_when_the_cache_changes_the_training_split(tmp_path, mixed, capsys):
    labels = pd.read_csv(mixed / "labels.csv")
    labels[labels["path"].str.match(r"img/\d+\.")].to_csv(mixed / "labels.csv", index=False)  # 40 good images
    config = _config_file(tmp_path, _settings(mixed, tmp_path, cache={"max_bad_fraction": 0.5}))
    assert main(["train", "--config", config, "--set", "dp.enabled=false"]) == 0  # decoded on the fly
    data = validate({"data": _settings(mixed, tmp_path)}).data
    train_image = load_table(data, seed=0).split("train")["path"][0]
    (mixed / train_image).write_bytes(b"")  # the file breaks after training started; prepare leaves it out
    assert main(["prepare", "--config", config]) == 0
    capsys.readouterr()
    assert main(["train", "--config", config, "--resume", "--set", "dp.enabled=false", "training.epochs=2"]) == 2
    assert "the training split now has" in capsys.readouterr().err
