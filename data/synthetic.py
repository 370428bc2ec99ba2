"""Built-in synthetic chest-radiograph dataset, shaped like the study's hospital data (UKA-CXR).

Every image is a frontal (PA/AP) radiograph drawn from a small anatomical model: body outline and
shoulders, lung fields, mediastinum, spine, heart, aortic knob, diaphragm domes, posterior ribs,
clavicles, vascular markings and, for women, breast shadows. Findings are drawn where a radiologist
looks for them, on the patient's side (patient right = image left):

- cardiomegaly: wider cardiac silhouette (cardiothoracic ratio grows with the severity);
- congestion: perihilar haze and thickened vessels on both sides;
- pleural effusion: basal opacity with a meniscus rising laterally, blunting the costophrenic angle;
- pneumonic infiltrates: patchy opacities in the mid and lower zone;
- atelectasis: a plate-like band in the lower zone with volume loss (raised hemidiaphragm).

Truth and label are separate, as in a hospital. Each finding has a continuous true severity (0 = absent
... 1 = severe; most absent findings still show a minor change of no clinical weight), and that is what
is drawn, at low contrast, over normal variation of heart size, diaphragm height and vessel markings.
The label is a reader's study grade 1-4 (grades 3 and 4 positive; code 5 "not assessable" on a few
images): perceived severity = truth + Gaussian noise (``READER_NOISE``, per finding), graded by the
site's ``GRADE_THRESHOLDS``; a few findings are missed outright (``MISS_RATE``, more often when faint).
So readers disagree on borderline, grade-2-like findings and rarely on obvious ones.

Older patients carry more and heavier findings; sex changes body size, heart size and breast shadows;
AP films magnify the heart and are taken with less inspiration. The two sites differ as two hospitals
do: ``public`` (pretraining) is clean, mostly PA and centred; ``private`` has more AP bedside films,
another exposure (gamma), more quantum noise and detector blur, smaller off-centre framing, white
collimation margins, a lead side marker, anti-scatter grid stripes and its own reading team
(slightly lower thresholds).

The generator is deterministic: the same seed and sizes give the same CSV and the same pixels.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

LABELS = (
    "cardiomegaly",
    "congestion",
    "pleural_effusion_right",
    "pleural_effusion_left",
    "pneumonic_infiltrates_right",
    "pneumonic_infiltrates_left",
    "atelectasis_right",
    "atelectasis_left",
)
SITES = ("public", "private")
SPLIT_SHARES = {"train": 0.7, "valid": 0.1, "test": 0.2}
# The reader: perceived severity = true severity + N(0, READER_NOISE[finding]), graded 1-4 by these thresholds
# (below the first: 1, ...; at or above the last: 4), so grades 3-4 (positive) start at the middle one.
GRADE_THRESHOLDS = {"public": (0.14, 0.42, 0.72), "private": (0.12, 0.38, 0.70)}  # two reading teams
READER_NOISE = {"cardiomegaly": 0.09, "congestion": 0.13, "pleural_effusion": 0.08,
                "pneumonic_infiltrates": 0.11, "atelectasis": 0.12}
SUBCLINICAL = (0.7, 0.10)  # share of absent findings drawn as a minor change, and its mean severity
MISS_RATE = (0.03, 0.10)  # a finding overlooked (graded 1): 3% when obvious, up to 13% when faint
NOT_ASSESSABLE = 0.02  # code 5, whatever is drawn
# the name of the drawing and the labels in the docs' measured results: bump it when they change (the cache
# does not need it, it is keyed by the code itself: generator_fingerprint)
GENERATOR_VERSION = 5


@dataclass
class Case:
    """Everything needed to draw one radiograph; ``render`` is a pure function of it.

    ``severity`` is the truth that is drawn (0 = absent ... 1 = severe); ``grades`` is the reader's
    study grade of it (1-4, or 5), which is the label and plays no part in the drawing.
    """

    seed: int
    site: str
    sex: str  # "F" or "M"
    age: int
    view: str  # "PA" or "AP"
    body_width: float  # relative thorax width
    heart_width: float  # half-width of the normal heart, in image widths
    inspiration: float  # lung height factor (AP films are taken supine, with less inspiration)
    exposure: float  # gamma applied at the end
    noise: float  # std of quantum noise
    zoom: float  # framing (private site is framed smaller)
    shift: tuple = (0.0, 0.0)  # framing offset (x, y), in image widths
    blur: float = 1.0  # detector blur, relative to the public site's
    grid: float = 0.0  # amplitude of the anti-scatter grid's stripes
    collimation: tuple = (0.0, 0.0, 0.0, 0.0)  # unexposed (white) margins: left, right, top, bottom
    marker: tuple | None = None  # side marker (x, y) in the image, or None
    vessels: float = 1.0  # prominence of the normal vascular markings
    domes: tuple = (0.0, 0.0)  # normal variation of the right and left diaphragm height
    severity: dict = field(default_factory=dict)  # label -> true severity 0..1 (drawn)
    grades: dict = field(default_factory=dict)  # label -> reader's grade 1..5 (the label)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 1 (d < 0, inside) to 0 (d > 0, outside) over ``width``."""
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -30, 30)))


