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
from evaluation.calibration import subgroup_calibration
from evaluation.fairness import fairness_report, join_calibration
from evaluation.report import _subgroup_panels, page, plt, prediction_sections
from config import Evaluation
from Prediction_DP import add_intervals, split_calibration, split_metrics
from privacy.release import plain_statement

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAPTOP = (1366, 768)
CHECK = """<script>window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({complete: i.complete, natural: i.naturalWidth, shown: i.width}));
  const firstHeading = document.querySelector('h2') ? document.querySelector('h2').textContent : '';
  const lines = cell => { const range = document.createRange(); range.selectNodeContents(cell);
                          return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size; };
  const wrapped = [...document.querySelectorAll('table:not(.facts) td')].filter(c => lines(c) > 1)
                    .map(c => c.textContent);
  const wide = [...document.querySelectorAll('table')].filter(t => t.getBoundingClientRect().width >
                  t.parentElement.clientWidth + 1).map(t => t.rows[0].textContent.slice(0, 80));
  const out = document.createElement('pre'); out.id = 'layout-check';
  out.textContent = JSON.stringify({images, firstHeading, wrapped, wide, tables: document.querySelectorAll('table').length,
                                    scrollWidth: document.documentElement.scrollWidth, text: document.body.innerText});
  document.body.appendChild(out);
});</script></body>"""


LABELS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion_right", "pleural_effusion_left",
          "pneumonia", "pneumothorax"]


def _scored():
    """8 labels and the study's age bins (the crowded case) from simulated patients; the last label is
    scored at random (its AUROC interval includes 0.5) and the first has 3 positives under 30 (its
    AUROC there is not estimable)."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(400), rng.integers(1, 4, 400))
    sex = np.array(["F", "M"])[rng.integers(0, 2, 400)][patients]
    age = rng.uniform(18, 95, 400)[patients]
    truth = (rng.random((len(patients), len(LABELS))) < 0.2).astype(float)
    young = np.flatnonzero(age < 30)
    truth[young, 0] = 0
    truth[young[:3], 0] = 1
    scores = 1 / (1 + np.exp(-rng.normal(truth * 1.5 - 1, 1.0)))
    scores[:, -1] = rng.random(len(patients))
    risk = rng.uniform(0.05, 0.6, len(patients))  # cardiomegaly: true risks, scored over-confidently
    truth[:, 1] = rng.random(len(patients)) < risk
    scores[:, 1] = 1 / (1 + np.exp(-3 * np.log(risk / (1 - risk))))
    thresholds = dict.fromkeys(LABELS, 0.4)
    weights, units, info = resampling(patients, 200, 0, "patient")
    metrics = {"split": "test", "threshold_split": "valid", **split_metrics(truth, scores, LABELS, thresholds),
               "bootstrap": {**info, "method": "percentile"}}
    add_intervals(metrics, bootstrap_intervals(truth, scores, LABELS, thresholds, weights))
    fairness = fairness_report(truth, scores, LABELS, thresholds, sex, age, [0, 30, 60, 70, 80, 100], weights,
                               clusters=units, permutations=100)
    join_calibration(fairness, subgroup_calibration(truth, scores, LABELS, sex, age, [0, 30, 60, 70, 80, 100],
                                                    weights, clusters=units, permutations=100))
    return truth, scores, metrics, fairness, split_calibration(truth, scores, LABELS, weights, Evaluation())


@pytest.fixture(scope="module")
def scored():
    return _scored()


def _report(tmp_path, scored):
    truth, scores, metrics, fairness, calibration = scored
    about = {"facts": {"model": "resnet9 (mish), 224 px", "trained on": "about 3,000 patients",
                       "scored on": "830 images of 400 patients", "privacy": "(8, 1e-06)-DP for each training patient"},
             "guarantee": plain_statement(8.0, 1e-6), "private": True, "synthetic": True,
             "curves": {"valid/loss": [(10, 1.2), (20, 1.0)], "valid/auroc_mean": [(10, 0.7), (20, 0.8)],
                        "privacy/epsilon": [(10, 5.0), (20, 8.0)]}}
    path = tmp_path / "report.html"
    path.write_text(page("dp run: test split", prediction_sections(LABELS, truth, scores, metrics, fairness, about,
                                                                    calibration)))
    return path


def test_subgroup_panels_show_counts_reasons_and_whole_intervals(scored):
    """Each group's images (positives) under its name, the reason where AUROC is not estimable, and
    a y-axis that holds every interval (none cut by the axis)."""
    _, _, _, fairness, _ = scored
    fig = _subgroup_panels(fairness, "age", LABELS)
    first = fig.axes[0]
    young = fairness["subgroups"]["age"]["[0,30)"]["atelectasis"]
    assert young["positives"] == 3 and "not estimable" in young["metrics"]["auroc"]["reason"]
    assert [t.get_text() for t in first.texts] == ["too few positives"]
    assert first.get_xticklabels()[0].get_text() == f"[0,30)\n{young['n']}\n(3)"
    lows = [e["metrics"]["auroc"]["ci95"][0] for g in fairness["subgroups"]["age"].values() for e in g.values()
            if e.get("metrics", {}).get("auroc", {}).get("ci95")]
    assert min(lows) < 0.3  # the old fixed axis (0.3 to 1.02) would cut this interval
    for ax in fig.axes[:len(LABELS)]:
        bottom, top = ax.get_ylim()
        assert bottom < min(lows) and top >= 1.0
    plt.close(fig)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_is_legible_in_a_browser_at_laptop_width(tmp_path, scored):
    report = _report(tmp_path, scored)
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
    text = result["text"]
    assert result["firstHeading"] == "Summary"
    summary = text[text.index("Summary"):text.index("Model, data and privacy")]
    for words in ("Differentially private with epsilon 8", "Epsilon bounds", "mean AUROC 0.", "Not protected by this "
                  "guarantee: validation patients", "Research use only", "pneumothorax the AUROC interval is not above 0.5"):
        assert words in summary, words
    assert "pneumothorax †" in text and "atelectasis †" not in text  # the label at chance is flagged in the table
    calibration = text[text.index("\nCalibration\n"):text.index("\nDecision curves\n")]
    flagged = [line for line in calibration.splitlines() if "over-confident (slope < 1)" in line]
    assert len(flagged) == 1 and flagged[0].startswith("cardiomegaly"), flagged  # made over-confident on purpose
    assert any(line.startswith("pneumothorax") and "no useful ranking" in line for line in calibration.splitlines())
    by_group = text[text.index("\nCalibration by subgroup\n"):text.index("\nUnderdiagnosis and overdiagnosis\n")]
    assert "predicts by" in by_group and "chance (q" in by_group  # each gap read in words
    assert not re.search(r"-0\.0+(?![0-9]*[1-9])", text)  # no "-0.00"
    assert result["wrapped"] == []  # no table cell wraps
    assert result["wide"] == [] and result["tables"] >= 8  # no table is wider than the column (wide ones are cut)
    assert len(result["images"]) >= 4
    for image in result["images"]:  # decoded, and not shrunk to fit: its text shows at the size it was drawn
        assert image["complete"] and image["natural"] > 0 and image["shown"] >= 0.98 * image["natural"], image
    assert result["scrollWidth"] <= LAPTOP[0]  # no sideways scrolling; every table within the column
