"""Prediction and metrics: score a split of an experiment's dataset with its best checkpoint.

Per label: AUROC (threshold-free), and accuracy, sensitivity, specificity, precision and F1 at the
Youden threshold (argmax of TPR - FPR). The threshold is chosen on the validation split, never on
the split being scored; scoring the validation split itself takes its thresholds from training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from config import Config, InputError, read_yaml, validate
from data.dataset import evaluation_loader, load_table
from artifacts import atomic_write_text, json_text, load_checkpoint
from evaluation.bootstrap import bootstrap_intervals, resample_counts
from evaluation.compare import paired_auroc_comparison
from evaluation.fairness import fairness_report, fairness_table
from evaluation.report import comparison_report, prediction_report
from models import build_model, resolve_device


@torch.no_grad()
def predict_scores(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                   criterion: torch.nn.Module | None = None, desc: str = "predict"):
    """Sigmoid probabilities [N, L] (and the mean loss when ``criterion`` is given)."""
    model.eval()
    scores, loss_sum, n = [], 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False):
        logits = model(x.to(device))
        if criterion is not None:
            loss_sum += criterion(logits, y.to(device)).item() * len(x)
            n += len(x)
        scores.append(torch.sigmoid(logits).cpu())
    out = torch.cat(scores).numpy() if scores else np.zeros((0, 0))
    return (out, loss_sum / max(n, 1)) if criterion is not None else out


def labelled(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images of one label that carry a label (NaN = unlabelled, left out of every metric)."""
    keep = np.isfinite(truth)
    return truth[keep].astype(bool), score[keep]


def auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """AUROC of one label; NaN when the split holds only one class (not estimable)."""
    truth, score = labelled(truth, score)
    return float(roc_auc_score(truth, score)) if len(np.unique(truth)) == 2 else float("nan")


