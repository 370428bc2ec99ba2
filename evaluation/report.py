"""Self-contained HTML reports (figures embedded as PNG data URIs) for predict, audit, compare, sweep and transfer."""
from __future__ import annotations

import base64
import html
import io
import math

import matplotlib
import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from evaluation.bootstrap import format_p
from evaluation.calibration import GAP_DEFINITIONS, describe_map
from privacy.release import EPSILON_MEANING, not_covered

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Figures are drawn at most PAGE_WIDTH inches wide at DPI, so the page shows them at their own size (the
# content column is 1100 px) and 8-point text stays legible at 100% zoom on a laptop screen.
PAGE_WIDTH, DPI = 10.5, 100
# Table cells never wrap (a number split over two lines misreads); a table that would be wider than the
# 1100 px column is cut into several (:func:`_table`), by an estimate of its text's width at 13 px.
COLUMN_PX, FONT_PX, CELL_PX = 1100, 13, 16
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
td{white-space:nowrap}th{background:#f0f0f0}img{max-width:100%}.note{color:#555;font-size:13px}
table.facts td{white-space:normal;text-align:left}table.facts th{text-align:left}
.summary{border:2px solid #3d6a9e;background:#f3f7fb;border-radius:4px;padding:0.2em 1em;margin:1em 0}
.summary p{margin:0.5em 0}.warning{color:#8a1c1c;font-weight:bold}"""


def _figure(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def fixed(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals; one that rounds to zero has no minus sign (no "-0.00")."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return fixed(value) if isinstance(value, float) else str(value)


def _text_px(text: str, bold: bool = False) -> float:
    """``text``'s width at 13 px in a wide sans-serif (DejaVu Sans's advances in em, rounded up, plus 8%)."""
    em = sum(0.33 if c in ".,:;' il|" else 0.41 if c in "[]()-ftrj" else 1.0 if c in "mwMW%" else
             0.8 if c.isupper() else 0.64 for c in text)
    return em * FONT_PX * 1.08 * (1.1 if bold else 1.0)


def _table(frame: pd.DataFrame, keys: int = 1) -> str:
    """``frame`` as HTML tables no wider than the page's column: the value columns that do not fit go to
    further tables that repeat the first ``keys`` columns (rows with nothing in a part are left out)."""
    shown = frame.map(_cell) if len(frame) else frame.astype(str)
    def width(column) -> float:  # a header wraps between its words, a cell never
        return CELL_PX + max([_text_px(w, bold=True) for w in str(column).split()] +
                             [_text_px(v) for v in shown[column]])
    columns = list(shown.columns)
    parts, part, used = [], [], sum(width(c) for c in columns[:keys])
    for column in columns[keys:]:
        if part and used + width(column) > COLUMN_PX:
            parts.append(part)
            part, used = [], sum(width(c) for c in columns[:keys])
        part.append(column)
        used += width(column)
    parts.append(part)
    out = []
    for part in parts:
        rows = shown[part].ne("").any(axis=1) if part else slice(None)
        out.append(shown.loc[rows, columns[:keys] + part].to_html(index=False, border=0))
    return "".join(out)


def page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _panels(labels: list[str], height: float, **options):
    """A grid of one panel per label, four to a row, at the page's width."""
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PAGE_WIDTH / 4 * cols, height * rows), squeeze=False, **options)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    return fig, axes


def _roc_grid(truth: np.ndarray, curves: dict[str, np.ndarray], labels: list[str]):
    """One panel per label, one ROC curve per model."""
    fig, axes = _panels(labels, 2.7)
    for i, (ax, label) in enumerate(zip(axes.flat, labels)):
        keep = np.isfinite(truth[:, i].astype(np.float64))  # unlabelled images are left out
        y = truth[keep, i]
        for name, scores in curves.items():
            if len(np.unique(y)) == 2:
                fpr, tpr, _ = roc_curve(y, scores[keep, i])
                ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, scores[keep, i]):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(title=label, xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1))
        ax.title.set_fontsize(9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "not estimable:\none class only", ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def _not_estimable_reason(entry: dict, fairness: dict) -> str:
    """A short reason, fit for a figure, why a group's AUROC is not estimable."""
    if not entry.get("estimable"):
        return "group too small"
    if entry["positives"] < fairness["min_positives"]:
        return "too few positives"
    return "too few negatives"


def _subgroup_panels(fairness: dict, attribute: str, labels: list[str]):
    """One panel per label: AUROC with 95% interval per group, each group's images (positives) under
    its name, and the reason where a group is not estimable. The y-axis holds every interval."""
    groups = list(fairness["subgroups"][attribute])
    entries = {label: [fairness["subgroups"][attribute][g][label] for g in groups] for label in labels}
    aurocs = [e.get("metrics", {}).get("auroc", {}) for es in entries.values() for e in es]
    lows = [a["ci95"][0] for a in aurocs if a.get("value") is not None and a.get("ci95")]
    bottom = min([0.3] + [lo - 0.03 for lo in lows])
    fig, axes = _panels(labels, 3.1, sharey=True)
    for ax, label in zip(axes.flat, labels):
        for j, entry in enumerate(entries[label]):
            auroc = entry.get("metrics", {}).get("auroc", {})
            if auroc.get("value") is not None and auroc.get("ci95"):
                lo, hi = auroc["ci95"]
                ax.errorbar([j], [auroc["value"]], yerr=[[auroc["value"] - lo], [hi - auroc["value"]]], fmt="o",
                            capsize=3, ms=5, color="tab:blue")
            else:
                ax.text(j, 0.52, _not_estimable_reason(entry, fairness), ha="center", va="bottom", fontsize=7,
                        color="grey", rotation=90)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        names = [f"{g}\n{e['n']}\n({e['positives']})" for g, e in zip(groups, entries[label])]
        ax.set_xticks(range(len(groups)), names, fontsize=7 if len(groups) > 2 else 8)
        ax.set_title(label, fontsize=10)
        ax.set(xlim=(-0.6, len(groups) - 0.4), ylim=(bottom, 1.03))
        ax.tick_params(axis="y", labelsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("AUROC (95% CI)", fontsize=9)
    fig.suptitle(f"AUROC by {attribute}; under each group: its images (positives); dashed: chance", fontsize=10)
    fig.tight_layout()
    return fig


def threshold_source(metrics: dict) -> str:
    """Where the decision thresholds of a split's metrics came from, in words (and, for recalibrated
    scores, that they are mapped alike)."""
    return _threshold_origin(metrics) + (", each mapped by the calibration map as the scores are (the same images "
                                         "are positive)" if metrics.get("recalibration") else "")


def _threshold_origin(metrics: dict) -> str:
    if metrics.get("thresholds_optimistic"):
        return f"thresholds by Youden's J on the {metrics['split']} split itself (optimistic)"
    if metrics["threshold_split"] == "bundle":
        return "thresholds of the release bundle (Youden's J on its experiment's validation split)"
    if metrics["threshold_split"] == "experiment valid":
        return "the model's own thresholds (Youden's J on its experiment's validation split)"
    if metrics["threshold_split"].startswith("external "):
        return (f"thresholds recalibrated by Youden's J on this dataset's {metrics['threshold_split'][9:]} split "
                f"(whose images are not scored)")
    return f"thresholds by Youden's J on the {metrics['threshold_split']} split"


def value_ci(entry: dict | None, digits: int = 3) -> str:
    """'value [low, high]' of a metric entry; 'not estimable (reason)' without a value."""
    if not entry or entry.get("value") is None:
        reason = (entry or {}).get("reason") or (entry or {}).get("note") or ""
        return f"not estimable ({reason.removeprefix('not estimable: ')})" if reason and reason != "not estimable" \
            else "not estimable"
    ci = entry.get("ci95")
    return fixed(entry["value"], digits) + (f" [{fixed(ci[0], digits)}, {fixed(ci[1], digits)}]" if ci else "")


def _curves_figure(curves: dict[str, list[tuple[int, float]]]):
    """Validation loss, validation mean AUROC and epsilon spent over training steps."""
    titles = {"valid/loss": ("validation loss", "loss"), "valid/auroc_mean": ("validation mean AUROC", "mean AUROC"),
              "privacy/epsilon": ("privacy spent", "epsilon")}
    shown = [tag for tag in titles if curves.get(tag)]
    fig, axes = plt.subplots(1, len(shown), figsize=(PAGE_WIDTH / 3 * len(shown), 2.8), squeeze=False)
    for ax, tag in zip(axes[0], shown):
        steps, values = zip(*curves[tag])
        ax.plot(steps, values, "o-", ms=3)
        ax.set(xlabel="optimizer step", ylabel=titles[tag][1], title=titles[tag][0])
    fig.tight_layout()
    return fig


def chance_labels(metrics: dict) -> list[str]:
    """Labels whose AUROC interval is not above 0.5 (it includes 0.5, or lies below): not shown to do
    better than chance on this split."""
    return [label for label, m in metrics["labels"].items() if (ci := m.get("ci95", {}).get("auroc")) and ci[0] <= 0.5]


def summary_section(about: dict, metrics: dict) -> tuple[str, str]:
    """What a clinician reads first: model, data, the guarantee in words, the headline result, who is
    not protected, and "research use only" where the data is synthetic."""
    facts, boot = about["facts"], metrics.get("bootstrap")
    mean = value_ci({"value": metrics["auroc_mean"], "ci95": metrics.get("auroc_mean_ci95")}
                    if np.isfinite(metrics["auroc_mean"]) else None)
    flagged = chance_labels(metrics)
    lines = [("Model", facts["model"]),
             ("Data", (f"{facts['dataset']}: " if "dataset" in facts else "")
                      + f"trained on {facts['trained on']}; scored on {facts['scored on']}"),
             ("Privacy", about["guarantee"] + (f" {EPSILON_MEANING}" if about["private"] else "")),
             ("Result", f"mean AUROC {mean} over {len(metrics['labels'])} labels"
                        + (" (95% interval from resampled patients)" if boot and boot["unit"] == "patient" else "")
                        + (f"; for {', '.join(flagged)} the AUROC interval is not above 0.5: not shown to do "
                           f"better than chance (marked † below)" if flagged else "") + ".")]
    body = "".join(f"<p><b>{name}.</b> {html.escape(text)}</p>" for name, text in lines)
    if about["private"]:
        covered = not_covered(bool(metrics.get("recalibration")))
        body += f"<p class='warning'>Not protected by this guarantee: {html.escape('; '.join(covered))}.</p>"
    if about["synthetic"]:
        body += ("<p class='warning'>Research use only: the images are synthetic (DP-CXR's built-in generator); "
                 "these figures show that the pipeline works, not how a model performs on patients.</p>")
    return "Summary", f"<div class='summary'>{body}</div>"


def about_section(about: dict) -> tuple[str, str]:
    """What was trained on what, the privacy statement and the training curves."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in about["facts"].items())
    content = f"<table class='facts'>{rows}</table>"
    if about.get("curves"):
        content += (_figure(_curves_figure(about["curves"])) +
                    "<p class='note'>The training loss is not shown: computed on the training patients without "
                    "noise, it is not covered by the privacy guarantee (it stays in the experiment's private/ "
                    "folder, in TensorBoard).</p>")
    return "Model, data and privacy", content


def _metric_name(name: str) -> str:
    metric, _, group = name.partition(":")
    return metric.replace("_", " ") + (f" ({group})" if group else "")


def _fairness_tables(fairness: dict, labels: list[str]) -> str:
    """Label-averaged fairness with intervals and p/q-values, definitions, then each label's values (one
    table per attribute, a row per label)."""
    mean_rows, per_label = [], ""
    for attribute, fair in fairness["fairness"].items():
        for name, entry in fair["mean"].items():
            if name in GAP_DEFINITIONS:  # the calibration gaps have their own section
                continue
            mean_rows.append({"attribute": attribute, "metric": _metric_name(name),
                              "mean over labels [95% CI]": value_ci(entry), "labels": entry["labels"],
                              "p (permutation)": format_p(entry.get("p_value")), "q (BH)": format_p(entry.get("q_value"))})
        names = list(dict.fromkeys(n for e in fair["labels"].values() for n in e["metrics"] if n not in GAP_DEFINITIONS))
        rows = [{"label": label, **{_metric_name(name): value_ci(fair["labels"][label]["metrics"].get(name), 2)
                                    for name in names}} for label in labels if label in fair["labels"]]
        per_label += f"<h4>By {html.escape(attribute)}</h4>" + _table(pd.DataFrame(rows))
    definitions = "".join(f"<li><b>{html.escape(k.replace('_', ' '))}</b>: {html.escape(v)}</li>"
                          for k, v in fairness["definitions"].items() if k not in GAP_DEFINITIONS)
    multiplicity = fairness.get("multiplicity", {})
    calibrated = " (the calibration gaps' among them)" if fairness.get("calibration", {}).get("bins") else ""
    note = (f"<p class='note'>p: share of {fairness['permutations']} shuffles of the patients' group labels (same "
            f"predictions) whose gap is at least the observed one: a gap with a large p is what random groups also "
            f"produce, not a finding. q: Benjamini-Hochberg over the {multiplicity.get('tests', 0)} p-values of this "
            f"report{calibrated}; unadjusted p-values are exploratory. Groups below {fairness['min_subgroup_size']} "
            f"images, groups without positives or negatives (rates), and groups with fewer than "
            f"{fairness['min_positives']} positives or {fairness['min_negatives']} negatives (AUROC) are left out.</p>"
            f"<ul class='note'>{definitions}</ul>")
    return note + _table(pd.DataFrame(mean_rows), keys=2) + "<h3>Per label</h3>" + per_label


def _calibration_group_panels(fairness: dict, attribute: str, labels: list[str]):
    """One panel per label: each group's calibration-in-the-large and ECE with 95% intervals, its
    labelled images (positives) under its name, and "group too small" where it is not estimable."""
    groups = list(fairness["subgroups"][attribute])
    entries = {label: [fairness["subgroups"][attribute][g][label] for g in groups] for label in labels}
    shown = {"calibration_in_the_large": ("o", "tab:blue", -0.12), "ece": ("s", "tab:orange", 0.12)}
    ends = [end for es in entries.values() for e in es for name in shown
            for end in (e.get("metrics", {}).get(name, {}).get("ci95") or [])]
    fig, axes = _panels(labels, 3.1, sharey=True)
    for ax, label in zip(axes.flat, labels):
        for j, entry in enumerate(entries[label]):
            if not entry["estimable"]:
                ax.text(j, 0.5, _not_estimable_reason(entry, fairness), ha="center", va="center", fontsize=7,
                        color="grey", rotation=90, transform=ax.get_xaxis_transform())
                continue
            for name, (marker, color, offset) in shown.items():
                metric = entry["metrics"][name]
                if metric["value"] is not None:
                    lo, hi = metric["ci95"] or (metric["value"], metric["value"])
                    ax.errorbar([j + offset], [metric["value"]], yerr=[[metric["value"] - lo], [hi - metric["value"]]],
                                fmt=marker, capsize=3, ms=5, color=color)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        names = [f"{g}\n{e['n']}\n({e['positives']})" for g, e in zip(groups, entries[label])]
        ax.set_xticks(range(len(groups)), names, fontsize=7 if len(groups) > 2 else 8)
        ax.set_title(label, fontsize=10)
        ax.set(xlim=(-0.6, len(groups) - 0.4), ylim=(min([-0.05] + [e - 0.02 for e in ends]),
                                                      max([0.1] + [e + 0.02 for e in ends])))
        ax.tick_params(axis="y", labelsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("probability scale (95% CI)", fontsize=9)
    handles = [matplotlib.lines.Line2D([], [], marker=marker, color=color, ls="")
               for marker, color, _ in shown.values()]
    fig.legend(handles, ["calibration-in-the-large (mean predicted - observed)", "ECE"], loc="lower center",
               ncol=2, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(f"Calibration by {attribute}; under each group: its labelled images (positives); dashed: 0",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _calibration_gap_reading(name: str, entry: dict, values: dict[str, float]) -> str:
    """The groups at both ends of a calibration gap (``values``: group -> its value; none for a mean)
    and whether the gap is beyond what random groups give (its q-value below 0.05)."""
    q = entry.get("q_value")
    if q is None:  # not estimable, or no permutations
        return ""
    shown = format_p(q)
    verdict = f"{'beyond' if q < 0.05 else 'within'} chance (q {'' if shown.startswith('<') else '= '}{shown})"
    if not values:
        return verdict
    ends = [max(values, key=values.get), min(values, key=values.get)]
    if name == "ece_gap":
        return f"ECE {', '.join(f'{g} {fixed(values[g], 2)}' for g in ends)}: {verdict}"
    said, before = [], None
    for g in ends:  # "F over-predicts by 0.20, M by 0.05", the direction said once when it is shared
        direction = "over" if values[g] > 0 else "under"
        said.append(f"{g} {direction + '-predicts ' if direction != before else ''}by {fixed(abs(values[g]), 2)}")
        before = direction
    return f"{', '.join(said)}: {verdict}"


def subgroup_calibration_section(fairness: dict, labels: list[str]) -> str:
    """Per attribute: each label's calibration gaps (and their mean over labels) with interval, p, q and
    a reading, and each group's calibration with intervals in a figure."""
    calibration = fairness["calibration"]
    if calibration["bins"] is None:
        return f"<p class='note'>{html.escape(calibration['reason'])}.</p>"
    definitions = "".join(f"<li><b>{html.escape(k.replace('_', ' '))}</b>: {html.escape(v)}</li>"
                          for k, v in GAP_DEFINITIONS.items())
    content = (f"<p class='note'>Is the model as well calibrated for one group as for another? Per group: "
               f"calibration-in-the-large, the mean predicted probability minus the observed fraction of positives "
               f"(0 = calibrated in the large; above 0 the model over-predicts for that group), and the ECE over each "
               f"label's {calibration['bins']} equal-mass bins of all scored images (the same bins for every group). "
               f"Gaps: the highest minus the lowest group, over the groups of at least {fairness['min_subgroup_size']} "
               f"labelled images (smaller ones: 'group too small'), with the fairness gaps' simultaneous band, "
               f"permutation p and Benjamini-Hochberg q (over every test of the fairness section). A smaller group's "
               f"ECE is noisier and biased up; the permutation reference keeps group sizes, so that alone is not "
               f"read as a gap.</p><ul class='note'>{definitions}</ul>")
    for attribute, fair in fairness["fairness"].items():
        rows = []
        for label in [*labels, "mean"]:
            metrics = fair["mean"] if label == "mean" else fair["labels"][label]["metrics"]
            compared = [] if label == "mean" else fair["labels"][label]["groups"]["size"]
            for name in GAP_DEFINITIONS:
                if name not in metrics:
                    continue
                metric = name.removesuffix("_gap")
                values = {g: v for g in compared if (v := fairness["subgroups"][attribute][g][label]["metrics"]
                                                     .get(metric, {}).get("value")) is not None}
                rows.append({"label": label, "gap": "ECE" if metric == "ece" else _metric_name(metric),
                             "value [95% CI]": value_ci(metrics[name]),
                             "groups": f"{len(values)} of {len(fairness['subgroups'][attribute])}" if compared else "",
                             "p (permutation)": format_p(metrics[name].get("p_value")),
                             "q (BH)": format_p(metrics[name].get("q_value")),
                             "reading": _calibration_gap_reading(name, metrics[name], values)})
        content += f"<h4>By {html.escape(attribute)}</h4>"
        content += _table(pd.DataFrame(rows), keys=2) if rows else "<p class='note'>No gap: fewer than 2 groups.</p>"
        content += _figure(_calibration_group_panels(fairness, attribute, labels))
    return content


def _diagnosis_note(fairness: dict) -> str:
    """Under/overdiagnosis in words, for the definition the fairness report used."""
    no_finding = fairness.get("no_finding")
    whole = (f"an image is abnormal when its '{no_finding}' label is negative, and the model calls it normal when its "
             f"'{no_finding}' output reaches that label's threshold (Seyyed-Kalantari et al., 2021)" if no_finding else
             "there is no 'No Finding' label, so the model's labels are combined: an image is abnormal when any of "
             "them is positive and normal when all are negative (images with a missing label and no positive one are "
             "left out), and the model calls an image abnormal when any label's score reaches its threshold. "
             "Findings outside these labels are invisible here: 'normal' means normal for these labels only")
    return (f"<p class='note'>Each image is judged as a whole: {html.escape(whole)}. Underdiagnosis: the share of "
            f"abnormal images the model calls normal (a patient with a finding who would be missed); overdiagnosis: "
            f"the share of normal images it calls abnormal. Gap: the highest minus the lowest group.</p>")


def _diagnosis_table(fairness: dict) -> str:
    rows, gaps = [], []
    for attribute, diagnosis in fairness["underdiagnosis"].items():
        for group, entry in diagnosis["groups"].items():
            rows.append({"attribute": attribute, "group": group, "abnormal images": entry["abnormal"],
                         "underdiagnosis [95% CI]": value_ci(entry["underdiagnosis"]), "normal images": entry["normal"],
                         "overdiagnosis [95% CI]": value_ci(entry["overdiagnosis"])})
        for name, entry in diagnosis["gaps"].items():
            gaps.append({"attribute": attribute, "gap": name.replace("_", " "), "value [95% CI]": value_ci(entry),
                         "p (permutation)": format_p(entry.get("p_value")), "q (BH)": format_p(entry.get("q_value"))})
    return (_diagnosis_note(fairness) + _table(pd.DataFrame(rows), keys=2)
            + (_table(pd.DataFrame(gaps), keys=2) if gaps else ""))


def _reliability_grid(calibration: dict, labels: list[str], before: dict | None = None):
    """Observed fraction (Wilson 95% interval) against mean predicted probability per equal-mass bin,
    each bin's image count beside its point, and the diagonal of perfect calibration; with ``before``
    (the calibration of the scores before recalibration), its bins too, as grey open circles."""
    fig, axes = _panels(labels, 2.9)
    for ax, label in zip(axes.flat, labels):
        reliability = calibration["labels"][label]["reliability"]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        shown = [(before["labels"][label]["reliability"], "grey", "none")] if before else []
        for bins, color, face in [*shown, (reliability, "tab:blue", "tab:blue")]:
            for b in (bins or {}).get("bins", []):
                lo, hi = b["observed_ci95"] or (b["observed"], b["observed"])
                ax.errorbar([b["mean_predicted"]], [b["observed"]], yerr=[[b["observed"] - lo], [hi - b["observed"]]],
                            fmt="o", ms=4, capsize=2, color=color, mfc=face)
        for b in (reliability or {}).get("bins", []):
            ax.annotate(str(b["n"]), (b["mean_predicted"], b["observed"]), textcoords="offset points", xytext=(4, -9),
                        fontsize=7, color="dimgrey")
        if not reliability:
            ax.text(0.5, 0.5, "no labelled images", ha="center", va="center", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="predicted probability", ylabel="observed fraction")
        ax.set_title(label, fontsize=10)
    fig.suptitle("Reliability: observed fraction (95% CI) per equal-mass bin, images per bin beside each point; "
                 "dashed: perfect calibration" + ("; grey open circles: before recalibration" if before else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def _decision_grid(curves: dict, labels: list[str]):
    """Net benefit of the model (with its 95% band), of treating all and of treating none, against the
    threshold probability."""
    fig, axes = _panels(labels, 2.9)
    for ax, label in zip(axes.flat, labels):
        curve = curves[label]
        t = np.array(curve["thresholds"])
        model = np.array(curve["model"]["value"], dtype=float)
        band = [ci for ci in curve["model"]["ci95"]]
        if all(ci is not None for ci in band):
            low, high = np.array(band, dtype=float).T
            ax.fill_between(t, low, high, color="tab:blue", alpha=0.2, lw=0)
        else:
            low = high = model
        ax.plot(t, model, color="tab:blue", label="model")
        ax.plot(t, curve["treat_all"]["value"], color="tab:orange", lw=1, label="treat all")
        ax.axhline(0, color="black", lw=0.8, label="treat none")
        prevalence = curve["prevalence"] or 0.0
        ax.set(xlim=(0, 1), ylim=(min(-0.05, np.nanmin(low) - 0.01), max(prevalence, np.nanmax(high)) + 0.03),
               xlabel="threshold probability", ylabel="net benefit")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def _calibration_reading(entries: dict) -> str:
    """Words for what the intervals show: over- or under-confident, over- or under-predicting."""
    words = []
    slope, oe = entries.get("slope") or {}, entries.get("observed_expected") or {}
    if slope.get("ci95") and slope["ci95"][1] <= 0:
        words.append("no useful ranking (slope <= 0)")
    elif slope.get("ci95") and slope["ci95"][1] < 1:
        words.append("over-confident (slope < 1)")
    elif slope.get("ci95") and slope["ci95"][0] > 1:
        words.append("under-confident (slope > 1)")
    if oe.get("ci95") and oe["ci95"][0] > 1:
        words.append("under-predicts (O/E > 1)")
    elif oe.get("ci95") and oe["ci95"][1] < 1:
        words.append("over-predicts (O/E < 1)")
    return "; ".join(words)


CALIBRATION_COLUMNS = {"brier": "Brier", "ece": "ECE", "observed_expected": "O/E", "intercept": "intercept",
                       "slope": "slope"}


def _calibration_table(report: dict, maps: dict | None = None) -> str:
    """Per label and averaged: each calibration metric with its interval and a reading; with ``maps``
    (recalibrated scores), each label's map."""
    rows = [{"label": label, "images": str(entry["n"]), "positives": str(entry["positives"]),
             **({"map": _map_words(maps[label])} if maps else {}),
             **{shown: value_ci(entry["metrics"].get(name)) for name, shown in CALIBRATION_COLUMNS.items()},
             "reading": _calibration_reading(entry["metrics"])} for label, entry in report["labels"].items()]
    rows.append({**dict.fromkeys(rows[0], ""), "label": "mean",
                 **{shown: value_ci(report["mean"].get(name)) for name, shown in CALIBRATION_COLUMNS.items()}})
    return _table(pd.DataFrame(rows))


def _map_words(m: dict) -> str:
    if m["method"] == "temperature":
        return f"T = {m['temperature']:.3g}"
    return f"a = {m['a']:.3g}, b = {m['b']:.3g}" if m["method"] == "platt" else "identity"


def calibration_sections(calibration: dict, labels: list[str]) -> list[tuple[str, str]]:
    """Calibration per label with intervals and in words, reliability diagrams, decision curves; of
    recalibrated scores (``calibration`` has 'uncalibrated'), the map and the calibration before it too."""
    report, before = calibration["calibration"], calibration.get("uncalibrated")
    stored = calibration.get("recalibration")
    note = (f"<p class='note'>Does a predicted 0.3 mean that 30% of such images have the finding? Brier: mean squared "
            f"error of the probabilities (0 is best). ECE: over {report['bins']} equal-mass bins of each label's "
            f"scores, the share-weighted gap between mean predicted and observed (0 = calibrated; its interval is a "
            f"band that can reach 0). O/E: observed over expected positives (1 = calibrated in the large; above 1 "
            f"the model under-predicts). Calibration intercept (0 ideal) and slope (1 ideal; below 1 the "
            f"probabilities are too extreme: over-confident). Intervals: 95%, the same patient resamples as the "
            f"metrics. DP-SGD and the positive-class loss weights both shift probabilities: read AUROC for ranking, "
            f"these for the probabilities themselves.</p>")
    if before:
        kept = [f"{label}: {m['reason']}" for label, m in stored["labels"].items() if m["method"] == "identity"]
        mapped = (f"Recalibrated: {describe_map(stored)}. The validation patients are not protected "
                  f"by the DP guarantee (they also chose the checkpoint and the thresholds); the map costs no privacy. "
                  f"It is fixed here, as thresholds are: the intervals leave out its own noise. Each map is strictly "
                  f"increasing (T: logit(p) / T; a, b: a logit(p) + b), so AUROC and the thresholded metrics are those "
                  f"of the model's own probabilities." + (f" Left unchanged: {'; '.join(kept)}." if kept else ""))
        content = (note + f"<p class='note'>{html.escape(mapped)}</p><p><b>After recalibration</b></p>"
                   + _calibration_table(report, stored["labels"])
                   + "<p><b>Before recalibration</b> (the model's own probabilities)</p>"
                   + _calibration_table(before["calibration"]))
    else:
        content = note + _calibration_table(report)
    curves_note = ("<p class='note'>Net benefit (Vickers & Elkin 2006) of acting on the images whose probability "
                   "reaches a threshold: true positives minus false positives weighted by the odds of the threshold, "
                   "per image; against treating every image (orange) or none (0). A model is useful at the "
                   "thresholds where its curve (95% band) lies above both." + (
                       " Of the recalibrated probabilities." if before else "") + "</p>")
    return [("Calibration", content + _figure(_reliability_grid(report, labels, before and before["calibration"]))),
            ("Decision curves", curves_note + _figure(_decision_grid(calibration["decision_curves"], labels)))]


def prediction_sections(labels: list[str], truth: np.ndarray, scores: np.ndarray, metrics: dict,
                        fairness: dict, about: dict | None = None,
                        calibration: dict | None = None) -> list[tuple[str, str]]:
    """The report of a scored split: summary and facts (with ``about``), metrics, ROC curves, calibration
    and decision curves (with ``calibration``), subgroup AUROC, fairness, under/overdiagnosis."""
    names = ("auroc", "sensitivity", "specificity", "precision", "f1", "accuracy")
    flagged = chance_labels(metrics)
    rows = []
    for label, m in metrics["labels"].items():
        ci = m.get("ci95", {})
        row = {"label": label + (" †" if label in flagged else ""), "images": str(m["n"]),
               "positives": str(m["positives"])}
        for name in names:
            row[name.upper() if name in ("auroc", "f1") else name] = value_ci({"value": m[name], "ci95": ci.get(name)}
                                                                              if np.isfinite(m[name]) else None)
        rows.append({**row, "threshold": fixed(m["threshold"])})
    rows.append({**dict.fromkeys(rows[0], ""), "label": "mean",
                 "AUROC": value_ci({"value": metrics["auroc_mean"], "ci95": metrics.get("auroc_mean_ci95")})})
    n = metrics["labels"][labels[0]]["n"]
    boot = metrics.get("bootstrap")
    intervals = (f"Intervals: 95%, from {boot['resamples']} bootstrap resamples of the {boot['units']} {boot['unit']}s "
                 f"(percentile; Wilson's score interval for a proportion with fewer than 10 events or non-events, "
                 f"see ci_method in the JSON)." if boot else "No intervals (evaluation.bootstrap = 0).")
    chance = (" †: the AUROC's 95% interval is not above 0.5 (it includes 0.5 or lies below), so on this split the "
              "model is not shown to do better than chance for that label." if flagged else "")
    note = (f"<p class='note'>{n} images of the {metrics['split']} split; {threshold_source(metrics)}. "
            f"{intervals}{chance}</p>")
    sections = [summary_section(about, metrics), about_section(about)] if about else []
    return sections + [
        ("Metrics", note + _table(pd.DataFrame(rows))),
        ("ROC curves", _figure(_roc_grid(truth, {"model": scores}, labels))),
        *(calibration_sections(calibration, labels) if calibration else []),
        ("Subgroup AUROC by sex", _figure(_subgroup_panels(fairness, "sex", labels))),
        ("Subgroup AUROC by age", _figure(_subgroup_panels(fairness, "age", labels))),
        ("Fairness", _fairness_tables(fairness, labels)),
        *([("Calibration by subgroup", subgroup_calibration_section(fairness, labels))] if "calibration" in fairness
          else []),
        ("Underdiagnosis and overdiagnosis", _diagnosis_table(fairness)),
    ]


def _with_interval(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """``name`` and its interval columns -> one 'value [low, high]' text column per metric."""
    out = table.drop(columns=[c for n in names for c in (f"{n}_ci95_low", f"{n}_ci95_high")])
    for name in names:
        out[name] = [value_ci(None if v is None or not np.isfinite(v) else
                              {"value": v, "ci95": [lo, hi] if lo is not None and np.isfinite(lo) else None})
                     for v, lo, hi in zip(table[name], table[f"{name}_ci95_low"], table[f"{name}_ci95_high"])]
    return out


def _attack_roc(scores: pd.DataFrame, attacks: list[str]):
    """ROC of each attack, on linear and on log-log axes (the low-FPR regime that matters)."""
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 4.2))
    for attack in attacks:
        keep = np.isfinite(scores[attack].to_numpy(float))
        member, score = scores["member"].to_numpy()[keep], scores[attack].to_numpy(float)[keep]
        fpr, tpr, _ = roc_curve(member, score)
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{attack} (AUROC {roc_auc_score(member, score):.3f})")
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([1e-4, 1], [1e-4, 1], color="grey", lw=0.8, ls="--", label="chance")
        ax.set(xscale=scale, yscale=scale, xlabel="false positive rate (non-members called members)",
               ylabel="true positive rate (members found)", title=f"Membership attack ROC ({scale} axes)")
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set(xlim=(0, 1), ylim=(0, 1))
    axes[1].set(xlim=(1e-3, 1), ylim=(1e-3, 1))
    fig.tight_layout()
    return fig


def _attack_subgroups(audit: dict):
    """Attack AUROC with 95% interval per sex and age group, one series per attack."""
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    attacks = list(audit["attacks"])
    for ax, attribute in zip(axes, ("sex", "age")):
        for j, attack in enumerate(attacks):
            groups = audit["attacks"][attack]["subgroups"][attribute]
            xs, ys, lo, hi = [], [], [], []
            for i, entry in enumerate(groups.values()):
                if not entry["estimable"] and j == 0:
                    ax.text(i, 0.5, "too few\nimages", ha="center", va="bottom", fontsize=8, color="grey")
                if entry["estimable"] and entry["auroc"]["ci95"]:
                    xs.append(i + (j - (len(attacks) - 1) / 2) * 0.25)
                    ys.append(entry["auroc"]["value"])
                    lo.append(ys[-1] - entry["auroc"]["ci95"][0])
                    hi.append(entry["auroc"]["ci95"][1] - ys[-1])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, ms=4, label=attack)
        ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(ylabel="attack AUROC (95% CI)", title=f"Membership exposure by {attribute}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _canary_figure(bound: dict, accounted: float | None, canaries: pd.DataFrame):
    """The lower bound beside the accounted epsilon, and the canary scores by coin."""
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.4))
    names = ["empirical lower bound\n(95% confidence)", "accounted epsilon"]
    values = [bound["epsilon_lower_bound"], accounted if accounted is not None else np.nan]
    bars = axes[0].barh(names, [v if np.isfinite(v) else 0 for v in values], color=["tab:red", "tab:blue"])
    for bar, value in zip(bars, values):
        text = f"{value:.3f}" if np.isfinite(value) else "none (non-private)"
        axes[0].text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center", fontsize=8)
    axes[0].set(xlabel="epsilon", title="Privacy spent: proven vs accounted")
    axes[0].set_xlim(0, max([v for v in values if np.isfinite(v)] + [0.1]) * 1.35)
    bins = np.histogram_bin_edges(canaries["score"], bins=20)  # shared, so the two coins compare bar by bar
    for coin, name in ((1, "trained on (coin 1)"), (0, "left out (coin 0)")):
        axes[1].hist(canaries.loc[canaries["included"] == coin, "score"], bins=bins, alpha=0.6, label=name)
    axes[1].set(xlabel="attack score (minus loss on the flipped labels)", ylabel="canaries",
                title="Canary scores by coin")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def audit_sections(audit: dict, table: pd.DataFrame, scores: pd.DataFrame,
                   canaries: pd.DataFrame | None) -> list[tuple[str, str]]:
    """Report sections of a privacy audit: attack metrics, ROC, subgroup exposure, canary bound."""
    metrics = ["auroc"] + [c for c in table.columns if c.startswith("tpr_at_fpr_") and not c.endswith(("low", "high"))]
    note = (f"<p class='note'>{audit['members']} training images (members) against {audit['nonmembers']} test "
            f"images of other patients (non-members); model of epoch {audit['checkpoint_epoch']}. "
            f"AUROC 0.5 = the attack learns nothing. Intervals: 95% percentile bootstrap over "
            f"{audit['bootstrap']['unit']}s. "
            f"{audit['attacks_note']}</p>")
    sections = [("Membership inference", note + _table(_with_interval(table, metrics))),
                ("Membership attack ROC", _figure(_attack_roc(scores, list(audit["attacks"])))),
                ("Membership exposure by subgroup", _figure(_attack_subgroups(audit)))]
    bound = audit.get("canaries")
    if bound and canaries is not None:
        accounted = audit["dp"]["epsilon_spent"]
        verdict = (f"The audit proves epsilon >= {bound['epsilon_lower_bound']:.3f} at 95% confidence "
                   f"(delta {bound['delta']:g}); the accountant reports {accounted:.3f}." if accounted is not None
                   else f"The audit proves epsilon >= {bound['epsilon_lower_bound']:.3f} at 95% confidence "
                        f"(delta {bound['delta']:g}) for this non-private model.")
        note = (f"<p class='note'>{bound['canaries']} canaries (whole training patients, the labels of all their "
                f"images flipped), {bound['included']} trained on by their coin; a canary's score is the mean over "
                f"its images. Best of {len(bound['grid'])} guess counts ({bound['guesses']} guesses, "
                f"{bound['correct']} right), Bonferroni-corrected. {verdict}</p>")
        sections.append(("One-run epsilon lower bound (canaries)",
                         note + _table(pd.DataFrame(bound["grid"])) +
                         _figure(_canary_figure(bound, accounted, canaries))))
    return sections


COMPARISON_COLUMNS = {"label": "label", "auroc_a": "AUROC A", "auroc_b": "AUROC B",
                      "difference": "difference A - B [95% CI]", "p_bootstrap": "p (paired bootstrap)",
                      "p_holm": "p (Holm-adjusted over labels)",
                      "p_a_not_better": "share of resamples with A not better",
                      "p_delong": "p (DeLong, clustered by patient)",
                      "p_delong_image_level": "p (DeLong, images taken as independent)",
                      "brier_a": "Brier A", "brier_b": "Brier B", "brier_difference": "Brier A - B [95% CI]",
                      "ece_a": "ECE A", "ece_b": "ECE B", "ece_difference": "ECE A - B [95% CI]"}


def comparison_report(title: str, labels: list[str], truth: np.ndarray, scores_a: np.ndarray,
                      scores_b: np.ndarray, table: pd.DataFrame, calibration: pd.DataFrame, bins: int,
                      who: dict[str, str]) -> str:
    """Which model is A and which B (name and privacy), the paired AUROC differences in words, a forest
    plot, the paired Brier and ECE differences (``calibration``: label, brier_* and ece_* columns of
    comparison.csv) and both models' ROC curves."""
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(table) + 1))
    y = np.arange(len(table))[::-1]
    diff = table["difference"].to_numpy(float)
    lo, hi = table["ci95_low"].to_numpy(float), table["ci95_high"].to_numpy(float)
    ax.errorbar(diff, y, xerr=[diff - lo, hi - diff], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, table["label"], fontsize=8)
    ax.set(xlabel="AUROC difference A - B (95% CI)", title="Paired AUROC differences")
    shown = table.assign(difference=[value_ci({"value": d, "ci95": [l, h] if np.isfinite(l) else None})
                                     for d, l, h in zip(diff, lo, hi)]).drop(columns=["ci95_low", "ci95_high"])
    for column in [c for c in table.columns if c.startswith("p_")]:
        shown[column] = [format_p(v) for v in table[column]]
    models = "".join(f"<p><b>{name}</b> = {html.escape(text)}</p>" for name, text in who.items())
    note = ("<p class='note'>Primary endpoint: the mean AUROC difference A - B, with the same resampled patients "
            "for both models (paired bootstrap). Per-label differences are secondary: their p-values are "
            "Holm-adjusted across the labels; DeLong's test (clustered by patient, Obuchowski) and its version that "
            "takes a patient's images as independent are unadjusted references; the share of resamples in which A "
            "is not better than B is the study's one-sided p-value.</p>")
    calibrated = calibration.copy()
    for name in ("brier", "ece"):
        calibrated[f"{name}_difference"] = [
            value_ci({"value": d if np.isfinite(d) else None, "ci95": [lo, hi] if np.isfinite(lo) else None}, 4)
            for d, lo, hi in calibration[[f"{name}_difference", f"{name}_ci95_low", f"{name}_ci95_high"]]
            .to_numpy(float)]
    calibrated = calibrated.drop(columns=[c for c in calibration if c.endswith(("_ci95_low", "_ci95_high"))])
    calibration_note = (
        f"<p class='note'>Brier score and expected calibration error (ECE, {bins} equal-mass bins of each model's "
        f"own scores) of A minus B, on the same images and resampled patients as the AUROC (paired): below 0, A's "
        f"probabilities are closer to the outcomes (Brier) or better calibrated (ECE). Percentile intervals of the "
        f"paired differences; an ECE is biased up by noise, about equally for both models, so its difference's "
        f"interval is approximate. Descriptive: intervals only, no p-values, outside the AUROC endpoints. Labels "
        f"with too few positive or negative images are not estimable, as in each model's own calibration "
        f"results.</p>")
    return page(title, [
        ("The two models", f"<div class='summary'>{models}</div>"),
        ("AUROC differences", note + _table(shown.rename(columns=COMPARISON_COLUMNS))),
        ("Forest plot", _figure(fig)),
        ("Calibration differences", calibration_note + _table(calibrated.rename(columns=COMPARISON_COLUMNS))),
        ("ROC curves", _figure(_roc_grid(truth, {"A": scores_a, "B": scores_b}, labels))),
    ])