def _ellipse(xx, yy, cx, cy, ax, ay, edge=0.015):
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    return _soft((r - 1.0) * min(ax, ay), edge)


def _band(yy, curve, half_width, edge=0.006):
    return _soft(np.abs(yy - curve) - half_width, edge)


def render(case: Case, size: int) -> np.ndarray:
    """Draw ``case`` (its true severities, not its grades) as a ``size`` x ``size`` uint8 radiograph."""
    sev = {k: float(np.clip(case.severity.get(k, 0.0), 0.0, 1.0)) for k in LABELS}
    rng = np.random.default_rng([case.seed, 0])  # anatomy texture and noise
    g = np.linspace(0.0, 1.0, size, dtype=np.float32)
    # Framing: zoom < 1 shows the thorax smaller; shift moves it off centre.
    xx, yy = np.meshgrid((g - 0.5 - case.shift[0]) / case.zoom + 0.5, (g - 0.45 - case.shift[1]) / case.zoom + 0.45)
    bw = case.body_width

    # Body: neck, sloping shoulders, chest wall; soft tissue over air.
    half = np.where(yy < 0.12, 0.09, np.minimum(0.46 * bw, 0.09 + (yy - 0.12) * 3.0))
    body = _soft(np.abs(xx - 0.5) - half, 0.01) * _soft(-yy + 0.02, 0.01)
    img = 0.06 + 0.30 * body

    # Diaphragm domes (right higher because of the liver); atelectasis raises its side (volume loss).
    lung_cx = {"right": 0.5 - 0.17 * bw, "left": 0.5 + 0.17 * bw}
    lung_ax = 0.145 * bw
    dome_base = 0.50 + 0.28 * case.inspiration
    domes = {}
    for i, side in enumerate(("right", "left")):
        top = dome_base + case.domes[i] - (0.03 if side == "right" else 0.0) - 0.08 * sev[f"atelectasis_{side}"]
        domes[side] = top + 0.10 * ((xx - lung_cx[side]) / (1.6 * lung_ax)) ** 2

    # Lungs: ellipses cut by the domes; medial edges leave the mediastinum in between.
    lung = {}
    for side in ("right", "left"):
        ell = _ellipse(xx, yy, lung_cx[side], 0.25 + 0.5 * dome_base * 0.5, lung_ax, 0.36 * case.inspiration)
        lung[side] = ell * _soft(yy - domes[side], 0.008)
    lungs = lung["right"] + lung["left"]

    # Heart: an ellipse sitting on the left dome, mostly to the patient's left; AP views magnify it.
    heart_w = case.heart_width * (1.0 + 0.6 * sev["cardiomegaly"]) * (1.1 if case.view == "AP" else 1.0)
    heart = _ellipse(xx, yy, 0.5 + 0.3 * heart_w, dome_base - 0.15, heart_w, 0.15)
    heart = heart * _soft(yy - domes["left"] - 0.02, 0.01)
    aorta = _ellipse(xx, yy, 0.5 + 0.05, 0.30, 0.04, 0.035)
    lungs = lungs * (1.0 - heart) * (1.0 - aorta)
    img = img - 0.22 * lungs * body + 0.05 * heart

    # Spine with vertebral bodies, through the mediastinum.
    spine = _soft(np.abs(xx - 0.5) - 0.035, 0.006) * body
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * yy / 0.055)
    img = img + spine * (0.08 + 0.04 * vertebrae)

    # Posterior ribs: arcs falling laterally; bones are fainter in the elderly.
    bone = 0.06 * (1.15 - 0.35 * (case.age - 20) / 70.0)
    ribs = np.zeros_like(img)
    for side, sign in (("right", -1.0), ("left", 1.0)):
        lateral = np.clip(sign * (xx - 0.5), 0.0, None)
        on_side = _soft(-sign * (xx - 0.5) + 0.04, 0.01)
        for i in range(9):
            y0 = 0.16 + i * 0.065 * case.inspiration
            curve = y0 + 0.9 * lateral**2 + 0.05 * lateral
            ribs = np.maximum(ribs, _band(yy, curve, 0.011) * on_side)
    img = img + bone * ribs * body * (0.4 + 0.6 * lungs) * _soft(yy - dome_base - 0.06, 0.02)

    # Clavicles.
    for sign in (-1.0, 1.0):
        x0, y0, x1, y1 = 0.5 + sign * 0.04, 0.19, 0.5 + sign * 0.30 * bw, 0.13
        t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        d = np.hypot(xx - (x0 + t * (x1 - x0)), yy - (y0 + t * (y1 - y0)))
        img = img + 0.12 * _soft(d - 0.012, 0.004)

    # Breast shadows over the lower lung fields in women.
    if case.sex == "F":
        for side in ("right", "left"):
            img = img + 0.06 * _ellipse(xx, yy, lung_cx[side] + (0.05 if side == "left" else -0.05),
                                        dome_base - 0.02, 0.13 * bw, 0.09, edge=0.05)

    # Vascular markings: faint branching texture, denser near the hila; their prominence varies normally.
    hila = {s: (0.5 + (0.085 if s == "left" else -0.085) * bw, 0.44) for s in ("right", "left")}
    vessel_noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), size / 90)
    hilar = sum(np.exp(-(((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * 0.09**2))) for hx, hy in hila.values())
    vessels = np.clip(vessel_noise * 2.5, 0, None) * (0.3 + hilar)
    img = img + 0.02 * case.vessels * vessels * lungs

    # --- findings: contrast and extent grow with the true severity ------------------------------
    if sev["congestion"] > 0:  # perihilar haze ("bat wing") and engorged vessels, bilateral
        s = sev["congestion"]
        haze = sum(np.exp(-(((xx - hx) ** 2) / (2 * (0.05 + 0.03 * s) ** 2) + ((yy - hy) ** 2) / (2 * 0.10**2)))
                   for hx, hy in hila.values())
        img = img + s * (0.17 * haze + 0.06 * vessels) * lungs
    for side, sign in (("right", -1.0), ("left", 1.0)):
        s = sev[f"pleural_effusion_{side}"]
        if s > 0:  # fluid fills the base; meniscus rises towards the chest wall
            lateral = np.clip(sign * (xx - lung_cx[side]) / lung_ax + 1.0, 0.0, 2.0)
            level = domes[side] - 0.03 - 0.18 * s - 0.04 * s * lateral**2
            fluid = _soft(level - yy, 0.015) * lung[side]
            img = img + 0.26 * (0.4 + 0.6 * s) * fluid
        s = sev[f"pneumonic_infiltrates_{side}"]
        if s > 0:  # patchy, ill-defined opacities in the mid and lower zone
            frng = np.random.default_rng([case.seed, 1, sign > 0])
            patches = np.zeros_like(img)
            for _ in range(int(2 + 5 * s)):
                px = lung_cx[side] + frng.uniform(-0.7, 0.7) * lung_ax
                py = frng.uniform(0.42, 0.72) * (dome_base / 0.78)
                r = frng.uniform(0.025, 0.05)
                patches = patches + np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * r**2))
            mottle = cv2.GaussianBlur(frng.standard_normal((size, size)).astype(np.float32), (0, 0), size / 60)
            img = img + 0.32 * s * np.clip(patches, 0, 1.2) * (0.8 + 0.6 * mottle) * lung[side]
        s = sev[f"atelectasis_{side}"]
        if s > 0:  # plate-like band above the raised dome
            arng = np.random.default_rng([case.seed, 2, sign > 0])
            yb = domes[side] - arng.uniform(0.07, 0.11) + 0.08 * sign * (xx - lung_cx[side])
            img = img + 0.36 * (0.3 + 0.7 * s) * _band(yy, yb, 0.010 + 0.012 * s, 0.008) * lung[side]

    # Acquisition: side marker, collimation, grid stripes, detector blur, exposure (gamma), quantum noise, quantise.
    gx, gy = np.meshgrid(g, g)
    if case.marker is not None:  # a lead letter "L": a bright block with a dark stroke
        mx, my = case.marker
        block = _soft(np.maximum(np.abs(gx - mx), np.abs(gy - my)) - 0.035, 0.004)
        stem = _soft(np.maximum(np.abs(gx - mx + 0.012) - 0.006, np.abs(gy - my) - 0.022), 0.003)
        foot = _soft(np.maximum(np.abs(gx - mx + 0.001) - 0.017, np.abs(gy - my - 0.016) - 0.006), 0.003)
        img = np.maximum(img, 0.7 * block * (1.0 - 0.7 * np.maximum(stem, foot)))
    if any(case.collimation):  # the shutters leave unexposed (white) margins
        left, right, top, bottom = case.collimation
        field = _soft(left - gx, 0.004) * _soft(gx - 1 + right, 0.004) * _soft(top - gy, 0.004) \
            * _soft(gy - 1 + bottom, 0.004)
        img = img * field + 0.62 * (1.0 - field)
    if case.grid > 0:  # a stationary grid leaves fine vertical stripes
        img = img + case.grid * np.cos(2 * np.pi * 18.0 * gx)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), max(case.blur * size / 180.0, 0.5))
    img = np.clip(img, 0.0, 1.0) ** case.exposure
    img = img + case.noise * rng.standard_normal(img.shape).astype(np.float32)
    return (np.clip(img / 0.75, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _severities(rng: np.random.Generator, age: int, sex: str) -> dict:
    """True findings (0 = absent), more frequent and heavier with age; cardiac findings travel together.

    A present finding's severity is continuous: many are faint (the grade-2 zone), few are gross.
    """
    old = (age - 60) / 15.0

    def draw(p_present):
        if rng.random() < p_present:  # disease: anywhere from faint to gross
            return float(np.clip(rng.beta(1.4, 1.5) + 0.05 * old, 0.02, 1.0))
        if rng.random() < SUBCLINICAL[0]:  # no disease, but a minor change of no clinical weight
            return float(min(rng.exponential(SUBCLINICAL[1]), 0.6))
        return 0.0

    cardiac = 1 / (1 + np.exp(-(-1.2 + 0.7 * old + (0.2 if sex == "M" else 0.0))))
    sev = {"cardiomegaly": draw(cardiac)}
    sev["congestion"] = draw(0.15 + 0.35 * (sev["cardiomegaly"] > 0.4) + 0.05 * old)
    for side in ("right", "left"):
        base = 1 / (1 + np.exp(-(-1.6 + 0.5 * old)))
        sev[f"pleural_effusion_{side}"] = draw(min(0.9, base + 0.25 * (sev["congestion"] > 0.4)))
        sev[f"pneumonic_infiltrates_{side}"] = draw(1 / (1 + np.exp(-(-1.5 + 0.4 * old))))
        sev[f"atelectasis_{side}"] = draw(1 / (1 + np.exp(-(-1.7 + 0.4 * old))))
    return sev


def read_grades(rng: np.random.Generator, severity: dict, site: str) -> dict:
    """The reader's study grade of each finding: what a radiologist perceives, not the truth.

    Perception adds Gaussian noise to the true severity, then the site's thresholds grade it, so
    faint (borderline) findings are often called on the wrong side of positive and gross ones rarely;
    a few findings are missed outright (more often when faint), and a few are not assessable (5).
    """
    thresholds = GRADE_THRESHOLDS[site]
    grades = {}
    for label in LABELS:
        s = severity[label]
        noise = READER_NOISE[label.replace("_right", "").replace("_left", "")]
        perceived = s + noise * rng.standard_normal()
        missed = s > 0 and rng.random() < MISS_RATE[0] + MISS_RATE[1] * (1.0 - s)
        grade = 1 if missed else 1 + int(np.searchsorted(thresholds, perceived, side="right"))
        grades[label] = 5 if rng.random() < NOT_ASSESSABLE else grade
    return grades


def sample_patient_cases(rng: np.random.Generator, site: str, patient_seed: int) -> list[Case]:
    """One patient: fixed sex, age and anatomy; 1-3 images with their own findings and acquisition.

    The private site is another hospital: more AP (supine, bedside) films, other exposure, more noise
    and blur, smaller off-centre framing, collimation margins, a side marker and its own reading team.
    """
    sex = "F" if rng.random() < 0.45 else "M"
    age = int(np.clip(rng.normal(63, 16), 18, 95))
    body = rng.normal(1.0 if sex == "M" else 0.93, 0.04)
    heart = rng.normal(0.145 if sex == "M" else 0.135, 0.011) * (1 + 0.002 * (age - 60))
    vessels = rng.lognormal(0.0, 0.3)
    n_images = int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.10]))
    private = site == "private"
    cases = []
    for k in range(n_images):
        p_ap = (0.65 if age > 70 else 0.45) if private else (0.30 if age > 70 else 0.15)
        view = "AP" if rng.random() < p_ap else "PA"
        severity = _severities(rng, age, sex)
        if private:
            margins = rng.uniform(0.0, 0.08, 4) * (rng.random(4) < 0.6)
            marker = (float(rng.uniform(0.12, 0.2)), float(rng.uniform(0.1, 0.18)))
        else:
            margins, marker = np.zeros(4), None
        cases.append(Case(
            seed=int(patient_seed * 8 + k),
            site=site, sex=sex, age=age, view=view,
            body_width=float(np.clip(body, 0.82, 1.12)),
            heart_width=float(np.clip(heart, 0.11, 0.18)),
            inspiration=float(np.clip(rng.normal(0.94 if view == "AP" else 1.0, 0.04), 0.85, 1.1)),
            exposure=float(rng.normal(1.5, 0.15) if private else rng.normal(1.0, 0.06)),
            noise=float(rng.uniform(0.02, 0.04) if private else rng.uniform(0.015, 0.03)),
            zoom=float(rng.uniform(0.80, 0.92) if private else rng.uniform(0.96, 1.04)),
            shift=tuple(float(v) for v in rng.normal(0.0, 0.04 if private else 0.01, 2)),
            blur=float(rng.uniform(1.1, 1.4) if private else rng.uniform(0.9, 1.1)),
            grid=float(rng.uniform(0.015, 0.03) if private else 0.0),
            collimation=tuple(float(v) for v in margins),
            marker=marker,
            vessels=float(vessels),
            domes=tuple(float(v) for v in rng.normal(0.0, 0.015, 2)),
            severity=severity,
            grades=read_grades(rng, severity, site),
        ))
    return cases