def auroc_per_label(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict[str, float]:
    return {label: auroc(truth[:, i], scores[:, i]) for i, label in enumerate(labels)}


def mean_auroc(per_label: dict[str, float]) -> float:
    values = [v for v in per_label.values() if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def youden_threshold(truth: np.ndarray, score: np.ndarray) -> float:
    """Score threshold maximising Youden's J = TPR - FPR (0.5 when one class is absent)."""
    truth, score = labelled(truth, score)
    if len(np.unique(truth)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(truth, score)
    return float(min(thresholds[np.argmax(tpr - fpr)], 1.0))


def threshold_metrics(truth: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision and F1 of ``score >= threshold``."""
    truth, score = labelled(truth, score)
    tn, fp, fn, tp = confusion_matrix(truth, score >= threshold, labels=[0, 1]).ravel()

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    return {"accuracy": ratio(tp + tn, tp + tn + fp + fn), "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "precision": ratio(tp, tp + fp),
            "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def split_metrics(truth: np.ndarray, scores: np.ndarray, labels: list[str], thresholds: dict[str, float]) -> dict:
    per_label = {}
    for i, label in enumerate(labels):
        per_label[label] = {"auroc": auroc(truth[:, i], scores[:, i]), "threshold": thresholds[label],
                            "n": int(np.isfinite(truth[:, i]).sum()), "positives": int(np.nansum(truth[:, i])),
                            **threshold_metrics(truth[:, i], scores[:, i], thresholds[label])}
    return {"auroc_mean": mean_auroc({k: v["auroc"] for k, v in per_label.items()}), "labels": per_label}


def add_intervals(metrics: dict, intervals: dict) -> None:
    """Merge bootstrap intervals into the metrics of :func:`split_metrics`."""
    for label, extra in intervals["labels"].items():
        metrics["labels"][label].update(extra)
    metrics["auroc_mean_ci95"] = intervals["auroc_mean_ci95"]


def load_experiment_config(exp_dir: Path) -> Config:
    exp_dir = Path(exp_dir)
    if not (exp_dir / "config.yaml").is_file():
        raise InputError(f"{exp_dir}: not an experiment folder (no config.yaml)")
    return validate(read_yaml(exp_dir / "config.yaml"), source=str(exp_dir / "config.yaml"))


@dataclass
class Scored:
    """One experiment's best model applied to one split, with thresholds from another split."""

    cfg: Config
    frame: pd.DataFrame
    labels: list[str]
    truth: np.ndarray
    scores: np.ndarray
    thresholds: dict[str, float]
    threshold_split: str
    epoch: int


def score_split(exp_dir: Path, split: str) -> Scored:
    """Score ``split`` with ``checkpoints/best.pt``; Youden thresholds come from valid (train for valid)."""
    exp_dir = Path(exp_dir)
    cfg = load_experiment_config(exp_dir)
    ckpt = load_checkpoint(exp_dir / "checkpoints" / "best.pt")
    labels = list(ckpt["labels"])
    if labels != cfg.data.labels:
        raise InputError(f"{exp_dir}: best.pt was trained on labels {labels}, config.yaml says {cfg.data.labels}")
    device = resolve_device(cfg.training.device)
    model = build_model(cfg.model.name, len(labels), cfg.model.activation, cfg.data.image_size)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        raise InputError(f"{exp_dir / 'checkpoints' / 'best.pt'}: weights do not fit model {cfg.model.name} "
                         f"with {len(labels)} labels ({str(exc).splitlines()[0]})") from None
    model.to(device)

    table = load_table(cfg.data, cfg.experiment.seed)
    batch = cfg.training.physical_batch_size

    def run(frame: pd.DataFrame, name: str):
        loader = evaluation_loader(frame, table, cfg.data, batch)
        return frame[labels].to_numpy(), predict_scores(model, loader, device, desc=f"{exp_dir.name} {name}")

    threshold_split = "train" if split == "valid" else "valid"
    ref_truth, ref_scores = run(table.split(threshold_split), threshold_split)
    thresholds = {label: youden_threshold(ref_truth[:, i], ref_scores[:, i]) for i, label in enumerate(labels)}
    frame = table.split(split)
    truth, scores = run(frame, split)
    return Scored(cfg, frame, labels, truth, scores, thresholds, threshold_split, ckpt["epoch"])


def predict_experiment(exp_dir: Path, split: str = "test") -> dict:
    """Write ``predictions/<split>.csv`` and ``results/<split>_metrics.json``; return the metrics."""
    exp_dir = Path(exp_dir)
    scored = score_split(exp_dir, split)
    frame, labels, truth, scores = scored.frame, scored.labels, scored.truth, scored.scores
    out = frame[["image_id", "patient_id"]].copy()
    out["sex"] = frame["sex"].where(frame["sex"].isin(["F", "M"]), "")
    out["age"] = frame["age"]
    for i, label in enumerate(labels):
        out[label] = pd.Series(truth[:, i]).astype("Int64")  # empty where unlabelled
        out[f"{label}_score"] = scores[:, i]
    metrics = {"split": split, "threshold_split": scored.threshold_split, "checkpoint_epoch": scored.epoch,
               **split_metrics(truth, scores, labels, scored.thresholds)}
    evaluation = scored.cfg.evaluation
    # One set of resample counts for the metrics and every subgroup: all intervals are paired.
    weights = resample_counts(len(truth), max(evaluation.bootstrap, 1), evaluation.seed)
    if evaluation.bootstrap:
        add_intervals(metrics, bootstrap_intervals(truth, scores, labels, scored.thresholds, weights))
        metrics["bootstrap"] = {"resamples": evaluation.bootstrap, "seed": evaluation.seed, "level": 0.95,
                                "method": "percentile", "unit": "image (patient-agnostic)"}
    fairness = fairness_report(truth, scores, labels, scored.thresholds, frame["sex"].to_numpy(),
                               frame["age"].to_numpy(), evaluation.age_bins, weights, evaluation.min_subgroup_size)
    fairness["split"] = split

    report = prediction_report(f"{exp_dir.name}: {split} split", labels, truth, scores, metrics, fairness)
    outputs = {exp_dir / "predictions" / f"{split}.csv": out.to_csv(index=False),
               exp_dir / "results" / f"{split}_metrics.json": json_text(metrics),
               exp_dir / "results" / f"{split}_fairness.json": json_text(fairness),
               exp_dir / "results" / f"{split}_fairness.csv": fairness_table(fairness).to_csv(index=False),
               exp_dir / ("report.html" if split == "test" else f"report_{split}.html"): report}
    for path, text in outputs.items():
        if path.exists():
            print(f"replacing {path} (recomputed from {exp_dir / 'checkpoints' / 'best.pt'})")
        atomic_write_text(path, text)
    _log_scalars(exp_dir, split, metrics, fairness)
    return metrics


def _log_scalars(exp_dir: Path, split: str, metrics: dict, fairness: dict) -> None:
    """The headline numbers of a prediction, beside the training curves in TensorBoard."""
    with SummaryWriter(str(exp_dir / "tensorboard")) as writer:
        writer.add_scalar(f"{split}/auroc_mean", metrics["auroc_mean"], metrics["checkpoint_epoch"])
        for label, m in metrics["labels"].items():
            writer.add_scalar(f"{split}/auroc/{label}", m["auroc"], metrics["checkpoint_epoch"])
        for attribute, fair in fairness["fairness"].items():
            for name, value in fair["mean"].items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"{split}/fairness/{attribute}/{name}", value, metrics["checkpoint_epoch"])


def compare_experiments(exp_a: Path, exp_b: Path, split: str = "test", out_dir: Path | None = None):
    """Score two experiments on the same images and compare their AUROCs, paired.

    Writes ``comparison.json`` and ``comparison.csv`` to ``out_dir`` (default
    ``<parent of A>/comparisons/<A>__vs__<B>__<split>``); returns (comparison, table).
    """
    exp_a, exp_b = Path(exp_a), Path(exp_b)
    a, b = score_split(exp_a, split), score_split(exp_b, split)
    if a.labels != b.labels:
        raise InputError(f"cannot compare: {exp_a} predicts {a.labels} but {exp_b} predicts {b.labels}")
    ids_a, ids_b = a.frame["image_id"], b.frame["image_id"]
    if (len(ids_a) != len(ids_b) or not (ids_a.to_numpy() == ids_b.to_numpy()).all()
            or not np.array_equal(a.truth, b.truth, equal_nan=True)):
        raise InputError(f"cannot compare: the {split} splits differ ({exp_a}: {len(ids_a)} images, {exp_b}: "
                         f"{len(ids_b)} images, {len(set(ids_a) ^ set(ids_b))} image ids in only one, or "
                         f"different labels for the same images); compare experiments on the same dataset")
    evaluation = a.cfg.evaluation
    if not evaluation.bootstrap:
        raise InputError(f"{exp_a / 'config.yaml'}: evaluation.bootstrap is 0; compare needs resamples")
    weights = resample_counts(len(a.truth), evaluation.bootstrap, evaluation.seed)
    result = paired_auroc_comparison(a.truth, a.scores, b.scores, a.labels, weights)
    comparison = {"experiment_a": str(exp_a), "experiment_b": str(exp_b), "split": split, "n_images": len(ids_a),
                  "bootstrap": {"resamples": evaluation.bootstrap, "seed": evaluation.seed, "paired": True},
                  **result}

    rows = []
    for label, m in [*result["labels"].items(), ("mean", None)]:
        boot = m["bootstrap"] if m else result["auroc_mean"]
        delong = m["delong"] if m else {}
        ci = boot["ci95"] or [None, None]
        rows.append({"label": label, "auroc_a": m["auroc_a"] if m else result["auroc_mean_a"],
                     "auroc_b": m["auroc_b"] if m else result["auroc_mean_b"], "difference": boot["difference"],
                     "ci95_low": ci[0], "ci95_high": ci[1], "p_bootstrap": boot["p_value"],
                     "p_a_not_better": boot["p_a_not_better"], "delong_z": delong.get("z"),
                     "p_delong": delong.get("p_value")})
    table = pd.DataFrame(rows)
    out_dir = Path(out_dir) if out_dir else exp_a.parent / "comparisons" / f"{exp_a.name}__vs__{exp_b.name}__{split}"
    if (out_dir / "comparison.json").exists():
        print(f"replacing the comparison in {out_dir} (recomputed)")
    atomic_write_text(out_dir / "comparison.json", json_text(comparison))
    atomic_write_text(out_dir / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / "report.html", comparison_report(
        f"A = {exp_a.name} vs B = {exp_b.name} ({split} split, {len(ids_a)} images)",
        a.labels, a.truth, a.scores, b.scores, table))
    return comparison, table


def format_comparison(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a")


def format_metrics(metrics: dict) -> str:
    """A table of the metrics; AUROC with its 95% interval when bootstrapped."""
    def num(value):
        return f"{value:6.3f}" if value is not None and np.isfinite(value) else "   n/a"

    def interval(ci):
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[not estimable]"

    with_ci = "bootstrap" in metrics
    rows = [f"{'label':30s} {'AUROC':>6s} {'95% CI' if with_ci else '':16s} {'acc':>6s} {'sens':>6s} "
            f"{'spec':>6s} {'F1':>6s}"]
    for label, m in metrics["labels"].items():
        ci = interval(m["ci95"]["auroc"]) if with_ci else ""
        rows.append(f"{label:30s} {num(m['auroc'])} {ci:16s} {num(m['accuracy'])} {num(m['sensitivity'])} "
                    f"{num(m['specificity'])} {num(m['f1'])}")
    ci = interval(metrics["auroc_mean_ci95"]) if with_ci else ""
    rows.append(f"{'mean AUROC':30s} {num(metrics['auroc_mean'])} {ci}")
    if with_ci:
        b = metrics["bootstrap"]
        rows.append(f"(95% percentile intervals, {b['resamples']} image-level bootstrap resamples, seed {b['seed']}; "
                    f"thresholds fixed from the {metrics['threshold_split']} split)")
    return "\n".join(rows)
