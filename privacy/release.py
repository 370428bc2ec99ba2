"""The release bundle: what of an experiment may leave the hospital, with the privacy statement.

``export EXPERIMENT_DIR OUT_DIR`` writes

* ``model.safetensors``: the weights of ``checkpoints/best.pt`` in a tensors-only format (loading
  runs no code);
* ``model.json``: what rebuilds the network and its input (architecture, labels, preprocessing), the
  decision thresholds of the experiment's test metrics and the recalibration map of best.pt (fit on the
  validation patients, counts rounded; ``predict --calibrated`` applies it);
* ``model_card.json`` and ``model_card.md``: the privacy statement (unit, epsilon, delta, adjacency,
  accountant, the number of units rounded, whether the noise was secret, what the guarantee covers and
  what it does not, and the privacy ledger's total for the same patients), the training recipe, and
  the test metrics with their intervals.

Nothing else: no config (exact dataset sizes and paths), no summary (un-noised training loss), no
resume checkpoint (secret noise state), no audit, no path of the training machine. Exact counts stay
private: N is given to two significant digits (at least to the ten), and so is every number that the
accountant derives from it (sample rate, noise multiplier, epsilons; epsilons rounded up): with the steps,
their exact values would give N back (the accountant used the exact values).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from artifacts import Layout, atomic_write_text, json_text, load_checkpoint, read_json
from config import PUBLIC_PRETRAINING, Config, InputError
from evaluation.calibration import describe_map
from models import resolve_trainable
from privacy.ledger import Ledger, released_level, test_use

BUNDLE_FORMAT = 1
FILES = ("model.safetensors", "model.json", "model_card.json", "model_card.md")


def rounded(value: float) -> float:
    """Two significant digits: enough to read, too coarse to count patients with."""
    return float(f"{value:.2g}")


def rounded_up(epsilon: float | None) -> float | None:
    """An epsilon to two significant digits, rounded up: a published guarantee may be looser than the
    proven one, never tighter, and no finer than what hides the exact number of training units."""
    if epsilon is None or not math.isfinite(epsilon) or epsilon <= 0:
        return epsilon
    near = rounded(epsilon)
    if near >= epsilon:
        return near
    unit = 10.0 ** (math.floor(math.log10(epsilon)) - 1)
    return rounded(math.ceil(epsilon / unit) * unit)


def rounded_count(n: int) -> int:
    """Two significant digits, and at least to the ten."""
    return max(10, int(round(n, -max(1, len(str(int(n))) - 2))))


def is_bundle(path: Path) -> bool:
    return (Path(path) / "model.json").is_file() and (Path(path) / "model.safetensors").is_file()


UNKNOWN_START = ("started from an external checkpoint of unknown provenance: if it was trained on these patients, "
                 "this guarantee does not hold for them")


def start_note(dp: dict) -> str | None:
    """What the weights a DP run started from (``summary.json`` ``dp.start``) do to its guarantee: None
    from scratch or from runs on other patients."""
    start = dp.get("start")
    if not start:
        return None
    if start["provenance"] == "unknown":
        return UNKNOWN_START
    if not start["same_patients"]:
        return None
    if start["unbounded"]:
        return f"NOT DP for the training {dp['unit']}s its starting weights were trained on ({start['note']})"
    return (f"composed with the runs its starting weights come from, which trained some of the same {dp['unit']}s "
            f"({start['note']})")


def unbounded_start(dp: dict) -> bool:
    """Whether the runs the weights started from left some of the training patients without a bound."""
    return bool((dp.get("start") or {}).get("unbounded"))


def statement_epsilon(dp: dict) -> float:
    """The epsilon a DP run states per training patient: its own, composed with the runs its weights come
    from where they trained the same patients and are bounded (unbounded: its own, for the others)."""
    start = dp.get("start") or {}
    return start["epsilon"] if start.get("same_patients") and not start["unbounded"] else dp["epsilon_spent"]


def worst_patient_epsilon(dp: dict) -> float:
    """The epsilon of a DP run's worst-off training patient: :func:`statement_epsilon`, or infinite when
    its starting weights trained some of its patients without a bound."""
    start = dp.get("start") or {}
    return math.inf if start.get("same_patients") and start["unbounded"] else statement_epsilon(dp)


def privacy_statement(dp: dict) -> str:
    """The one-sentence privacy statement of a run's ``summary.json`` ``dp`` section, fit for release
    (no exact count of training patients, epsilon rounded up: :func:`rounded_up`), with what the weights
    it started from do to it (:func:`start_note`)."""
    if not dp["enabled"]:
        return "NOT PRIVATE: trained without differential privacy; no privacy guarantee"
    reproducible, note = dp["noise"].startswith("reproducible"), start_note(dp)
    claim = (f"({rounded_up(statement_epsilon(dp)):g}, {dp['delta']:g})-DP for each "
             f"{'other ' if unbounded_start(dp) else ''}training {dp['unit']} "
             f"(add/remove adjacency, {dp['accountant'].upper()} accountant)")
    if note:
        claim = f"{note}; {claim}" if unbounded_start(dp) else f"{claim}; {note}"
    return (claim + ("; WARNING: the noise was seeded from a configuration value (reproducible mode), so the "
                     "guarantee does not hold against anyone who knows that seed" if reproducible
                     else "; the noise was secret"))


# Who a DP-SGD guarantee leaves out: every report and card that states the guarantee says so.
NOT_COVERED = ("validation patients: they chose the checkpoint and the decision thresholds",
               "test patients: their metrics are published by the researcher's choice",
               "other models released from the same patients: see the privacy ledger's total")


def not_covered(calibrated: bool) -> list[str]:
    """:data:`NOT_COVERED`, saying with ``calibrated`` that the calibration map was fit on the validation
    patients too."""
    return [NOT_COVERED[0] + (", and the calibration map was fit on them" if calibrated else ""), *NOT_COVERED[1:]]


def bundle_map(stored: dict | None) -> dict | None:
    """A checkpoint's recalibration map as a bundle carries it: the validation counts rounded as the
    training counts are (:func:`rounded_count`): with the test counts they would give those back."""
    return stored and {**stored, "patients": rounded_count(stored["patients"]),
                       "images": rounded_count(stored["images"]), "counts_rounded": True}


def calibration_words(stored: dict | None, private: bool) -> str:
    """The model card's line on the calibration map: what it is and whom it was fit on, or 'none'."""
    if not stored:
        return "none"
    return describe_map(stored) + (" (not protected by the DP guarantee)" if private else "")