def _epsilon_axis(ax, epsilons) -> None:
    """Log-scaled epsilon axis with the budgets themselves as plain-number ticks."""
    ax.set_xscale("log")
    ax.set_xticks(list(epsilons), [f"{e:g}" for e in epsilons])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("target epsilon (log scale)")


def sweep_report(title: str, table: pd.DataFrame, result: dict) -> str:
    """Runs, the privacy-utility curve, each budget against the non-private runs (paired), the trend
    on log epsilon, and the audit columns when present."""
    epsilon = table["epsilon"].astype(float)
    private, reference = table[np.isfinite(epsilon)], table[~np.isfinite(epsilon)]
    budgets = sorted(private["epsilon"].unique())
    differences = result["difference_to_non_private"]
    fig, axes = plt.subplots(1, 2 if differences else 1, figsize=(PAGE_WIDTH if differences else 6.5, 4),
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(private["epsilon"], private["auroc_mean"], "o", alpha=0.5, color="tab:blue", label="DP-SGD run")
    means = private.groupby("epsilon")["auroc_mean"].mean()
    ax.plot(means.index, means.to_numpy(), "-", color="tab:blue", label="DP-SGD, mean over seeds")
    if len(reference):
        ax.axhline(reference["auroc_mean"].mean(), color="black", ls="--", label="non-private (mean over seeds)")
    _epsilon_axis(ax, budgets)
    ax.set(ylabel="mean test AUROC", title="Privacy-utility trade-off")
    ax.legend(fontsize=8)
    if differences:
        _calibration_differences(axes[0, 1], differences)
    fig.tight_layout()
    privacy_total = result["privacy_total"]
    spent = privacy_total["epsilon"]
    total = (f"<p class='note'>All runs of this sweep trained on the same patients; composed, each patient's "
             f"epsilon is {'unbounded' if spent is None else f'{spent:.4g}'} ({html.escape(privacy_total['note'])}). "
             f"The privacy ledger {html.escape(privacy_total['ledger'])} adds every other run on them "
             f"(<code>python main_2D_DP.py ledger</code>).</p>")
    sections = [("Runs", total + _table(table)), ("Privacy-utility curve", _figure(fig))]
    if differences:
        boot = result["bootstrap"]
        note = (f"<p class='note'>Each budget minus the non-private runs on the same test patients: per resample "
                f"({boot['resamples']} resamples of {boot['units']} {boot['unit']}s), the budget's mean over its seeds "
                f"minus the non-private mean, the seeds drawn with replacement too. Brier and ECE (mean over labels, "
                f"each run's ECE in its own equal-mass bins): above 0, the private runs' probabilities are worse "
                f"than the non-private ones'; an ECE is biased up by noise, about equally for runs on the same "
                f"images, so its difference's interval is approximate. q: Benjamini-Hochberg over the "
                f"{result['multiplicity']['tests']} tests of this sweep; unadjusted p-values are exploratory.</p>")
        rows = [{"epsilon": budget, "metric": column.replace("_", " "),
                 "difference [95% CI]": value_ci({"value": d["difference"], "ci95": d.get("ci95"), "note": d.get("note")}),
                 "p": format_p(d.get("p_value")), "q (BH)": format_p(d.get("q_value"))}
                for budget, columns in differences.items() for column, d in columns.items()]
        sections.append(("Difference to non-private (paired)", note + _table(pd.DataFrame(rows)) +
                         _figure(_difference_forest(differences))))
    trend_rows = [{"metric": column.replace("_", " "), "runs": t["runs"], "budgets": t["budgets"],
                   "slope per log epsilon [95% CI]": value_ci({"value": t["slope_per_log_epsilon"], "ci95": t["ci95"],
                                                               "note": t.get("note")}, 4),
                   "p": format_p(t["p_value"]), "q (BH)": format_p(t.get("q_value")),
                   "Pearson r (epsilon, secondary)": "n/a" if t["pearson_r"] is None else fixed(t["pearson_r"]),
                   "Pearson p": format_p(t["pearson_p"])}
                  for column, t in result["trend_on_log_epsilon"].items()]
    sections.append(("Trend on log epsilon (private runs)",
                     "<p class='note'>Least-squares slope of each metric on log(epsilon) over every private run; "
                     "fewer than 5 runs is not meaningful and is not computed (use <code>sweep --seeds K</code>). "
                     "Pearson's r between epsilon and the metric, as in the study, is secondary.</p>"
                     + _table(pd.DataFrame(trend_rows))))
    if "attack_auroc" in table:
        sections.append(("Privacy audit vs epsilon", _figure(_sweep_audit(private, reference))))
    return page(title, sections)


def _calibration_differences(ax, differences: dict) -> None:
    """Each budget's mean Brier score and ECE minus the non-private runs', with 95% intervals, against epsilon."""
    for k, (column, name, marker) in enumerate((("brier_mean", "mean Brier score", "o"), ("ece_mean", "mean ECE", "s"))):
        shown = [(float(budget), d[column]) for budget, d in differences.items()
                 if d.get(column, {}).get("difference") is not None and d[column].get("ci95")]
        if shown:
            x = np.array([e for e, _ in shown]) * (1 + 0.04 * (2 * k - 1))  # side by side at each budget
            value = np.array([d["difference"] for _, d in shown])
            low, high = np.array([d["ci95"] for _, d in shown]).T
            ax.errorbar(x, value, yerr=[value - low, high - value], fmt=f"{marker}-", capsize=3, label=name)
    ax.axhline(0, color="grey", lw=0.8, ls="--", label="as calibrated as non-private")
    _epsilon_axis(ax, [float(budget) for budget in differences])
    ax.set(ylabel="DP minus non-private (95% CI)", title="Calibration cost (above 0: worse than non-private)")
    ax.legend(fontsize=8)


def _difference_forest(differences: dict):
    """Mean AUROC and the fairness gaps of each budget minus non-private, with 95% intervals."""
    columns = [c for c in next(iter(differences.values())) if "_spd_" not in c]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(columns) * len(differences) + 1.2))
    y = 0
    ticks, names = [], []
    for k, (budget, entries) in enumerate(differences.items()):
        for column in columns:
            d = entries.get(column, {})
            if d.get("difference") is not None and d.get("ci95"):
                lo, hi = d["ci95"]
                ax.errorbar([d["difference"]], [y], xerr=[[d["difference"] - lo], [hi - d["difference"]]], fmt="o",
                            capsize=3, color=f"C{k}", label=f"epsilon {budget}" if column == columns[0] else None)
            ticks.append(y)
            names.append(column.replace("_", " "))
            y -= 1
        y -= 0.5
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set(xlabel="budget minus non-private (95% CI)", title="Each budget against the non-private runs")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _sweep_audit(private: pd.DataFrame, reference: pd.DataFrame):
    """Membership attack AUROC, and the empirical epsilon lower bound against the accounted epsilon."""
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 4))
    axes[0].errorbar(private["epsilon"], private["attack_auroc"],
                     yerr=[private["attack_auroc"] - private["attack_auroc_ci95_low"],
                           private["attack_auroc_ci95_high"] - private["attack_auroc"]], fmt="o-", capsize=3,
                     label="DP-SGD")
    if len(reference):
        axes[0].axhline(reference["attack_auroc"].iloc[0], color="black", ls="--", label="non-private")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    _epsilon_axis(axes[0], private["epsilon"])
    axes[0].set(ylabel="loss attack AUROC (95% CI)", title="Membership inference vs privacy budget")
    axes[0].legend(fontsize=8)
    bound = private["epsilon_lower_bound"].astype(float)
    axes[1].plot(private["epsilon"], private["epsilon_spent"], "s--", label="accounted epsilon (upper bound)")
    if bound.notna().any():
        axes[1].plot(private["epsilon"], bound, "o-", label="empirical lower bound (95%, canaries)")
    _epsilon_axis(axes[1], private["epsilon"])
    axes[1].set(ylabel="epsilon", title="Proven vs accounted privacy loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _heatmap(values: np.ndarray, low: np.ndarray, high: np.ndarray, rows: list[str], columns: list[str],
             own: np.ndarray, name: str = "mean AUROC", ratio: bool = False):
    """``name`` per (trained on, tested on), each cell annotated with its 95% interval; cells where
    ``own`` (tested on the training data's own test split) are framed. A ``ratio`` (1 = as it should
    be) is coloured on a diverging scale symmetric around 1 on the log scale (1/2 and 2 equally far)."""
    height = 0.75 * len(rows) + 1.6
    fig, ax = plt.subplots(figsize=(min(PAGE_WIDTH, 2.4 * len(columns) + 3.5), height))
    finite = values[np.isfinite(values) & (values > 0 if ratio else True)]
    if ratio:  # at least 1.1 either side, so that a calibrated matrix is not drawn in saturated colours
        spread = max([np.log(1.1), *np.abs(np.log(finite))])
        norm, cmap = matplotlib.colors.LogNorm(np.exp(-spread), np.exp(spread)), "RdBu_r"
        with np.errstate(divide="ignore", invalid="ignore"):
            dark = np.abs(np.log(values)) > 0.6 * spread
    else:
        norm = matplotlib.colors.Normalize(finite.min() if finite.size else 0.5, finite.max() if finite.size else 1.0)
        cmap = "viridis"
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.75
        dark = values < middle
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        text = "not estimable" if not np.isfinite(value) else (
            f"{value:.3f}" + (f"\n[{low[i, j]:.3f}, {high[i, j]:.3f}]" if np.isfinite(low[i, j]) else ""))
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="white" if np.isfinite(value) and dark[i, j] else "black")
        if own[i, j]:
            ax.add_patch(matplotlib.patches.Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, lw=2,
                                                      ec="gold" if ratio else "red"))  # red cells of a ratio
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set(xlabel="tested on", ylabel="trained on (experiment, privacy)",
           title=f"{name[0].upper()}{name[1:]} [95% CI]\nframed: tested where trained (in distribution)")
    bar = fig.colorbar(image, ax=ax, label=name, shrink=0.8)
    if ratio:  # plain numbers at round ratios rather than powers of ten
        bar.set_ticks([t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10) if norm.vmin <= t <= norm.vmax])
        bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        bar.ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    return fig