def build_master_list(n_patients: dict, seed: int) -> tuple[pd.DataFrame, list[Case]]:
    """Sample patients per site and split them by patient (no patient in two splits).

    The table is the study's master list (``data.dataset: uka``), the image subset folder being the site.
    """
    rng = np.random.default_rng(seed)
    rows, cases = [], []
    pid = 0
    for site in SITES:
        for _ in range(n_patients[site]):
            pid += 1
            split = rng.choice(list(SPLIT_SHARES), p=list(SPLIT_SHARES.values()))
            for case in sample_patient_cases(rng, site, seed * 1_000_003 + pid):
                image_id = f"{site[:3]}_{pid:06d}_{len(cases) % 1000:03d}"
                rows.append({"image_id": image_id, "patient_id": f"P{pid:06d}", "split": split, "subset": site,
                             "site": site, "gender": case.sex, "age": case.age, "view": case.view,
                             **{label: case.grades[label] for label in LABELS}})
                cases.append(case)
    return pd.DataFrame(rows), cases


def _render_to_file(args):
    case, size, path = args
    cv2.imwrite(str(path), render(case, size), [cv2.IMWRITE_JPEG_QUALITY, 95])


def generator_fingerprint() -> str:
    """A digest of what decides the pictures and the grades: this module's code (comments and
    docstrings aside) and the values of its upper-case parameters, so that any change to the drawing
    selects another cache folder, with or without a ``GENERATOR_VERSION`` bump."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    parameters = {name: value for name, value in globals().items() if name.isupper()}
    return hashlib.sha1((ast.dump(tree) + json.dumps(parameters, sort_keys=True)).encode()).hexdigest()


def synthetic_folder(cache_dir: Path, size: int, n_patients: dict, seed: int) -> Path:
    """Where the dataset with these settings lives: one folder per fingerprint of the generator and
    the settings."""
    key = json.dumps({"generator": generator_fingerprint(), "size": size, "n": n_patients, "seed": seed},
                     sort_keys=True)
    return Path(cache_dir) / f"synthetic_{size}px_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def generate(cache_dir: Path, size: int, n_patients: dict, seed: int, workers: int | None = None) -> Path:
    """Write the study's layout, ``master_list.csv`` and ``UKA_preprocessed/<site>/<image_id>.jpg``
    (JPEG quality 95); reuse a complete earlier run.

    A ``done.json`` marker is written last, so an interrupted generation is redone, never half-used.
    """
    folder = synthetic_folder(cache_dir, size, n_patients, seed)
    if (folder / "done.json").exists():
        return folder
    frame, cases = build_master_list(n_patients, seed)
    for site in SITES:
        (folder / "UKA_preprocessed" / site).mkdir(parents=True, exist_ok=True)
    jobs = [(c, size, folder / "UKA_preprocessed" / c.site / f"{i}.jpg") for c, i in zip(cases, frame["image_id"])]
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    desc = f"Generating synthetic CXRs ({size}px) in {folder}"
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(tqdm(pool.map(_render_to_file, jobs, chunksize=64), total=len(jobs), desc=desc))
    else:
        for job in tqdm(jobs, desc=desc):
            _render_to_file(job)
    frame.to_csv(folder / "master_list.csv", index=False)
    (folder / "done.json").write_text(json.dumps({"images": len(frame), "seed": seed, "size": size,
                                                  "n_patients": n_patients, "version": GENERATOR_VERSION,
                                                  "generator": generator_fingerprint()}))
    return folder



def sample_sheet(path: Path, size: int = 160, seed: int = 7) -> None:
    """A labelled figure: each finding severe, then faint, on one patient; then random cases of both sites
    titled with the reader's positive calls (grades 3-4)."""
    import copy

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    base = sample_patient_cases(rng, "public", seed)[0]
    base.severity = {label: 0.0 for label in LABELS}
    tiles = [("no finding", render(base, size))]
    for label in LABELS:
        case = copy.deepcopy(base)
        case.severity[label] = 1.0
        tiles.append((f"{label}\n(severe)", render(case, size)))
    for label in ("cardiomegaly", "congestion", "pleural_effusion_right"):
        case = copy.deepcopy(base)
        case.severity[label] = 0.4
        tiles.append((f"{label}\n(borderline)", render(case, size)))
    for site in SITES:
        for case in [sample_patient_cases(rng, site, seed + k)[0] for k in range(4)]:
            found = [k for k, g in case.grades.items() if g in (3, 4)]
            tiles.append((f"{site}, {case.sex} {case.age}, {case.view}\nread: {', '.join(found) or 'negative'}",
                          render(case, size)))
    cols = 5
    fig, axes = plt.subplots(-(-len(tiles) // cols), cols, figsize=(3.2 * cols, 3.6 * -(-len(tiles) // cols)))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image) in zip(axes.flat, tiles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=56)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Draw a sheet of sample synthetic radiographs.")
    parser.add_argument("output", type=Path, help="PNG file to write")
    sample_sheet(parser.parse_args().output)
