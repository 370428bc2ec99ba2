"""Prediction and metrics: score a split of an experiment's dataset with its best checkpoint.

Per label: AUROC (threshold-free), and accuracy, sensitivity, specificity, precision and F1 at the
Youden threshold (argmax of TPR - FPR). The threshold is chosen on the validation split, never on
the split being scored; scoring the validation split itself takes its thresholds from training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Config, InputError, read_yaml, validate
from data.dataset import evaluation_loader, load_table
from artifacts import atomic_write_text, json_text, load_checkpoint
from evaluation.bootstrap import bootstrap_intervals
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


def auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """AUROC of one label; NaN when the split holds only one class (not estimable)."""
    return float(roc_auc_score(truth, score)) if len(np.unique(truth)) == 2 else float("nan")


def auroc_per_label(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict[str, float]:
    return {label: auroc(truth[:, i], scores[:, i]) for i, label in enumerate(labels)}


def mean_auroc(per_label: dict[str, float]) -> float:
    values = [v for v in per_label.values() if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def youden_threshold(truth: np.ndarray, score: np.ndarray) -> float:
    """Score threshold maximising Youden's J = TPR - FPR (0.5 when one class is absent)."""
    if len(np.unique(truth)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(truth, score)
    return float(min(thresholds[np.argmax(tpr - fpr)], 1.0))


def threshold_metrics(truth: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision and F1 of ``score >= threshold``."""
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
                            "n": int(len(truth)), "positives": int(truth[:, i].sum()),
                            **threshold_metrics(truth[:, i], scores[:, i], thresholds[label])}
    return {"auroc_mean": mean_auroc({k: v["auroc"] for k, v in per_label.items()}), "labels": per_label}


def add_intervals(metrics: dict, intervals: dict) -> None:
    """Merge bootstrap intervals into the metrics of :func:`split_metrics`."""
    for label, extra in intervals["labels"].items():
        metrics["labels"][label].update(extra)
    metrics["auroc_mean_ci95"] = intervals["auroc_mean_ci95"]
    metrics["bootstrap"] = intervals["bootstrap"]


def load_experiment_config(exp_dir: Path) -> Config:
    exp_dir = Path(exp_dir)
    if not (exp_dir / "config.yaml").is_file():
        raise InputError(f"{exp_dir}: not an experiment folder (no config.yaml)")
    return validate(read_yaml(exp_dir / "config.yaml"), source=str(exp_dir / "config.yaml"))


def predict_experiment(exp_dir: Path, split: str = "test") -> dict:
    """Write ``predictions/<split>.csv`` and ``results/<split>_metrics.json``; return the metrics."""
    exp_dir = Path(exp_dir)
    cfg = load_experiment_config(exp_dir)
    ckpt = load_checkpoint(exp_dir / "checkpoints" / "best.pt")
    labels = list(ckpt["labels"])
    if labels != cfg.data.labels:
        raise InputError(f"{exp_dir}: best.pt was trained on labels {labels}, config.yaml says {cfg.data.labels}")
    device = resolve_device(cfg.training.device)
    model = build_model(cfg.model.name, len(labels), cfg.model.activation, cfg.data.image_size)
    model.load_state_dict(ckpt["model"])
    model.to(device)

    table = load_table(cfg.data, cfg.experiment.seed)
    batch = cfg.training.physical_batch_size
    threshold_split = "train" if split == "valid" else "valid"
    ref = table.split(threshold_split)
    ref_scores = predict_scores(model, evaluation_loader(ref, table.image_dir, cfg.data, batch), device, desc=threshold_split)
    ref_truth = ref[labels].to_numpy()
    thresholds = {label: youden_threshold(ref_truth[:, i], ref_scores[:, i]) for i, label in enumerate(labels)}

    frame = table.split(split)
    scores = predict_scores(model, evaluation_loader(frame, table.image_dir, cfg.data, batch), device, desc=split)
    truth = frame[labels].to_numpy()

    out = frame[["image_id", "patient_id"]].copy()
    out["sex"] = frame["sex"].where(frame["sex"].isin(["F", "M"]), "")
    out["age"] = frame["age"]
    for i, label in enumerate(labels):
        out[label] = truth[:, i].astype(int)
        out[f"{label}_score"] = scores[:, i]
    metrics = {"split": split, "threshold_split": threshold_split, "checkpoint_epoch": ckpt["epoch"],
               **split_metrics(truth, scores, labels, thresholds)}
    if cfg.evaluation.bootstrap:
        add_intervals(metrics, bootstrap_intervals(truth, scores, labels, thresholds,
                                                   cfg.evaluation.bootstrap, cfg.evaluation.seed))

    for path in (exp_dir / "predictions" / f"{split}.csv", exp_dir / "results" / f"{split}_metrics.json"):
        if path.exists():
            print(f"replacing {path} (recomputed from {exp_dir / 'checkpoints' / 'best.pt'})")
    atomic_write_text(exp_dir / "predictions" / f"{split}.csv", out.to_csv(index=False))
    atomic_write_text(exp_dir / "results" / f"{split}_metrics.json", json_text(metrics))
    return metrics


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