def transfer_report(title: str, table: pd.DataFrame, result: dict, values: np.ndarray, low: np.ndarray,
                    high: np.ndarray, ratio: tuple[np.ndarray, np.ndarray, np.ndarray]) -> str:
    """The transfer matrix as heat-maps of mean AUROC (``values``, ``low``, ``high``) and of the mean
    observed/expected ratio (``ratio``: value, low, high) and a table, and each private model against its
    non-private counterpart per tested dataset (paired)."""
    rows = [f"{r['row']}\n({r['trained_on']}" + (f" from {r['pretrained_from']}" if r["pretrained_from"] else "")
            + (", non-private)" if not r["private"] else f", eps {r['epsilon']:.3g})") for r in result["rows"]]
    shown = table.assign(**{"mean AUROC [95% CI]": [value_ci({"value": v, "ci95": [lo, hi] if np.isfinite(lo) else None})
                                                    for v, lo, hi in zip(table["auroc_mean"], table["ci95_low"],
                                                                         table["ci95_high"])]})
    shown["O/E, mean over labels [95% CI]"] = [
        value_ci({"value": v if np.isfinite(v) else None, "ci95": [lo, hi] if np.isfinite(lo) else None})
        for v, lo, hi in table[["observed_expected_mean", "observed_expected_ci95_low",
                                "observed_expected_ci95_high"]].to_numpy(float)]
    shown = shown[["trained_on", "pretrained_from", "experiment", "privacy", "tested_on", "in_distribution", "images", "labels_scored",
                   "labels_absent", "mean AUROC [95% CI]", "O/E, mean over labels [95% CI]"]]
    note = (f"<p class='note'>Rows: the model and what it was trained on; columns: the dataset tested ({result['split']} "
            f"split). {html.escape(result['note'])}. Each cell's own report, predictions and fairness are in its "
            f"folder (the transfer.csv column <code>folder</code>).</p>")
    own = np.array([[r["trained_on"] == c for c in result["columns"]] for r in result["rows"]])
    calibration_note = ("<p class='note'>Calibration-in-the-large of each cell: observed positives over the sum of "
                        "predicted probabilities, averaged over the labels estimable on the tested dataset, with its "
                        "patient-bootstrap interval. 1: the model predicts as many positives as there are; above 1 "
                        "(red) it under-predicts the risk there, below 1 (blue) it over-predicts. Models often keep "
                        "their ranking (AUROC) on another site and still mis-state its risk.</p>")
    sections = [("Transfer matrix", note + _figure(_heatmap(values, low, high, rows, result["columns"], own))
                 + _table(shown)),
                ("Calibration-in-the-large on each dataset", calibration_note + _figure(_heatmap(
                    *ratio, rows, result["columns"], own, name="observed/expected, mean over labels",
                    ratio=True)))]
    pairs = result["private_minus_non_private"]
    if pairs:
        boot = pairs[0]["bootstrap"]
        frame = pd.DataFrame([{"tested on": p["tested_on"], "private model": p["private"],
                               "non-private model": p["non_private"], "private": f"{p['auroc_private']:.3f}",
                               "non-private": f"{p['auroc_non_private']:.3f}",
                               "difference [95% CI]": value_ci({"value": p["difference"], "ci95": p["ci95"]}),
                               "p": format_p(p["p_value"])} for p in pairs])
        sections.append(("Private minus non-private, per tested dataset", (
            f"<p class='note'>Models trained on the same data, scored on the same images: paired mean-AUROC "
            f"difference, {boot['resamples']} bootstrap resamples of {boot['unit']}s; p-values unadjusted.</p>")
            + _table(frame)))
    return page(title, sections)
