"""The prediction report opened in a real browser (Debian's chromium, headless) at a laptop's width:
every figure decodes and is shown at its own size (so its text is as legible as it was drawn), nothing
overflows the page sideways, and the page opens with what was trained and its privacy statement."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from evaluation.bootstrap import bootstrap_intervals, resampling
from evaluation.fairness import fairness_report
from evaluation.report import page, prediction_sections
from Prediction_DP import add_intervals, split_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAPTOP = (1366, 768)
CHECK = """<script>window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({complete: i.complete, natural: i.naturalWidth, shown: i.width}));
  const firstHeading = document.querySelector('h2') ? document.querySelector('h2').textContent : '';
  const out = document.createElement('pre'); out.id = 'layout-check';
  out.textContent = JSON.stringify({images, firstHeading, scrollWidth: document.documentElement.scrollWidth,
                                    text: document.body.innerText.slice(0, 3000)});
  document.body.appendChild(out);
});</script></body>"""


def _report(tmp_path, labels):
    """A report of 8 labels and the study's age bins (the crowded case), from simulated patients."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(400), rng.integers(1, 4, 400))
    sex = np.array(["F", "M"])[rng.integers(0, 2, 400)][patients]
    age = rng.uniform(18, 95, 400)[patients]
    truth = (rng.random((len(patients), len(labels))) < 0.2).astype(float)
    scores = 1 / (1 + np.exp(-rng.normal(truth * 1.5 - 1, 1.0)))
    thresholds = dict.fromkeys(labels, 0.4)
    weights, units, info = resampling(patients, 200, 0, "patient")
    metrics = {"split": "test", "threshold_split": "valid", **split_metrics(truth, scores, labels, thresholds),
               "bootstrap": {**info, "method": "percentile"}}
    add_intervals(metrics, bootstrap_intervals(truth, scores, labels, thresholds, weights))
    fairness = fairness_report(truth, scores, labels, thresholds, sex, age, [0, 30, 60, 70, 80, 100], weights,
                               clusters=units, permutations=100)
    about = {"facts": {"model": "resnet9 (mish), 224 px", "privacy": "(8, 1e-06)-DP for each training patient"},
             "curves": {"valid/loss": [(10, 1.2), (20, 1.0)], "valid/auroc_mean": [(10, 0.7), (20, 0.8)],
                        "privacy/epsilon": [(10, 5.0), (20, 8.0)]}}
    path = tmp_path / "report.html"
    path.write_text(page("dp run: test split", prediction_sections(labels, truth, scores, metrics, fairness, about)))
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_is_legible_in_a_browser_at_laptop_width(tmp_path):
    labels = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion_right",
              "pleural_effusion_left", "pneumonia", "pneumothorax"]
    report = _report(tmp_path, labels)
    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("</body>", CHECK))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
               "--virtual-time-budget=10000"]
    dom = subprocess.run(command + ["--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    found = re.search(r'<pre id="layout-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">"))
    assert result["firstHeading"] == "Model, data and privacy" and "DP for each training patient" in result["text"]
    assert len(result["images"]) >= 4
    for image in result["images"]:  # decoded, and not shrunk to fit: its text shows at the size it was drawn
        assert image["complete"] and image["natural"] > 0 and image["shown"] >= 0.98 * image["natural"], image
    assert result["scrollWidth"] <= LAPTOP[0]  # no sideways scrolling
