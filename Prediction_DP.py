"""Prediction and metrics: score a split of an experiment's dataset with its best checkpoint, another
dataset (external validation) or new, unlabelled images with an experiment or a release bundle.

Per label: AUROC (threshold-free), and accuracy, sensitivity, specificity, precision and F1 at the
Youden threshold (argmax of TPR - FPR). The threshold is chosen on the validation split, never on
training data (a DP model's scores of training images would make every threshold a function of one
training image); scoring the validation split itself therefore uses thresholds chosen on the scored
images, which is optimistic and reported as such.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import PUBLIC_PRETRAINING, Config, Data, Evaluation, InputError, merge, read_yaml, validate
from data.dataset import Table, evaluation_loader, load_table
from data.images import PREPROCESS_VERSION, Preprocessing
from data.unlabelled import CARRIED, ImageFiles, list_images
from artifacts import Curves, Layout, atomic_write_text, json_text, load_checkpoint, read_json
from evaluation.bootstrap import bootstrap_intervals, resampling
from evaluation.calibration import (apply_recalibration, calibration_report, decision_curve, describe_map,
                                    map_thresholds, subgroup_calibration)
from evaluation.fairness import fairness_report, fairness_table, join_calibration
from evaluation.report import page, prediction_sections, threshold_source
from models import build_model
from parallel import resolve_device
from privacy.release import (is_bundle, plain_privacy, plain_statement, privacy_statement, read_bundle, rounded_count,
                             worst_patient_epsilon)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                   desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, L] and targets [N, L] (NaN = unlabelled) of the loader's images, in order, on the CPU."""
    model.eval()
    logits, targets = [], []
    for x, y in tqdm(loader, desc=desc, leave=False):
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    return torch.cat(logits), torch.cat(targets)


def predict_scores(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                   criterion: torch.nn.Module | None = None, desc: str = "predict"):
    """Sigmoid probabilities [N, L] (and the mean loss when ``criterion`` is given)."""
    logits, targets = predict_logits(model, loader, device, desc)
    scores = torch.sigmoid(logits).numpy()
    if criterion is None:
        return scores
    loss = criterion(logits.to(device), targets.to(device)).item() if len(logits) else 0.0
    return scores, loss


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
    files = Layout(exp_dir)
    if not files.config.is_file():
        older = " (its config.yaml is at the top: written by a DP-CXR version before private/)" if (
            files.root / "config.yaml").is_file() else ""
        raise InputError(f"{exp_dir}: not an experiment folder (no private/config.yaml){older}")
    return validate(read_yaml(files.config), source=str(files.config))


@dataclass
class Scored:
    """A model applied to one split, with its decision thresholds and where they came from."""

    cfg: Config
    split: str
    frame: pd.DataFrame
    labels: list[str]
    truth: np.ndarray
    scores: np.ndarray
    thresholds: dict[str, float]
    threshold_split: str
    epoch: int
    data: dict | None = None  # another dataset scored (external validation): what it is, labels absent
    recalibration: dict | None = None  # the stored map applied to scores and thresholds (predict --calibrated)
    uncalibrated: np.ndarray | None = None  # the model's own scores, where ``scores`` are recalibrated

    @property
    def output(self) -> str:
        """The stem of its result files: calibrated results never replace uncalibrated ones."""
        return output_name(self.split, self.recalibration is not None)


def output_name(split: str, calibrated: bool) -> str:
    return f"{split}_calibrated" if calibrated else split


@dataclass
class Trained:
    """A trained model of an experiment (its best or last checkpoint), ready to score images."""

    cfg: Config
    model: torch.nn.Module
    labels: list[str]
    epoch: int
    device: torch.device
    calibration: dict | None = None  # the recalibration map fit on the validation split (None: none stored)


def load_trained(exp_dir: Path, checkpoint: str = "best") -> Trained:
    """The model of ``checkpoints/best.pt`` or ``private/last.pt``, checked against the experiment's config."""
    exp_dir = Path(exp_dir)
    cfg = load_experiment_config(exp_dir)
    path = Layout(exp_dir).checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    labels = list(ckpt["labels"])
    if labels != cfg.data.labels:
        raise InputError(f"{exp_dir}: {checkpoint}.pt was trained on labels {labels}, config.yaml says {cfg.data.labels}")
    device = resolve_device(cfg.training.device)
    model = build_model(cfg.model.name, len(labels), cfg.model.activation, cfg.data.image_size)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        raise InputError(f"{path}: weights do not fit model {cfg.model.name} "
                         f"with {len(labels)} labels ({str(exc).splitlines()[0]})") from None
    return Trained(cfg, model.to(device), labels, ckpt["epoch"], device, ckpt.get("calibration"))


