"""Self-contained HTML reports (figures embedded as PNG data URIs) for predict, compare and sweep."""
from __future__ import annotations

import base64
import html
import io
import math

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f0f0f0}img{max-width:100%}.note{color:#555;font-size:13px}"""


def _figure(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a", border=0)


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "not estimable"


def _roc_grid(truth: np.ndarray, curves: dict[str, np.ndarray], labels: list[str]):
    """One panel per label, one ROC curve per model."""
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
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
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.text(0.5, 0.5, "not estimable:\none class only", ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def _subgroup_bars(fairness: dict, attribute: str, labels: list[str]):
    """AUROC with 95% interval per subgroup and label; not estimable subgroups are left out."""
    groups = list(fairness["subgroups"][attribute])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) * len(groups) / 2), 3.6))
    width = 0.8 / len(groups)
    for j, group in enumerate(groups):
        xs, ys, lo, hi = [], [], [], []
        for i, label in enumerate(labels):
            entry = fairness["subgroups"][attribute][group][label]
            auroc = entry.get("metrics", {}).get("auroc", {})
            if entry["estimable"] and auroc.get("value") is not None and auroc.get("ci95"):
                xs.append(i + (j - (len(groups) - 1) / 2) * width)
                ys.append(auroc["value"])
                lo.append(auroc["value"] - auroc["ci95"][0])
                hi.append(auroc["ci95"][1] - auroc["value"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, ms=4,
                    label=group if xs else f"{group} (not estimable)")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="AUROC (95% CI)", title=f"AUROC by {attribute}", ylim=(0, 1.02))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7, ncol=min(len(groups), 5))
    return fig


def prediction_report(title: str, labels: list[str], truth: np.ndarray, scores: np.ndarray, metrics: dict,
                      fairness: dict) -> str:
    rows = [{"label": label, "AUROC": m["auroc"], "95% CI": _interval(m.get("ci95", {}).get("auroc")),
             "accuracy": m["accuracy"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
             "precision": m["precision"], "F1": m["f1"], "threshold": m["threshold"], "positives": m["positives"]}
            for label, m in metrics["labels"].items()]
    rows.append({"label": "mean", "AUROC": metrics["auroc_mean"], "95% CI": _interval(metrics.get("auroc_mean_ci95"))})
    fair_rows = []
    for attribute, fair in fairness["fairness"].items():
        for name, value in fair["mean"].items():
            if isinstance(value, dict):
                fair_rows += [{"attribute": attribute, "metric": f"statistical parity difference ({g})", "mean over labels": v}
                              for g, v in value.items()]
            else:
                fair_rows.append({"attribute": attribute, "metric": name.replace("_", " "), "mean over labels": value})
    under = [{"attribute": a, "group": g, "abnormal images": e["abnormal"], "underdiagnosis rate": e["rate"]}
             for a, groups in fairness["underdiagnosis"].items() if a != "sex_age" for g, e in groups.items()]
    n = metrics["labels"][labels[0]]["n"]
    note = (f"<p class='note'>{n} images of the {metrics['split']} split. Thresholds: Youden's J on the "
            f"{metrics['threshold_split']} split. Intervals: 95% percentile bootstrap.</p>")
    return _page(title, [
        ("Metrics", note + _table(pd.DataFrame(rows))),
        ("ROC curves", _figure(_roc_grid(truth, {"model": scores}, labels))),
        ("Subgroup AUROC by sex", _figure(_subgroup_bars(fairness, "sex", labels))),
        ("Subgroup AUROC by age", _figure(_subgroup_bars(fairness, "age", labels))),
        ("Fairness (mean over labels)", _table(pd.DataFrame(fair_rows))),
        ("Underdiagnosis (abnormal images predicted as having no finding)", _table(pd.DataFrame(under))),
    ])


def comparison_report(title: str, labels: list[str], truth: np.ndarray, scores_a: np.ndarray,
                      scores_b: np.ndarray, table: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(table) + 1))
    y = np.arange(len(table))[::-1]
    diff = table["difference"].to_numpy(float)
    lo, hi = table["ci95_low"].to_numpy(float), table["ci95_high"].to_numpy(float)
    ax.errorbar(diff, y, xerr=[diff - lo, hi - diff], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, table["label"], fontsize=8)
    ax.set(xlabel="AUROC difference A - B (95% CI)", title="Paired AUROC differences")
    return _page(title, [
        ("AUROC differences", _table(table)),
        ("Forest plot", _figure(fig)),
        ("ROC curves", _figure(_roc_grid(truth, {"A": scores_a, "B": scores_b}, labels))),
    ])


def _epsilon_axis(ax, epsilons) -> None:
    """Log-scaled epsilon axis with the budgets themselves as plain-number ticks."""
    ax.set_xscale("log")
    ax.set_xticks(list(epsilons), [f"{e:g}" for e in epsilons])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("target epsilon (log scale)")


def sweep_report(title: str, table: pd.DataFrame, correlations: dict) -> str:
    private = table[np.isfinite(table["epsilon"].astype(float))].sort_values("epsilon")
    reference = table[~np.isfinite(table["epsilon"].astype(float))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(private["epsilon"], private["auroc_mean"],
                yerr=[private["auroc_mean"] - private["auroc_mean_ci95_low"],
                      private["auroc_mean_ci95_high"] - private["auroc_mean"]], fmt="o-", capsize=3, label="DP-SGD")
    if len(reference):
        ax.axhline(reference["auroc_mean"].iloc[0], color="black", ls="--", label="non-private")
    _epsilon_axis(ax, private["epsilon"])
    ax.set(ylabel="mean AUROC (95% CI)", title="Privacy-utility trade-off")
    ax.legend()
    fairness_columns = [c for c in table.columns if c.startswith(("sex_", "age_")) and "spd" not in c]
    fig2, ax2 = plt.subplots(figsize=(7, 4))
    for column in fairness_columns:
        ax2.plot(private["epsilon"], private[column], "o-", label=column.replace("_", " "))
    _epsilon_axis(ax2, private["epsilon"])
    ax2.set(ylabel="metric value (mean over labels)", title="Fairness metrics vs privacy budget")
    ax2.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    corr = pd.DataFrame([{"metric": k, "Pearson r": v["r"], "p-value": v["p_value"], "private runs": v["n"]}
                         for k, v in correlations.items()])
    return _page(title, [
        ("Runs", _table(table)),
        ("Privacy-utility curve", _figure(fig)),
        ("Fairness vs epsilon", _figure(fig2)),
        ("Pearson's r between epsilon and fairness (private runs)", _table(corr)),
    ])
