"""Self-contained HTML reports (figures embedded as PNG data URIs) for predict, audit, compare and sweep."""
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


def page(title: str, sections: list[tuple[str, str]]) -> str:
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


def threshold_source(metrics: dict) -> str:
    """Where the decision thresholds of a split's metrics came from, in words."""
    if metrics.get("thresholds_optimistic"):
        return f"thresholds by Youden's J on the {metrics['split']} split itself (optimistic)"
    if metrics["threshold_split"] == "bundle":
        return "thresholds of the release bundle (Youden's J on its experiment's validation split)"
    return f"thresholds by Youden's J on the {metrics['threshold_split']} split"


def prediction_sections(labels: list[str], truth: np.ndarray, scores: np.ndarray, metrics: dict,
                        fairness: dict) -> list[tuple[str, str]]:
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
    note = (f"<p class='note'>{n} images of the {metrics['split']} split; {threshold_source(metrics)}. "
            f"Intervals: 95% percentile bootstrap.</p>")
    return [
        ("Metrics", note + _table(pd.DataFrame(rows))),
        ("ROC curves", _figure(_roc_grid(truth, {"model": scores}, labels))),
        ("Subgroup AUROC by sex", _figure(_subgroup_bars(fairness, "sex", labels))),
        ("Subgroup AUROC by age", _figure(_subgroup_bars(fairness, "age", labels))),
        ("Fairness (mean over labels)", _table(pd.DataFrame(fair_rows))),
        ("Underdiagnosis (abnormal images predicted as having no finding)", _table(pd.DataFrame(under))),
    ]


def _with_interval(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """``name`` and its interval columns -> one 'value [low, high]' text column per metric."""
    out = table.drop(columns=[c for n in names for c in (f"{n}_ci95_low", f"{n}_ci95_high")])
    for name in names:
        out[name] = [("n/a" if v is None or not np.isfinite(v) else
                      f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and np.isfinite(lo) else ""))
                     for v, lo, hi in zip(table[name], table[f"{name}_ci95_low"], table[f"{name}_ci95_high"])]
    return out


def _attack_roc(scores: pd.DataFrame, attacks: list[str]):
    """ROC of each attack, on linear and on log-log axes (the low-FPR regime that matters)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
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
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set(xlim=(0, 1), ylim=(0, 1))
    axes[1].set(xlim=(1e-3, 1), ylim=(1e-3, 1))
    fig.tight_layout()
    return fig


def _attack_subgroups(audit: dict):
    """Attack AUROC with 95% interval per sex and age group, one series per attack."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    attacks = list(audit["attacks"])
    for ax, attribute in zip(axes, ("sex", "age")):
        for j, attack in enumerate(attacks):
            groups = audit["attacks"][attack]["subgroups"][attribute]
            xs, ys, lo, hi = [], [], [], []
            for i, entry in enumerate(groups.values()):
                if not entry["estimable"] and j == 0:
                    ax.text(i, 0.5, "too few\nimages", ha="center", va="bottom", fontsize=7, color="grey")
                if entry["estimable"] and entry["auroc"]["ci95"]:
                    xs.append(i + (j - (len(attacks) - 1) / 2) * 0.25)
                    ys.append(entry["auroc"]["value"])
                    lo.append(ys[-1] - entry["auroc"]["ci95"][0])
                    hi.append(entry["auroc"]["ci95"][1] - ys[-1])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, ms=4, label=attack)
        ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(ylabel="attack AUROC (95% CI)", title=f"Membership exposure by {attribute}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _canary_figure(bound: dict, accounted: float | None, canaries: pd.DataFrame):
    """The lower bound beside the accounted epsilon, and the canary scores by coin."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
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
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def audit_sections(audit: dict, table: pd.DataFrame, scores: pd.DataFrame,
                   canaries: pd.DataFrame | None) -> list[tuple[str, str]]:
    """Report sections of a privacy audit: attack metrics, ROC, subgroup exposure, canary bound."""
    metrics = ["auroc"] + [c for c in table.columns if c.startswith("tpr_at_fpr_") and not c.endswith(("low", "high"))]
    note = (f"<p class='note'>{audit['members']} training images (members) against {audit['nonmembers']} test "
            f"images of other patients (non-members); model of epoch {audit['checkpoint_epoch']}. "
            f"AUROC 0.5 = the attack learns nothing. Intervals: 95% percentile bootstrap over images. "
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
        note = (f"<p class='note'>{bound['canaries']} canaries (flipped labels), {bound['included']} trained on by "
                f"their coin. Best of {len(bound['grid'])} guess counts ({bound['guesses']} guesses, "
                f"{bound['correct']} right), Bonferroni-corrected. {verdict}</p>")
        sections.append(("One-run epsilon lower bound (canaries)",
                         note + _table(pd.DataFrame(bound["grid"])) +
                         _figure(_canary_figure(bound, accounted, canaries))))
    return sections


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
    return page(title, [
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


def sweep_report(title: str, table: pd.DataFrame, correlations: dict, privacy_total: dict) -> str:
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
    total = (f"<p class='note'>All runs of this sweep trained on the same patients; composed, each patient's "
             f"epsilon is {privacy_total['epsilon']:.4g} ({html.escape(privacy_total['note'])}). The privacy ledger "
             f"{html.escape(privacy_total['ledger'])} adds every other run on them "
             f"(<code>python main_2D_DP.py ledger</code>).</p>")
    sections = [
        ("Runs", total + _table(table)),
        ("Privacy-utility curve", _figure(fig)),
        ("Fairness vs epsilon", _figure(fig2)),
        ("Pearson's r between epsilon and fairness (private runs)", _table(corr)),
    ]
    if "attack_auroc" in table:
        sections.append(("Privacy audit vs epsilon", _figure(_sweep_audit(private, reference))))
    return page(title, sections)


def _sweep_audit(private: pd.DataFrame, reference: pd.DataFrame):
    """Membership attack AUROC, and the empirical epsilon lower bound against the accounted epsilon."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].errorbar(private["epsilon"], private["attack_auroc"],
                     yerr=[private["attack_auroc"] - private["attack_auroc_ci95_low"],
                           private["attack_auroc_ci95_high"] - private["attack_auroc"]], fmt="o-", capsize=3,
                     label="DP-SGD")
    if len(reference):
        axes[0].axhline(reference["attack_auroc"].iloc[0], color="black", ls="--", label="non-private")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    _epsilon_axis(axes[0], private["epsilon"])
    axes[0].set(ylabel="loss attack AUROC (95% CI)", title="Membership inference vs privacy budget")
    axes[0].legend(fontsize=7)
    bound = private["epsilon_lower_bound"].astype(float)
    axes[1].plot(private["epsilon"], private["epsilon_spent"], "s--", label="accounted epsilon (upper bound)")
    if bound.notna().any():
        axes[1].plot(private["epsilon"], bound, "o-", label="empirical lower bound (95%, canaries)")
    _epsilon_axis(axes[1], private["epsilon"])
    axes[1].set(ylabel="epsilon", title="Proven vs accounted privacy loss")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig
