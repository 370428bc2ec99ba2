"""DICOM as vendors write it: every image file pydicom ships (no download) decodes like pydicom's own
pixel_array after the project's rescale/VOI/MONOCHROME1 handling, or is a bad image whose reason
names the transfer syntax or the defect; colour becomes grey as a colour PNG does; multi-frame files
are refused with their frame count; prepare counts what it skipped per reason."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from data.images import BadImage, decode
from main_2D_DP import main

FOLDER = Path(pydicom.__file__).parent / "data" / "test_files"


def _survey() -> list[tuple[Path, pydicom.Dataset]]:
    """Every file of pydicom's test folder that is a DICOM dataset with pixel data."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(p for p in FOLDER.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # not DICOM (or not even a preamble): not an image file to decode
                continue
            if "PixelData" in ds and "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
                found.append((path, ds))
    return found


FILES = _survey()


def _frames(ds) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


GREY = [(p, ds) for p, ds in FILES if _frames(ds) == 1 and
        str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")]


def test_every_single_frame_grey_file_decodes_as_pydicom_or_is_refused_by_name():
    decoded, refused = set(), {}
    for path, ds in GREY:
        syntax = ds.file_meta.TransferSyntaxUID.name
        try:
            expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                expected = expected.max() - expected
        except Exception:
            expected = None
        try:
            pixels = decode(path)
        except BadImage as exc:
            assert expected is None, f"{path.name} ({syntax}) decodes in pydicom but was refused: {exc}"
            assert syntax in str(exc) or "truncated" in str(exc) or "less than expected" in str(exc), (path.name, exc)
            refused[path.name] = str(exc)
            continue
        assert expected is not None and np.array_equal(pixels, expected), path.name
        decoded.add(syntax)
    # the compressed syntaxes hospitals export decode (JPEG Lossless appears among the colour files below)
    for name in ("JPEG Extended (Process 2 and 4)", "JPEG-LS Lossless Image Compression",
                 "JPEG-LS Lossy (Near-Lossless) Image Compression", "JPEG 2000 Image Compression",
                 "JPEG 2000 Image Compression (Lossless Only)", "RLE Lossless", "Deflated Explicit VR Little Endian",
                 "Explicit VR Big Endian"):
        assert name in decoded, (name, sorted(decoded))
    assert len(GREY) >= 40 and len(refused) <= 4, refused  # a few files are broken on purpose


def test_colour_and_palette_files_become_grey_like_a_colour_png():
    colour = [(p, ds) for p, ds in FILES if _frames(ds) == 1 and ds.get("PhotometricInterpretation") in
              ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")]
    syntaxes = set()
    for path, ds in colour:
        try:
            rgb = ds.pixel_array
        except Exception:
            continue
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            indices, rgb = rgb, apply_color_lut(rgb, ds)
        grey = decode(path)
        assert grey.shape == rgb.shape[:2], path.name
        if rgb.dtype == np.uint8:  # exactly what Pillow does to a colour PNG
            assert np.array_equal(grey, np.asarray(Image.fromarray(rgb, "RGB").convert("L"))), path.name
        else:
            assert np.allclose(grey, rgb.astype(np.float64) @ [0.299, 0.587, 0.114], rtol=1e-5), path.name
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            assert not np.array_equal(grey, indices)  # mapped through the palette, never raw indices
        syntaxes.add(ds.file_meta.TransferSyntaxUID.name)
    assert any("JPEG Lossless" in s for s in syntaxes) and any("Baseline" in s for s in syntaxes), syntaxes


def test_multi_frame_files_are_refused_with_their_frame_count():
    multi = [(p, ds) for p, ds in FILES if _frames(ds) > 1]
    assert multi
    for path, ds in multi:
        with pytest.raises(BadImage, match=f"multi-frame DICOM: {_frames(ds)} frames"):
            decode(path)


def test_prepare_counts_what_it_skipped_per_reason(tmp_path, capsys):
    root = tmp_path / "site"
    (root / "img").mkdir(parents=True)
    rows = []
    picks = {"good": [p for p, ds in GREY if ds.file_meta.TransferSyntaxUID.name.startswith("JPEG-LS")][:2],
             "multi": [p for p, ds in FILES if _frames(ds) > 1][:3],
             "broken": [FOLDER / "MR_truncated.dcm"]}
    for kind, paths in picks.items():
        for k, source in enumerate(paths):
            name = f"img/{kind}{k}.dcm"
            shutil.copy(source, root / name)
            rows.append({"path": name, "patient_id": f"{kind}{k}", "sex": "F", "age": 50, "split": "train",
                         "cardiomegaly": 0})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  dataset: csv\n  root: {root}\n  image_size: 32\n  labels: [cardiomegaly]\n"
                      f"  cache: {{dir: {tmp_path / 'cache'}, max_bad_fraction: 1.0}}\n")
    assert main(["prepare", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "skipped, per reason" in out
    counts = dict(line.rsplit(None, 1) for line in out.split("skipped, per reason:\n")[1].splitlines()[1:5]
                  if line.strip() and line.rsplit(None, 1)[-1].isdigit())
    assert counts.get("multi-frame DICOM") == str(len(picks["multi"]))
    assert counts.get("unreadable DICOM (Explicit VR Little Endian)") == "1", out