def score_split(exp_dir: Path, split: str, calibrated: bool = False) -> Scored:
    """Score ``split`` with ``checkpoints/best.pt``; Youden thresholds come from the validation split.
    ``calibrated``: with the stored recalibration map applied (:func:`calibrate`), refused on the
    validation split, the map's own."""
    exp_dir = Path(exp_dir)
    if calibrated and split == "valid":
        raise InputError("--calibrated --split valid: the calibration map was fit on the validation split, so "
                         "its calibration there would be optimistic; score the test split (or another dataset)")
    best = load_trained(exp_dir)
    cfg, model, labels, device = best.cfg, best.model, best.labels, best.device
    stored = require_map(best.calibration, Layout(exp_dir).best, labels) if calibrated else None
    table = load_table(cfg.data, cfg.experiment.seed)
    batch = cfg.training.physical_batch_size

    frame = table.split(split)
    truth, scores = score_frame(model, device, frame, table, cfg.data, batch, f"{exp_dir.name} {split}")
    thresholds = youden_thresholds(*((truth, scores) if split == "valid" else score_frame(
        model, device, table.split("valid"), table, cfg.data, batch, f"{exp_dir.name} valid")), labels)
    scored = Scored(cfg, split, frame, labels, truth, scores, thresholds, "valid", best.epoch)
    return calibrate(scored, stored, labels, side_groups(labels, merge=False)) if stored else scored


def require_map(stored: dict | None, where: Path, labels: list[str]) -> dict:
    """The recalibration map a model stores (``where``: its best.pt or model.json), for ``--calibrated``;
    InputError naming the file when there is none or it does not fit the model's ``labels``."""
    if not stored:
        again = " and export it again" if where.name == "model.json" else ""
        raise InputError(f"--calibrated: {where} has no calibration map (trained with evaluation.recalibration: none, "
                         f"or by a DP-CXR version without it): retrain with evaluation.recalibration: platt (or "
                         f"temperature){again}, or predict without --calibrated")
    try:
        apply_recalibration(np.full((1, len(labels)), 0.5), labels, stored["labels"])
        describe_map(stored)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"--calibrated: {where}: its calibration map cannot be applied ({type(exc).__name__}: "
                         f"{exc})") from None
    return stored


def calibrate(scored: Scored, stored: dict, labels: list[str], groups: dict[str, list[int]]) -> Scored:
    """``scored`` with each label's scores and threshold mapped by the stored recalibration map of its
    column (``labels``: the model's; ``groups``: the columns behind each scored label, :func:`side_groups`).
    Each map is strictly increasing, so AUROC and every thresholded call stay as they were; a label merged
    from sides with different maps keeps its scores (the larger of two differently mapped probabilities
    is no increasing map of the larger one)."""
    maps = {}
    for name in scored.labels:
        sides = [stored["labels"][labels[i]] for i in groups[name]]
        maps[name] = sides[0] if all(m == sides[0] for m in sides) else {
            "method": "identity", "reason": "not applied: its right and left sides, merged, have different maps"}
    return replace(scored, scores=apply_recalibration(scored.scores, scored.labels, maps), uncalibrated=scored.scores,
                   thresholds=map_thresholds(scored.thresholds, scored.labels, maps),
                   recalibration={**stored, "labels": maps})