def test_use_note(use: dict | None, exact: bool) -> str | None:
    """What other runs did with a run's test patients (:func:`privacy.ledger.test_use`), with exact counts
    only for private files; None when no other run trained them (or it was not recorded)."""
    if not use or not use["runs"]:
        return None
    whom = f"{use['patients']} of its {use['of']} test patients" if exact else "some of its test patients"
    return (f"{len(use['runs'])} other run(s) on this dataset trained {whom} ({', '.join(use['runs'])}; an audit's "
            f"reference runs train on about half of the train and test patients each), recorded in the privacy ledger")


EPSILON_MEANING = ("Epsilon bounds how much any one patient can change what training produces: the smaller it is, the "
                   "less the model can reveal about any one patient (see docs/privacy.md).")


def plain_statement(epsilon: float | None, delta: float | None, unit: str = "patient",
                    reproducible: bool = False) -> str:
    """The guarantee in words: (epsilon, delta)-DP means that for every outcome S of training and any
    two training sets D, D' differing in one unit, P[M(D) in S] <= e^epsilon P[M(D') in S] + delta.
    ``epsilon`` None: trained without differential privacy. Give it rounded (:func:`rounded_up`)."""
    if epsilon is None:
        return ("Not private: trained without differential privacy, so the training patients have no formal "
                "protection against what the model reveals about them.")
    factor = f"{float(f'{math.exp(epsilon):.2g}'):,g}" if epsilon < 20 else f"{math.exp(epsilon):.1e}"
    return (f"Differentially private with epsilon {epsilon:g} (delta {delta:g}) per training {unit}: adding or "
            f"removing all images of any one {unit} changes the probability of any outcome of training by at most a "
            f"factor e^{epsilon:g} (about {factor}), except with probability at most {delta:g}."
            + (" Warning: the noise was seeded from a configuration value (reproducible mode), so this does not hold "
               "against anyone who knows that seed." if reproducible else ""))


