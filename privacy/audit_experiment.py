"""The privacy audit of an experiment: score its training and test images (and canaries) with its
model, run the attacks and the one-run bound of :mod:`privacy.audit`, and write the private results."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from artifacts import Curves, Layout, json_text, read_json
from config import InputError
from data.dataset import evaluation_loader, load_table
from evaluation.bootstrap import resampling
from evaluation.report import audit_sections, page
from privacy import default_delta
from privacy.audit import (attack_report, attack_table, canary_bound, lira_offline, membership_candidates,
                           signed_logit)
from privacy.canaries import canary_scores, check_record, draw_canaries, reference_patients
from Prediction_DP import load_trained, predict_logits, write_results
from Train_Valid_DP import MaskedBCEWithLogitsLoss, restate_test_patients


def audit_experiment(exp_dir: Path, reference_dirs: list[Path] = (), checkpoint: str = "best") -> dict:
    """Membership inference against the model of ``checkpoint`` (best: the one predict uses; last: the
    end of training) and, when it was trained with canaries, the one-run lower bound on epsilon
    (``privacy.audit``). Writes, all private (``private/audit/``: scores of training images),
    ``audit.json``, ``audit_attacks.csv``, per-image scores ``audit_scores.csv`` (and
    ``audit_canaries.csv``) and ``report.html``; returns the audit. Reference runs are scored with
    their best checkpoint; they trained on half of the train and test patients each, booked in the
    privacy ledger under those patients, which the audit and the experiment's statement now say
    (:func:`Train_Valid_DP.restate_test_patients`).

    The bound of a non-private run is computed at ``dp.delta`` if set, else at the delta a DP run on
    the same data would get."""
    exp_dir = Path(exp_dir)
    best = load_trained(exp_dir, checkpoint)
    cfg, labels, seed = best.cfg, best.labels, best.cfg.experiment.seed
    if cfg.audit.reference is not None:
        raise InputError(f"{exp_dir} is reference run {cfg.audit.reference} of an audit; audit the experiment itself")
    files = Layout(exp_dir)
    if not files.summary.is_file():
        raise InputError(f"{exp_dir}: no private/summary.json; train the experiment to the end of an epoch first")
    dp = read_json(files.summary)["dp"]
    table = load_table(cfg.data, seed)
    canaries = None
    if cfg.audit.canaries:
        canaries = draw_canaries(table.split("train"), labels, cfg.audit.canaries, seed)
        check_record(files.audit / "canaries.csv", canaries, required=True)
    candidates = membership_candidates(table.frame, labels, set() if canaries is None else set(canaries["image_id"]))
    member = candidates["member"].to_numpy(bool)
    loader = evaluation_loader(candidates, table, cfg.data, cfg.training.physical_batch_size)
    logits, targets = predict_logits(best.model, loader, best.device, desc=f"{exp_dir.name} audit")
    per_image_loss = MaskedBCEWithLogitsLoss(torch.tensor([cfg.derived["pos_weight"][label] for label in labels]),
                                             reduction="none")
    scores = {"loss": -per_image_loss(logits, targets).double().numpy()}
    if reference_dirs:
        phi, left_out = [], []
        for ref_dir in reference_dirs:
            ref = load_trained(ref_dir)
            if ref.cfg.audit.reference is None or ref.cfg.data != cfg.data or ref.cfg.experiment.seed != seed:
                raise InputError(f"{ref_dir}: not a reference run of {exp_dir} (another role, data or seed)")
            ref_logits, ref_targets = predict_logits(ref.model, loader, ref.device, desc=f"reference {ref_dir.name}")
            phi.append(signed_logit(ref_logits, ref_targets))
            left_out.append(~reference_patients(candidates["patient_id"], ref.cfg.audit.reference, seed))
        scores["lira_offline"] = lira_offline(signed_logit(logits, targets), np.stack(phi), np.stack(left_out))

    evaluation = cfg.evaluation
    weights, _, resampled = resampling(candidates["patient_id"].to_numpy(), evaluation.bootstrap, evaluation.seed,
                                       evaluation.bootstrap_unit)
    sex, age = candidates["sex"].to_numpy(), candidates["age"].to_numpy()
    attacks = {name: attack_report(member, score, weights, sex, age, evaluation.age_bins, evaluation.min_subgroup_size)
               for name, score in scores.items()}
    reference_note = None
    if reference_dirs:  # the experiment's statement says it too, with every run that trained its test patients
        use = restate_test_patients(cfg, exp_dir)
        reference_note = (f"{len(reference_dirs)} reference runs were trained, each on about half of the train and "
                          f"test patients, and are booked in the privacy ledger under the patients they trained: the "
                          f"test patients (the non-members) are no longer untouched by training"
                          + (f" (other runs trained {use['patients']} of the {use['of']} test patients in all)"
                             if use else ""))
    audit = {"experiment": exp_dir.name, "checkpoint": checkpoint, "checkpoint_epoch": best.epoch,
             "members": int(member.sum()), "nonmembers": int((~member).sum()), "member_split": "train",
             "nonmember_split": "test",
             "dp": {"enabled": dp["enabled"], "epsilon_spent": dp["epsilon_spent"], "delta": dp["delta"]},
             "bootstrap": resampled,
             "reference_runs": [str(path) for path in reference_dirs], "reference_training": reference_note,
             "attacks": attacks,
             "attacks_note": (f"Offline LiRA calibrated with {len(reference_dirs)} reference runs. {reference_note}."
                              if reference_dirs else "No reference runs: the calibrated attack (offline LiRA) needs "
                              "`audit --reference-models K`."),
             "canaries": None}
    out = candidates[["image_id", "patient_id", "sex", "age", "member"]].assign(training_loss=-scores["loss"], **scores)
    outputs = {files.audit / "audit_scores.csv": out.to_csv(index=False)}
    if canaries is not None:
        canary_loader = evaluation_loader(canaries.assign(path=table.split("train").set_index("image_id").loc[
            canaries["image_id"], "path"].to_numpy()), table, cfg.data, cfg.training.physical_batch_size)
        canary_logits, canary_targets = predict_logits(best.model, canary_loader, best.device, desc="canaries")
        scored = canary_scores(canaries, -per_image_loss(canary_logits, canary_targets).double().numpy())
        units = cfg.derived.get("n_train_units", cfg.derived["n_train"])  # folders from before privacy units: images
        delta = dp["delta"] if dp["enabled"] else cfg.dp.delta or default_delta(units)
        audit["canaries"] = canary_bound(scored["score"].to_numpy(), scored["included"].to_numpy(), delta)
        audit["canaries"]["exceeds_accounted_epsilon"] = bool(
            dp["enabled"] and audit["canaries"]["epsilon_lower_bound"] > dp["epsilon_spent"])
        outputs[files.audit / "audit_canaries.csv"] = scored.to_csv(index=False)
    outputs[files.audit / "audit.json"] = json_text(audit)
    attack_rows = attack_table(audit)
    outputs[files.audit / "audit_attacks.csv"] = attack_rows.to_csv(index=False)
    outputs[files.audit / "report.html"] = page(f"{exp_dir.name}: privacy audit (private)", audit_sections(
        audit, attack_rows, out, scored if canaries is not None else None))
    write_results(files.checkpoint(checkpoint), outputs)
    curves = Curves(files.tensorboard, "The audit's results and report are written apart")
    curves.add({**{f"audit/{name}/attack_auroc": attack["overall"]["auroc"]["value"] for name, attack in attacks.items()},
                **({"audit/epsilon_lower_bound": audit["canaries"]["epsilon_lower_bound"]} if audit["canaries"] else {})},
               best.epoch)
    curves.close()
    return audit




def format_audit(audit: dict) -> str:
    """Headline of an audit: each attack's AUROC and TPR at low FPR, then the canary bound."""
    def value(metric):
        ci = metric["ci95"]
        return f"{metric['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    rows = [f"membership inference: {audit['members']} members (train) vs {audit['nonmembers']} non-members (test)"]
    for name, attack in audit["attacks"].items():
        overall = attack["overall"]
        tprs = ", ".join(f"TPR at {float(k.rsplit('_', 1)[1]):.1%} FPR {value(m)}" for k, m in overall.items()
                         if k.startswith("tpr_at_fpr_"))
        rows.append(f"  {name:13s} AUROC {value(overall['auroc'])}; {tprs}")
    rows.append(f"  ({audit['attacks_note']})")
    bound, dp = audit["canaries"], audit["dp"]
    if bound:
        accounted = f"accounted epsilon {dp['epsilon_spent']:.3f}" if dp["enabled"] else "non-private run"
        rows.append(f"one-run audit: {bound['canaries']} canary patients, {bound['correct']} of {bound['guesses']} guesses "
                    f"right; epsilon >= {bound['epsilon_lower_bound']:.3f} at 95% confidence "
                    f"(delta {bound['delta']:g}); {accounted}")
        if bound["exceeds_accounted_epsilon"]:
            rows.append("WARNING: the empirical lower bound exceeds the accounted epsilon: the privacy accounting or "
                        "the training does not hold what it claims (or a 5% chance event); investigate before release")
    else:
        rows.append("one-run audit: no canaries (train --audit-canaries M to get an epsilon lower bound)")
    return "\n".join(rows)