def score_frame(model: torch.nn.Module, device: torch.device, frame: pd.DataFrame, table: Table, data: Data,
                batch: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels of ``data.labels``, the model's probabilities) for the images of ``frame``."""
    scores = predict_scores(model, evaluation_loader(frame, table, data, batch), device, desc=desc)
    return frame[data.labels].to_numpy(), scores


def side_groups(labels: list[str], merge: bool) -> dict[str, list[int]]:
    """The model's output columns behind each label scored: one each, or with ``merge`` (another
    dataset that grades findings without sides) ``X_right`` and ``X_left`` together as ``X``."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        base, _, side = label.rpartition("_")
        paired = merge and side in ("right", "left") and {f"{base}_right", f"{base}_left"} <= set(labels)
        groups.setdefault(base if paired else label, []).append(i)
    return groups


def merge_columns(values: np.ndarray, groups: dict[str, list[int]]) -> np.ndarray:
    """Per group the largest of its columns, NaN ignored: a merged label is positive when either side
    is, and its score is the higher side's probability (one column: the column itself)."""
    return np.stack([np.fmax.reduce(values[:, cols], axis=1) for cols in groups.values()], axis=1)


def youden_thresholds(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict[str, float]:
    return {label: youden_threshold(truth[:, i], scores[:, i]) for i, label in enumerate(labels)}


def predict_experiment(exp_dir: Path, split: str = "test", calibrated: bool = False) -> dict:
    """Write ``private/predictions/<split>.csv``, ``results/<split>_*`` and the split's report (with
    ``calibrated``, recalibrated: ``<split>_calibrated`` in each name); return the metrics."""
    exp_dir = Path(exp_dir)
    files = Layout(exp_dir)
    scored = score_split(exp_dir, split, calibrated)
    metrics, fairness = write_predictions(files, scored, files.best, exp_dir.name, experiment_about(files, scored))
    _log_scalars(files.tensorboard, scored.output, metrics, fairness)
    return metrics


@dataclass
class Source:
    """A trained model to score data it was not trained on, with the decision thresholds of its own
    validation split: an experiment's best checkpoint (Youden's J on its validation split, computed on
    first use) or a release bundle (the thresholds it carries, chosen the same way)."""

    path: Path
    model: torch.nn.Module
    labels: list[str]
    epoch: int  # -1 for a bundle
    preprocessing: dict  # data.image_size, data.fit, data.histogram_equalization
    threshold_split: str  # "experiment valid" or "bundle"
    facts: dict  # model, training data and privacy statement: the first lines of a report
    guarantee: str  # the privacy statement in words (privacy.release.plain_statement)
    trained_on: str  # "<dataset>-<site>"
    epsilon: float | None  # spent on its training units; None when trained without DP (NaN: unknown)
    pretrained_from: str | None  # name of the checkpoint it was fine-tuned from; None: from scratch
    experiment: Trained | None = None  # None for a bundle
    _thresholds: dict[str, float] | None = None  # a bundle's, per model label
    _valid: tuple[np.ndarray, np.ndarray] | None = None  # an experiment's validation (labels, scores)
    calibration: dict | None = None  # the recalibration map it stores (best.pt or model.json); None: none

    def calibration_map(self) -> dict:
        """The stored recalibration map, for ``--calibrated``; InputError naming the file without one."""
        return require_map(self.calibration, Layout(self.path).best if self.experiment else self.path / "model.json",
                           self.labels)

    def thresholds(self, device: torch.device, groups: dict[str, list[int]]) -> dict[str, float]:
        """The model's threshold per scored label (:func:`side_groups`). An experiment's: Youden's J on
        its validation split (scored once), a merged label's on the merged labels and scores; a bundle's:
        those it carries, a merged label's the lower of its sides' (positive when either side would be
        at the lower threshold)."""
        if self.experiment is None:
            return {name: min(self._thresholds[self.labels[i]] for i in cols) for name, cols in groups.items()}
        if self._valid is None:
            cfg = self.experiment.cfg
            table = load_table(cfg.data, cfg.experiment.seed)
            self._valid = score_frame(self.model.to(device), device, table.split("valid"), table, cfg.data,
                                      cfg.training.physical_batch_size, f"{self.path.name} valid")
        truth, scores = self._valid
        return youden_thresholds(merge_columns(truth, groups), merge_columns(scores, groups), list(groups))

    def training_images(self) -> tuple[Path, set[str]] | None:
        """(dataset root, image paths) of the experiment's training split; None for a bundle."""
        if self.experiment is None:
            return None
        cfg = self.experiment.cfg
        table = load_table(cfg.data, cfg.experiment.seed, use_cache=False)
        return table.root, set(table.split("train")["path"])

    def training_pixels(self) -> set[str] | None:
        """Digests (:func:`pixel_digest`) of the experiment's training images, computed on first use into
        ``private/training_pixels.json`` (private like the images; recomputed when the data settings or
        the preprocessing change); None for a bundle, which holds no training data."""
        if self.experiment is None:
            return None
        cfg, path = self.experiment.cfg, Layout(self.path).training_pixels
        key = {"config_key": config_key(cfg), "preprocess_version": PREPROCESS_VERSION}
        if path.is_file():
            kept = read_json(path)
            if all(kept.get(name) == value for name, value in key.items()):
                return set(kept["digests"])
        table = load_table(cfg.data, cfg.experiment.seed)
        loader = evaluation_loader(table.split("train"), table, cfg.data, cfg.training.physical_batch_size)
        digests = sorted({pixel_digest(x) for batch, _ in tqdm(loader, desc=f"{self.path.name} training pixels",
                                                                unit="batch", leave=False) for x in batch})
        atomic_write_text(path, json_text({**key, "digests": digests}))
        return set(digests)


def pixel_digest(x: torch.Tensor) -> str:
    """SHA-256 of one image as the network sees it (preprocessed): the same for a copy of the image
    under another name or re-encoded with the same pixels."""
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def load_source(path: Path) -> Source:
    """The model of an experiment folder (``checkpoints/best.pt``) or of a release bundle."""
    path = Path(path)
    if is_bundle(path):
        rebuild, weights = read_bundle(path)
        model = build_model(rebuild["model"]["name"], len(rebuild["labels"]), rebuild["model"]["activation"],
                            rebuild["preprocessing"]["image_size"])
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise InputError(f"{path / 'model.safetensors'}: weights do not fit model {rebuild['model']['name']} "
                             f"({str(exc).splitlines()[0]})") from None
        card = read_json(path / "model_card.json") if (path / "model_card.json").is_file() else {}
        size, training, privacy = rebuild["preprocessing"]["image_size"], card.get("training", {}), card.get("privacy", {})
        trained_on = f"{training['dataset']}-{training['site']}" if training else "unknown"
        facts = {"model": f"{rebuild['model']['name']} ({rebuild['model']['activation']}), {size} px, release "
                          f"bundle {path.name}",
                 "trained on": trained_on if training else "unknown (no model_card.json)",
                 "privacy": privacy.get("statement", "unknown (no model_card.json)")}
        epsilon = privacy.get("epsilon", float("nan")) if privacy.get("private", rebuild["private"]) else None
        guarantee = privacy.get("in_words") or (plain_statement(None, None) if epsilon is None else facts["privacy"])
        return Source(path, model, list(rebuild["labels"]), -1, rebuild["preprocessing"], "bundle", facts, guarantee,
                      trained_on, epsilon, training.get("pretrained_from"), _thresholds=dict(rebuild["thresholds"]),
                      calibration=rebuild.get("calibration"))
    trained = load_trained(path)
    cfg, files = trained.cfg, Layout(path)
    summary = read_json(files.summary) if files.summary.is_file() else None
    facts = {"model": model_fact(cfg), "trained on": f"{cfg.data.dataset} site {cfg.data.site}, experiment {path.name}",
             "privacy": privacy_statement(summary["dp"]) if summary else "unknown (no private/summary.json)"}
    prep = {"image_size": cfg.data.image_size, "fit": cfg.data.fit,
            "histogram_equalization": cfg.data.histogram_equalization}
    epsilon = (worst_patient_epsilon(summary["dp"]) if summary else float("nan")) if cfg.dp.enabled else None
    guarantee = plain_privacy(summary["dp"]) if summary else facts["privacy"]
    return Source(path, trained.model, trained.labels, trained.epoch, prep, "experiment valid", facts, guarantee,
                  f"{cfg.data.dataset}-{cfg.data.site}", epsilon,
                  Path(cfg.model.pretrained_checkpoint).name if cfg.model.pretrained_checkpoint else None, trained,
                  calibration=trained.calibration)


SPLIT_CHOICES = ("test", "valid", "train", "all")


def score_external(source: Source, data: Config, split: str = "test", recalibrate: str | None = None,
                   calibrated: bool = False) -> Scored:
    """Score ``split`` (or ``all`` images) of the dataset ``data`` describes with ``source``.

    The dataset is read with the model's preprocessing and labels (matched through ``data.label_map``
    and ``data.merge_sides``); labels it lacks are listed as absent and not scored. Decision thresholds
    are the model's own unless ``recalibrate`` names a split of this dataset: then Youden's J on it,
    and its images are left out of what is scored. Images the experiment trained on are refused.
    ``calibrated``: scores and thresholds mapped by the model's stored recalibration (:func:`calibrate`).
    """
    if recalibrate is not None and recalibrate == split:
        raise InputError(f"--recalibrate {recalibrate}: thresholds chosen on the scored split would be optimistic; "
                         f"recalibrate on another split (its images are then left out of scoring)")
    stored = source.calibration_map() if calibrated else None
    cfg = external_config(source, data)
    key = config_key(cfg)
    table = load_table(cfg.data, cfg.experiment.seed, absent_ok=True)
    present = table.labels
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": present})})
    if split == "all":
        frame = table.frame[table.frame["split"] != recalibrate].reset_index(drop=True)
    else:
        frame = table.split(split)
    where = f"the {cfg.data.dataset} dataset at {table.root} (site {cfg.data.site})"
    if frame.empty:
        raise InputError(f"{where} has no images in the {split} split" + (
            f" once the {recalibrate} split is left out" if recalibrate else ""))
    trained_on = source.training_images()
    if trained_on and trained_on[0].resolve() == table.root.resolve():
        seen = frame["path"].isin(trained_on[1])
        if seen.any():
            raise InputError(f"{int(seen.sum())} image(s) of the {split} split of {where} are training images of "
                             f"{source.path} (first: {frame['path'][seen.idxmax()]}); score its test or valid "
                             f"split, or another dataset")
    device = resolve_device(cfg.training.device)
    model, batch = source.model.to(device), cfg.training.physical_batch_size
    every = side_groups(source.labels, cfg.data.merge_sides)
    groups = {label: every[label] for label in present}
    truth, scores = score_frame(model, device, frame, table, cfg.data, batch, f"{source.path.name} on {split}")
    scores = merge_columns(scores, groups)
    if recalibrate:
        ref_truth, ref_scores = score_frame(model, device, table.split(recalibrate), table, cfg.data, batch,
                                            f"{source.path.name} on {recalibrate}")
        thresholds = youden_thresholds(ref_truth, merge_columns(ref_scores, groups), present)
        threshold_split = f"external {recalibrate}"
    else:
        thresholds, threshold_split = source.thresholds(device, groups), source.threshold_split
    about = {"dataset": cfg.data.dataset, "site": cfg.data.site, "root": str(table.root), "split": split,
             "left_out_split": recalibrate if split == "all" else None, "labels": present, "absent": table.absent,
             "label_map": dict(cfg.data.label_map), "merge_sides": cfg.data.merge_sides,
             "source": str(source.path.resolve()), "checkpoint_epoch": source.epoch, "config_key": key}
    scored = Scored(cfg, split, frame, present, truth, scores, thresholds, threshold_split, source.epoch, about)
    return calibrate(scored, stored, source.labels, groups) if stored else scored


def external_config(source: Source, data: Config) -> Config:
    """``data`` (another dataset's config) with the model's labels (sides merged with its
    ``data.merge_sides``) and preprocessing."""
    labels = list(side_groups(source.labels, data.data.merge_sides))
    return validate(merge(data.model_dump(exclude={"derived"}), {"data": {"labels": labels, **source.preprocessing}}),
                    source=f"{source.path} + --data")


def config_key(cfg: Config) -> str:
    """Fingerprint of what decides an external score: the data and evaluation settings."""
    settings = json.dumps(cfg.model_dump(include={"data": True, "evaluation": True, "experiment": {"seed"}},
                                         mode="json"), sort_keys=True)
    return hashlib.sha1(settings.encode()).hexdigest()[:12]


def external_folder(source: Source, dataset: str, site: str, split: str, recalibrate: str | None) -> Path:
    """Default output folder: ``<experiment>/external/<dataset>-<site>-<split>`` (for a bundle,
    ``<bundle>_external/...`` beside it), never the experiment's own results."""
    name = f"{dataset}-{site}-{split}" + (f"-recalibrated-{recalibrate}" if recalibrate else "")
    parent = source.path / "external" if source.experiment else source.path.parent / f"{source.path.name}_external"
    return parent / name


def predict_external(source: Source, data: Config, split: str = "test", recalibrate: str | None = None,
                     out: Path | None = None, calibrated: bool = False) -> tuple[dict, Path]:
    """Score another dataset (:func:`score_external`) and write predictions, metrics, fairness and a
    report into ``out``; a folder holding another dataset's results is refused, never overwritten."""
    scored = score_external(source, data, split, recalibrate, calibrated)
    out = Path(out) if out else external_folder(source, scored.data["dataset"], scored.data["site"], split, recalibrate)
    earlier = Layout(out).results / f"{scored.output}_metrics.json"
    if earlier.is_file():
        before = read_json(earlier).get("data") or {}
        if any(before.get(key) != scored.data[key] for key in ("dataset", "site", "root", "source")):
            raise InputError(f"{out} holds the scores of {before.get('source')} on {before.get('dataset')} at "
                             f"{before.get('root')}; choose another --out")
    d = scored.data
    facts = {**source.facts, "scored on": f"{len(scored.frame)} images of {scored.frame['patient_id'].nunique()} "
                                          f"patients of the {split} split of {d['dataset']} site {d['site']} ({d['root']})"
             + (f", the {d['left_out_split']} split left out" if d["left_out_split"] else "")}
    if d["absent"]:
        facts["labels absent"] = f"{', '.join(d['absent'])}: not in this dataset, not scored"
    if d["label_map"] or d["merge_sides"]:
        facts["labels matched"] = ", ".join(f"{k} -> {v}" for k, v in d["label_map"].items()) + (
            " (right and left merged)" if d["merge_sides"] else "")
    about = {"facts": facts, "guarantee": source.guarantee, "private": source.epsilon is not None,
             "synthetic": "synthetic" in (d["dataset"], source.trained_on.split("-")[0])}
    metrics, _ = write_predictions(Layout(out), scored, source.path, f"{source.path.name} on {d['dataset']} "
                                                                     f"{d['site']}", about)
    return metrics, out


def images_folder(source: Source, images: Path, calibrated: bool = False) -> Path:
    """Default output folder of ``--images``: ``<experiment>/inference/<name>`` (for a bundle,
    ``<bundle>_inference/<name>`` beside it), named after the folder or CSV file scored, ``<name>_calibrated``
    with ``--calibrated``."""
    name = output_name((images.stem if images.is_file() else images.resolve().name) or "images", calibrated)
    parent = source.path / "inference" if source.experiment else source.path.parent / f"{source.path.name}_inference"
    return parent / name


@torch.no_grad()
def predict_images(source: Source, images: Path, out: Path | None = None,
                   calibrated: bool = False) -> tuple[dict, Path]:
    """Score new, unlabelled images (a folder or a CSV listing them, :mod:`data.unlabelled`) with
    ``source`` at its own thresholds, streamed one batch at a time; write ``scores.csv``,
    ``bad_images.csv`` and ``inference.json`` into ``out`` (default :func:`images_folder`), which must
    not hold files yet. ``calibrated``: probabilities and thresholds mapped by the model's stored
    recalibration, the model's own probabilities beside them. Returns (what inference.json says, out)."""
    images = Path(images).expanduser()
    stored = source.calibration_map() if calibrated else None
    listed, ignored = list_images(images)
    out = Path(out).expanduser() if out else images_folder(source, images, calibrated)
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out} already holds results; choose another --out (earlier results are never replaced)")
    if listed.empty:
        raise InputError(f"--images {images}: no image found (.png, .jpg, .jpeg, .dcm, .dicom, or DICOM by content)")
    training = source.training_images()
    if training:  # scores of training images are not covered by the privacy guarantee
        files = {os.path.realpath(training[0] / path) for path in training[1]}
        seen = [os.path.realpath(Path(root) / relative) in files for root, relative in zip(listed["root"],
                                                                                              listed["relative"])]
        if any(seen):
            raise InputError(f"--images {images}: {sum(seen)} image(s) are training images of {source.path} (first: "
                             f"{listed['path'][seen.index(True)]}); score only images the model was not trained on")
    trained_pixels = source.training_pixels()  # copies under other names; a bundle cannot tell
    trained = source.experiment
    device = trained.device if trained else resolve_device("auto")
    prep = source.preprocessing
    files = ImageFiles(listed, Preprocessing(prep["image_size"], prep["fit"], prep["histogram_equalization"]))
    # a bundle has no training settings: 32 images of at most 512 px are light on any machine
    loader = DataLoader(files, batch_size=trained.cfg.training.physical_batch_size if trained else 32,
                        num_workers=trained.cfg.data.num_workers if trained else 0)
    model = source.model.to(device).eval()
    scores, reasons = [], []
    for x, why in tqdm(loader, desc=f"{source.path.name} on {images.name}", unit="batch", leave=False):
        good = torch.tensor([not reason for reason in why], dtype=torch.bool)
        copied = [k for k, reason in enumerate(why) if trained_pixels and not reason
                  and pixel_digest(x[k]) in trained_pixels]
        if copied:
            raise InputError(f"--images {images}: {listed['path'].iloc[len(reasons) + copied[0]]} has the pixels of a "
                             f"training image of {source.path} (once preprocessed); score only images the model was "
                             f"not trained on")
        reasons += why
        if good.any():
            scores.append(torch.sigmoid(model(x[good].to(device)).float()).cpu().numpy())
    reasons = pd.Series(reasons, index=listed.index)
    bad = listed.loc[reasons != "", ["path"]].assign(reason=reasons[reasons != ""])
    # per kind of reason (the text before its first ':'), as prepare counts them
    per_reason = bad["reason"].str.split(":", n=1).str[0].value_counts().to_dict()
    if not scores:
        raise InputError(f"--images {images}: none of the {len(listed)} images is readable ("
                         + ", ".join(f"{kind}: {n}" for kind, n in per_reason.items()) + "); nothing scored")
    probabilities = np.concatenate(scores)
    thresholds = source.thresholds(device, side_groups(source.labels, merge=False))  # every output as it is
    if stored:
        raw, maps = probabilities, stored["labels"]
        probabilities = apply_recalibration(raw, source.labels, maps)
        thresholds = map_thresholds(thresholds, source.labels, maps)
    table = listed.loc[reasons == "", ["path", *[c for c in CARRIED if c in listed]]].reset_index(drop=True)
    for i, label in enumerate(source.labels):
        table[label] = probabilities[:, i]
        if stored:
            table[f"{label}_uncalibrated"] = raw[:, i]
        table[f"{label}_positive"] = (probabilities[:, i] >= thresholds[label]).astype(int)
    result = {"images": str(images), "source": {"path": str(source.path),
                                                "kind": "experiment" if trained else "release bundle",
                                                "checkpoint_epoch": source.epoch, **source.facts},
              "privacy": source.facts["privacy"], "labels": source.labels, "thresholds": thresholds,
              "threshold_split": source.threshold_split,
              "thresholds_from": threshold_source({"threshold_split": source.threshold_split, "recalibration": stored}),
              **({"recalibration": stored} if stored else {}),
              "positive": "probability >= threshold", "preprocessing": prep,
              "counts": {"images": len(listed), "scored": len(table), "bad": len(bad), "bad_per_reason": per_reason,
                         "other_files_ignored": ignored}}
    atomic_write_text(out / "scores.csv", table.to_csv(index=False))
    atomic_write_text(out / "bad_images.csv", bad.to_csv(index=False))
    atomic_write_text(out / "inference.json", json_text(result))
    return result, out


def model_fact(cfg: Config) -> str:
    start, d = cfg.model.pretrained_checkpoint, cfg.derived
    if start == PUBLIC_PRETRAINING:
        start = (f"pretrained non-privately on the {d.get('pretrained_site', cfg.pretraining.site)} site of "
                 f"{cfg.data.dataset}")
    else:
        start = f"pretrained from {Path(start).name}" if start else "trained from scratch"
    return f"{cfg.model.name} ({cfg.model.activation}), {cfg.data.image_size} px, {start}"


def experiment_about(files: Layout, scored: Scored) -> dict:
    """What a report says first: model, data (training sizes rounded, as on the model card), the
    privacy statement, and the validation and epsilon curves from TensorBoard."""
    cfg, derived = scored.cfg, scored.cfg.derived
    summary = read_json(files.summary) if files.summary.is_file() else None
    unit = derived.get("privacy_unit", "patient")
    facts = {"model": model_fact(cfg),
             "dataset": f"{cfg.data.dataset}{' site ' + cfg.data.site if cfg.data.site else ''}",
             "labels": ", ".join(cfg.data.labels),
             "trained on": f"about {rounded_count(derived['n_train_units']):,} {unit}s (about "
                           f"{rounded_count(derived['n_train']):,} images) of the training split"
             if "n_train_units" in derived else "unknown",
             "scored on": f"{len(scored.frame)} images of {scored.frame['patient_id'].nunique()} patients of the "
                          f"{scored.split} split (checkpoint of epoch {scored.epoch})",
             "privacy": privacy_statement(summary["dp"]) if summary else "unknown (no private/summary.json)"}
    if summary:
        facts["training"] = f"{summary['epochs_completed']} epochs, {summary['steps']} optimizer steps"
    return {"facts": facts, "curves": training_curves(files.tensorboard), "private": cfg.dp.enabled,
            "guarantee": plain_privacy(summary["dp"]) if summary else facts["privacy"],
            "synthetic": cfg.data.dataset == "synthetic"}


def training_curves(tensorboard: Path) -> dict[str, list[tuple[int, float]]]:
    """Validation loss, validation mean AUROC and epsilon over steps from an experiment's TensorBoard
    events (the last value per step, so a resumed run draws one curve)."""
    if not tensorboard.is_dir():
        return {}
    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    return {tag: sorted({e.step: e.value for e in events.Scalars(tag)}.items())
            for tag in ("valid/loss", "valid/auroc_mean", "privacy/epsilon") if tag in tags}


def write_predictions(files: Layout, scored: Scored, source: Path, title: str,
                      about: dict | None = None) -> tuple[dict, dict]:
    """Per-image predictions, metrics and fairness with their intervals, and the report of a scored
    split, into ``files``' private/predictions/, results/ and report, named ``scored.output`` (recalibrated:
    the calibration before and after, the model's own scores beside the mapped ones); returns (metrics,
    fairness)."""
    split, frame, labels, truth, scores = scored.split, scored.frame, scored.labels, scored.truth, scored.scores
    name, raw = scored.output, scored.uncalibrated
    out = frame[["image_id", "patient_id"]].copy()
    out["sex"] = frame["sex"].where(frame["sex"].isin(["F", "M"]), "")
    out["age"] = frame["age"]
    for i, label in enumerate(labels):
        out[label] = pd.Series(truth[:, i]).astype("Int64")  # empty where unlabelled
        out[f"{label}_score"] = scores[:, i]
        if raw is not None:
            out[f"{label}_score_uncalibrated"] = raw[:, i]
    metrics = {"split": split, "threshold_split": scored.threshold_split,
               "thresholds_optimistic": split == scored.threshold_split, "checkpoint_epoch": scored.epoch,
               **({"data": scored.data} if scored.data else {}),
               **({"recalibration": scored.recalibration} if scored.recalibration else {}),
               **split_metrics(truth, scores, labels, scored.thresholds)}
    evaluation = scored.cfg.evaluation
    # One set of resample counts for the metrics and every subgroup: all intervals are paired.
    weights, units, resampled = resampling(frame["patient_id"].to_numpy(), evaluation.bootstrap, evaluation.seed,
                                           evaluation.bootstrap_unit)
    if evaluation.bootstrap:
        add_intervals(metrics, bootstrap_intervals(truth, scores, labels, scored.thresholds, weights))
        metrics["bootstrap"] = {**resampled, "method": "percentile; Wilson for proportions with few events"}
    fairness = fairness_report(truth, scores, labels, scored.thresholds, frame["sex"].to_numpy(),
                               frame["age"].to_numpy(), evaluation.age_bins, weights, clusters=units,
                               min_size=evaluation.min_subgroup_size, min_positives=evaluation.min_positives,
                               min_negatives=evaluation.min_negatives, permutations=evaluation.permutations,
                               seed=evaluation.seed, no_finding=evaluation.no_finding_label)
    fairness.update(split=split, bootstrap=resampled)
    if len(truth) >= 2:  # the same groups, resamples and permutations: the calibration gaps join the q-values
        join_calibration(fairness, subgroup_calibration(
            truth, scores, labels, frame["sex"].to_numpy(), frame["age"].to_numpy(), evaluation.age_bins, weights,
            clusters=units, bins=evaluation.calibration_bins, min_size=evaluation.min_subgroup_size,
            permutations=evaluation.permutations, seed=evaluation.seed))
    else:  # as split_calibration: one image has no bins
        fairness["calibration"] = {"bins": None, "reason": f"not estimable: {len(truth)} scored image"}
    resamples = weights if evaluation.bootstrap else weights[:0]
    calibration = split_calibration(truth, scores, labels, resamples, evaluation)
    if raw is not None:
        calibration.update(recalibration=scored.recalibration,
                           uncalibrated=split_calibration(truth, raw, labels, resamples, evaluation))
    estimable = calibration if calibration["calibration"] else None
    metrics["calibration_mean"] = estimable and calibration["calibration"]["mean"]
    write_results(source, {
        files.predictions / f"{name}.csv": out.to_csv(index=False),
        files.results / f"{name}_metrics.json": json_text(metrics),
        files.results / f"{name}_fairness.json": json_text(fairness),
        files.results / f"{name}_fairness.csv": fairness_table(fairness).to_csv(index=False),
        files.results / f"{name}_calibration.json": json_text(calibration),
        files.report(name): page(f"{title}: {split} split" + (", recalibrated" if raw is not None else ""),
                                 prediction_sections(labels, truth, scores, metrics, fairness, about, estimable))})
    return metrics, fairness


def split_calibration(truth: np.ndarray, scores: np.ndarray, labels: list[str], weights: np.ndarray,
                      evaluation: Evaluation) -> dict:
    """Calibration per label with intervals under ``weights`` (none without resamples), reliability
    bins and decision curves (:mod:`evaluation.calibration`). More bins than scored images is refused
    (``InputError``, naming evaluation.calibration_bins) where fewer bins would do; a split of one
    image has no calibration."""
    if len(truth) < 2:
        return {"calibration": None, "decision_curves": None, "reason": f"not estimable: {len(truth)} scored image"}
    return {"calibration": calibration_report(truth, scores, labels, weights, evaluation.calibration_bins,
                                              evaluation.min_positives, evaluation.min_negatives),
            "decision_curves": {label: decision_curve(truth[:, i], scores[:, i], evaluation.decision_thresholds,
                                                      weights) for i, label in enumerate(labels)}}


def write_results(checkpoint: Path, outputs: dict[Path, str]) -> None:
    """Write result files recomputed from ``checkpoint``, saying which earlier ones they replace."""
    for path, text in outputs.items():
        if path.exists():
            print(f"replacing {path} (recomputed from {checkpoint})")
        atomic_write_text(path, text)


def _log_scalars(tensorboard: Path, split: str, metrics: dict, fairness: dict) -> None:
    """The headline numbers of a prediction, beside the training curves in TensorBoard."""
    scalars = {f"{split}/auroc_mean": metrics["auroc_mean"],
               **{f"{split}/auroc/{label}": m["auroc"] for label, m in metrics["labels"].items()},
               **{f"{split}/fairness/{attribute}/{name.replace(':', '/')}": entry["value"]
                  for attribute, fair in fairness["fairness"].items() for name, entry in fair["mean"].items()
                  if entry["value"] is not None}}
    curves = Curves(tensorboard, "The predictions, results and report are written apart")
    curves.add(scalars, metrics["checkpoint_epoch"])
    curves.close()


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
        rows.append(f"(95% intervals from {b['resamples']} bootstrap resamples of {b['units']} {b['unit']}s, seed "
                    f"{b['seed']}: percentile, Wilson for proportions with few events; {threshold_source(metrics)})")
    return "\n".join(rows)