def plain_privacy(dp: dict) -> str:
    """:func:`plain_statement` of a run's ``summary.json`` ``dp`` section, epsilon rounded up."""
    if not dp["enabled"]:
        return plain_statement(None, None)
    words = plain_statement(rounded_up(statement_epsilon(dp)), dp["delta"], dp["unit"],
                            dp["noise"].startswith("reproducible"))
    if unbounded_start(dp):
        return (f"Not private for the training {dp['unit']}s its starting weights were trained on without a bound: "
                f"they have no formal protection. For the other training {dp['unit']}s: {words}")
    return words


def model_card(cfg: Config, summary: dict, metrics: dict, parameters: int, epoch: int, ledger_total: dict,
               tests_trained: dict | None = None, calibration: dict | None = None) -> dict:
    """The card of a trained experiment (``summary.json`` and the test split's metrics); ``ledger_total``:
    every released run composed for its training patients; ``tests_trained``: which other runs trained its
    test patients (:func:`privacy.ledger.test_use`); ``calibration``: the bundle's recalibration map."""
    dp, d = summary["dp"], cfg.derived
    private = dp["enabled"]
    privacy = {"private": private}
    if private:
        unit = dp["unit"]
        starting, tests = start_note(dp), test_use_note(tests_trained, exact=False)
        # a start of unknown provenance, or runs that left some training patients unbounded, limit the guarantee
        limits = [starting] if starting and (unbounded_start(dp) or dp["start"]["provenance"] == "unknown") else []
        limits += [f"test patients: {tests}"] if tests else []
        privacy.update(
            unit=unit, epsilon=rounded_up(statement_epsilon(dp)), epsilon_this_run=rounded_up(dp["epsilon_spent"]),
            delta=dp["delta"], starting_weights=starting,
            adjacency=f"add or remove one {unit} (all of the {unit}'s training images)",
            accountant=f"{dp['accountant'].upper()} (Opacus), Poisson sampling",
            epsilon_pld={k: rounded_up(v) for k, v in dp["pld_epsilon"].items()} if dp["pld_epsilon"] else None,
            units=f"about {rounded_count(dp['units']):,} training {unit}s", sample_rate=rounded(dp["sample_rate"]),
            steps=summary["steps"], noise_multiplier=rounded(dp["noise_multiplier"]),
            max_grad_norm=dp["max_grad_norm"], noise=dp["noise"], secure_mode=dp["secure_mode"],
            covers=f"the training {unit}s" + (" its starting weights were not trained on" * unbounded_start(dp)),
            does_not_cover=not_covered(bool(calibration)) + limits,
            loss_weights=d.get("pos_weight_source"),
            ledger_total={**ledger_total, "epsilon": rounded_up(ledger_total["epsilon"])
                          if math.isfinite(ledger_total["epsilon"]) else None},
            rounding=f"to two significant digits (epsilons rounded up, the number of {unit}s at least to the ten): "
                     f"exact values would give away the number of training {unit}s")
    privacy["statement"] = privacy_statement(dp)
    privacy["in_words"] = plain_privacy(dp)
    evaluation = None
    if metrics:
        evaluation = {"split": metrics["split"], "images": max(m["n"] for m in metrics["labels"].values()),
                      "auroc_mean": metrics["auroc_mean"], "auroc_mean_ci95": metrics.get("auroc_mean_ci95"),
                      "thresholds": f"Youden's J on the {metrics['threshold_split']} split",
                      "labels": {label: {"auroc": m["auroc"], "auroc_ci95": m.get("ci95", {}).get("auroc"),
                                         "sensitivity": m["sensitivity"], "specificity": m["specificity"]}
                                 for label, m in metrics["labels"].items()}}
    training = cfg.training
    return {
        "format": BUNDLE_FORMAT, "exported": time.strftime("%Y-%m-%d"), "experiment": summary["experiment"],
        "model": {"architecture": cfg.model.name, "activation": cfg.model.activation, "parameters": parameters,
                  "input": f"1 x {cfg.data.image_size} x {cfg.data.image_size} grayscale",
                  "labels": list(cfg.data.labels)},
        "calibration": calibration_words(calibration, private),
        "training": {"dataset": cfg.data.dataset, "site": cfg.data.site, "epochs": summary["epochs_completed"],
                     "checkpoint": f"best mean validation AUROC, epoch {epoch}", "optimizer": training.optimizer,
                     "learning_rate": training.lr, "logical_batch_size": training.logical_batch_size,
                     "pretrained_from": _start(cfg), **recipe(cfg)},
        "privacy": privacy, "evaluation": evaluation}


