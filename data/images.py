"""Decoding radiographs (PNG 8/16-bit, JPEG, DICOM) and the study's preprocessing to square uint8.

``preprocess`` is the single definition of what the network sees: the preprocessing cache stores its
output, and loading without a cache calls it per image, so both give the same pixels.

Preprocessing, for an image of height H and width W and output side S:

- grey values: 8-bit images are kept; deeper ones (16-bit PNG, DICOM) are min-max scaled to 0-255
  after the DICOM rescale/VOI transforms, MONOCHROME1 (white = low values) inverted first;
- ``fit="pad"``: scale by S / max(H, W), then pad the short side with black, centred;
  ``fit="crop"``: scale by S / min(H, W), then cut the centred S x S square;
- optional histogram equalisation (``cv2.equalizeHist``), as in the study.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DICOM_SUFFIXES = (".dcm", ".dicom")
PREPROCESS_VERSION = 1  # bump when ``preprocess`` changes, so preprocessing caches are rebuilt


@dataclass(frozen=True)
class Preprocessing:
    size: int
    fit: str = "pad"  # "pad" or "crop"
    equalize: bool = True


class BadImage(Exception):
    """An image that cannot be used; the message is the reason shown in the bad-image report."""


def decode(path: Path, size_hint: int | None = None) -> np.ndarray:
    """The image as a 2-D array (uint8, or wider for 16-bit/DICOM data); raises BadImage.

    ``size_hint`` lets JPEG decoding scale down by a power of two in the DCT (much faster for
    2-3k pixel radiographs) while staying at least that large on both sides.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImage("missing file")
    try:
        dicom = path.suffix.lower() in DICOM_SUFFIXES or _dicom_magic(path)
    except OSError as exc:  # e.g. no permission: a bad image, not a crash of prepare or training
        raise BadImage(f"unreadable file: {exc.strerror or exc}") from None
    if dicom:
        return _decode_dicom(path)
    try:
        with Image.open(path) as image:
            if size_hint and image.format == "JPEG":
                image.draft("L", (size_hint, size_hint))
            image.load()  # raises on truncated data, unlike cv2.imread
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(image)
            return np.asarray(image if image.mode == "L" else image.convert("L"))
    except Image.DecompressionBombError as exc:  # more pixels than any radiograph: refused before decoding
        raise BadImage(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise BadImage(f"unreadable image: {exc}") from None


def _dicom_magic(path: Path) -> bool:
    """A DICOM file by content ('DICM' after the 128-byte preamble): PACS exports and DICOMDIR trees
    often name their files without an extension."""
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _decode_dicom(path: Path) -> np.ndarray:
    """A DICOM file's one image, grey: modality LUT (rescale), VOI LUT (window) and MONOCHROME1
    inversion for grey images; colour (RGB, YBR_* converted to RGB by pydicom) and PALETTE COLOR
    (mapped through its palette) become grey like a colour PNG/JPEG does (:func:`_grey`). Refused with
    the reason: multi-frame files (with their frame count), a transfer syntax no installed decoder
    reads, truncated or otherwise broken pixel data (named)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for broken files
        raise BadImage(f"unreadable DICOM: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax = syntax.name if syntax is not None else "no transfer syntax"
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        raise BadImage(f"unreadable DICOM ({syntax}): NumberOfFrames {frames!r} is not a number") from None
    if frames > 1:
        raise BadImage(f"multi-frame DICOM: {frames} frames, expected one radiograph per file")
    if "PixelData" not in ds:
        raise BadImage(f"unreadable DICOM ({syntax}): no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # a missing decoder, truncated or damaged pixel data
        cause = " ".join(str(exc).split())[:240]
        raise BadImage(f"unreadable DICOM ({syntax}): {type(exc).__name__}: {cause}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        return _grey(apply_color_lut(pixels, ds))
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB, or YBR converted to RGB by pydicom
        return _grey(pixels)
    if pixels.ndim != 2:
        raise BadImage(f"DICOM pixel data has shape {pixels.shape} ({photometric}), expected one grey image")
    pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float32)
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Colour -> grey as the project reads a colour PNG/JPEG: ITU-R 601-2 luma, L = 0.299 R + 0.587 G +
    0.114 B (Pillow's ``convert("L")``, used as is for 8-bit data; the same weights for deeper data)."""
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit data unchanged; anything wider min-max scaled to 0-255."""
    if pixels.dtype == np.uint8:
        return pixels
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        raise BadImage("constant image (no contrast)")
    return np.rint((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def fit_square(image: np.ndarray, size: int, fit: str) -> np.ndarray:
    """Aspect-preserving resize to ``size`` x ``size`` by padding (black) or centre cropping."""
    h, w = image.shape
    scale = size / (max(h, w) if fit == "pad" else min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if fit == "pad":
        top, left = (size - nh) // 2, (size - nw) // 2
        return cv2.copyMakeBorder(image, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT, value=0)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def preprocess(root: Path, relative: str, prep: Preprocessing) -> np.ndarray:
    """``root / relative`` -> [S, S] uint8, as the network sees it (before augmentation). A path that
    leaves ``root`` through a symbolic link is refused: only the dataset's own files are read."""
    path = Path(root) / relative
    if not os.path.realpath(path).startswith(os.path.join(os.path.realpath(root), "")):
        raise BadImage(f"leaves the dataset root through a symbolic link (to {os.path.realpath(path)})")
    image = fit_square(to_uint8(decode(path, prep.size)), prep.size, prep.fit)
    return cv2.equalizeHist(image) if prep.equalize else image