def _start(cfg: Config) -> str | None:
    """Where the weights started, without a path of the training machine."""
    start, d = cfg.model.pretrained_checkpoint, cfg.derived
    if start == PUBLIC_PRETRAINING:
        return (f"a non-private model pretrained on the {d['pretrained_site']} site of {cfg.data.dataset} (about "
                f"{rounded_count(d['pretrained_patients']):,} other patients, not covered by this statement)")
    return Path(start).name if start else None


def recipe(cfg: Config) -> dict:
    """The training choices a reader of the card needs besides the privacy parameters."""
    training, augment = cfg.training, cfg.training.augment
    changes = {k: v for k, v in augment.model_dump().items() if v}
    trainable = resolve_trainable(training.trainable, bool(cfg.model.pretrained_checkpoint))
    return {"trainable": trainable if isinstance(trainable, str) else list(trainable),
            "augmentation": changes or None, "augmented_views_per_image": cfg.dp.augmult,
            "schedule": f"{training.schedule}, {training.warmup_steps} warm-up steps",
            "weight_average": (f"exponential moving average of the weights, decay {training.ema:g}; post-processing "
                               f"of the noised iterates, so it costs no privacy" if training.ema else None)}


def card_markdown(card: dict) -> str:
    """The card as a page a data-protection officer reads."""
    privacy, model, training, evaluation = card["privacy"], card["model"], card["training"], card["evaluation"]
    lines = [f"# Model card: {card['experiment']}", "", f"**Privacy statement.** {privacy['statement']}.", "",
             privacy["in_words"] + (f" {EPSILON_MEANING}" if privacy["private"] else ""), ""]
    if privacy["private"]:
        total = privacy["ledger_total"]
        lines += ["## Privacy", "",
                  f"- Unit of privacy: one {privacy['unit']}; neighbouring datasets: {privacy['adjacency']}.",
                  f"- This run: epsilon {privacy['epsilon_this_run']:.4g} at delta {privacy['delta']:g}, "
                  f"{privacy['accountant']}; {privacy['steps']} steps at sample rate about {privacy['sample_rate']:g} "
                  f"among {privacy['units']}; noise multiplier {privacy['noise_multiplier']:.4g}, clipping norm "
                  f"{privacy['max_grad_norm']:g}.",
                  *([f"- Starting weights: {privacy['starting_weights']}."] if privacy["starting_weights"] else []),
                  f"- Noise: {privacy['noise']}; floating-point-attack-resistant sampling: "
                  f"{'yes' if privacy['secure_mode'] else 'no'}.",
                  f"- Loss weights: {privacy['loss_weights']}.",
                  f"- Covers: {privacy['covers']}. Does not cover: " + "; ".join(privacy["does_not_cover"]) + ".",
                  f"- All models released from its training {privacy['unit']}s so far, this one included, composed: "
                  + (f"epsilon {total['epsilon']:.4g}" if total["epsilon"] is not None else "unbounded")
                  + f" for the worst-off {privacy['unit']} ({total['note']}).",
                  "- Under replace-one adjacency (PLD): epsilon "
                  + (f"{privacy['epsilon_pld']['replace_one']:.4g}." if privacy["epsilon_pld"] else "not computed."),
                  f"- Numbers rounded {privacy['rounding']}.", ""]
    lines += ["## Model", "", f"- {model['architecture']} ({model['activation']}), {model['parameters']:,} "
              f"parameters, input {model['input']}.", f"- Labels: {', '.join(model['labels'])}.",
              f"- Calibration map: {card['calibration']}.", "",
              "## Training", "",
              f"- Data: {training['dataset']}, site {training['site']}; epochs: {training['epochs']}, "
              f"{training['optimizer']} at learning rate {training['learning_rate']:g} ({training['schedule']}), "
              f"logical batch {training['logical_batch_size']}; {training['checkpoint']}; initialised from "
              f"{training['pretrained_from'] or 'random weights'}; trained: {training['trainable']}.",
              f"- Augmentation: {training['augmentation'] or 'none'}; {training['augmented_views_per_image']} "
              f"view(s) of each image per step, averaged before the clip.",
              f"- Weights released: {training['weight_average'] or 'the last iterate of the chosen epoch'}.", ""]
    if evaluation:
        def ci(interval):
            return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        lines += ["## Evaluation", "",
                  f"{evaluation['images']} images of the {evaluation['split']} split; thresholds by "
                  f"{evaluation['thresholds']}; 95% bootstrap intervals.", "",
                  "| label | AUROC | sensitivity | specificity |", "|---|---|---|---|"]
        lines += [f"| {label} | {m['auroc']:.3f}{ci(m['auroc_ci95'])} | {m['sensitivity']:.3f} | "
                  f"{m['specificity']:.3f} |" for label, m in evaluation["labels"].items()]
        lines += [f"| mean | {evaluation['auroc_mean']:.3f}{ci(evaluation['auroc_mean_ci95'])} | | |", ""]
    return "\n".join(lines)


def export_bundle(exp_dir: Path, out_dir: Path, cfg: Config, non_private: bool = False) -> dict:
    """Write the release bundle of ``exp_dir`` into the new folder ``out_dir``; return the card."""
    files, out_dir = Layout(exp_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not empty; export into a new folder")
    if (files.root / ".lock").exists():
        raise InputError(f"{exp_dir} is being trained ({files.root / '.lock'}); export once training has finished")
    if not files.summary.is_file():
        raise InputError(f"{exp_dir}: no private/summary.json; train the experiment first")
    summary = read_json(files.summary)
    if not summary["dp"]["enabled"] and not non_private:
        raise InputError(f"{exp_dir} was trained without differential privacy; export it only with --non-private, "
                         f"and its card will say that it carries no privacy guarantee")
    metrics_path = files.results / "test_metrics.json"
    if not metrics_path.is_file():
        raise InputError(f"{exp_dir}: no results/test_metrics.json; run `python main_2D_DP.py predict {exp_dir}` "
                         f"first (the card carries the test metrics and the bundle the decision thresholds)")
    metrics = read_json(metrics_path)
    best = load_checkpoint(files.best)
    weights = {k: v.contiguous() for k, v in best["model"].items()}
    ledger, run_id = Ledger.of_experiment(cfg, exp_dir), cfg.derived["run_id"]
    ledger.release(run_id, "export")  # before the bundle: a failed write overstates, never hides
    total = {"epsilon": None, "note": "non-private run"}
    if summary["dp"]["enabled"]:  # for its training patients: this model and every run released before it
        patients = ledger.entry(run_id).get("patients")
        level = released_level(ledger.entries(), cfg.dp.accountant, summary["dp"]["delta"],
                               among=None if patients is None else set(patients))
        total = {"epsilon": level.epsilon, "note": level.note}
    calibration = bundle_map(best.get("calibration"))
    card = model_card(cfg, summary, metrics, sum(v.numel() for v in weights.values()), best["epoch"], total,
                      test_use(ledger, run_id), calibration)
    rebuild = {"format": BUNDLE_FORMAT, "model": {"name": cfg.model.name, "activation": cfg.model.activation},
               "labels": list(cfg.data.labels),
               "preprocessing": {"image_size": cfg.data.image_size, "fit": cfg.data.fit,
                                 "histogram_equalization": cfg.data.histogram_equalization},
               "thresholds": {label: m["threshold"] for label, m in metrics["labels"].items()},
               "threshold_source": card["evaluation"]["thresholds"], "private": summary["dp"]["enabled"],
               "calibration": calibration}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": f"dp-cxr-{BUNDLE_FORMAT}"})
    atomic_write_text(out_dir / "model.json", json_text(rebuild))
    atomic_write_text(out_dir / "model_card.json", json_text(card))
    atomic_write_text(out_dir / "model_card.md", card_markdown(card))
    return card


def read_bundle(bundle: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model.json, weights) of a release bundle."""
    bundle = Path(bundle)
    try:
        rebuild = read_json(bundle / "model.json")
        weights = load_file(str(bundle / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{bundle}: not a readable DP-CXR release bundle ({type(exc).__name__}: {exc})") from None
    if rebuild.get("format") != BUNDLE_FORMAT:
        raise InputError(f"{bundle / 'model.json'}: bundle format {rebuild.get('format')!r}, expected {BUNDLE_FORMAT}")
    return rebuild, weights
