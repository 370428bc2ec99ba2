"""DP-CXR command line.

    python main_2D_DP.py                      train with configs/config.yaml, then predict on test
    python main_2D_DP.py train [--config FILE] [--name NAME] [--resume [--allow-budget-increase]]
                               [--audit-canaries M] [--set KEY=VALUE ...]
    python main_2D_DP.py predict EXPERIMENT_DIR [--split test|valid] [--calibrated]
    python main_2D_DP.py predict EXPERIMENT_OR_BUNDLE --data DATA_CONFIG [--split test|valid|train|all]
                               [--recalibrate SPLIT] [--calibrated] [--out DIR] [--set ...]
    python main_2D_DP.py predict EXPERIMENT_OR_BUNDLE --images FOLDER_OR_CSV [--calibrated] [--out DIR]
    python main_2D_DP.py export EXPERIMENT_DIR OUT_DIR [--non-private]
    python main_2D_DP.py compare EXP_A EXP_B [--split test|valid] [--out DIR]
    python main_2D_DP.py transfer --experiments DIR [DIR ...] --data CONFIG [CONFIG ...] [--split S] [--out DIR]
    python main_2D_DP.py sweep --epsilons inf,8,4,1 [--seeds K] [--audit [--audit-canaries M]] [--name NAME] [--config FILE]
                               [--set KEY=VALUE ...] [--non-private-set KEY=VALUE ...]
    python main_2D_DP.py audit EXPERIMENT_DIR [--reference-models K] [--checkpoint best|last]
    python main_2D_DP.py ledger [--dataset NAME] [--config FILE] [--delta D] [--accountant rdp|prv] [--set ...]
                               [--released EXPERIMENT_DIR ...] [--internal EXPERIMENT_DIR ...] [--migrate FOLDER]
    python main_2D_DP.py data describe [--config FILE] [--set KEY=VALUE ...]
    python main_2D_DP.py prepare [--config FILE] [--set KEY=VALUE ...]

Exit codes: 0 success, 2 bad input (config, paths, data, checkpoints), 1 anything else (a result that
cannot be written, a non-finite loss), each with a message naming the file, key or step.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import pandas as pd

import parallel
from artifacts import Layout, OutputError, atomic_write_text, expect_folder, json_text, private_folder, read_json
from config import InputError, check_name, load_config, merge, parse_overrides, validate
from data.cache import check_bad_share, prepare
from data.dataset import cache_location, describe, load_table, preprocessing
from evaluation.bootstrap import format_p, resampling
from evaluation.compare_experiments import compare_experiments, format_comparison
from evaluation.report import sweep_report, transfer_report
from evaluation.transfer import matrix, transfer_matrix
from evaluation.sweep import (add_q_values, audit_columns, log_sweep_hparams, paired_differences, run_resamples,
                              sweep_row, trends)
from privacy.ledger import (Ledger, describe as describe_ledger, earlier_default, ledger_root, migrate,
                            refuse_earlier_format)
from privacy.release import FILES as RELEASE_FILES, export_bundle, is_bundle
from privacy.audit_experiment import audit_experiment, format_audit
from Prediction_DP import (SPLIT_CHOICES, format_metrics, load_experiment_config, load_source, output_name,
                           predict_experiment, predict_external, predict_images)
from Train_Valid_DP import TrainingStopped, check_resume_compatible, train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "config.yaml"


def _experiment_name(cfg) -> str:
    privacy = f"eps{cfg.dp.epsilon:g}" if cfg.dp.enabled and cfg.dp.epsilon else (
        f"sigma{cfg.dp.noise_multiplier:g}" if cfg.dp.enabled else "nonprivate")
    return f"{cfg.data.dataset}-{cfg.data.site}_{cfg.model.name}_{privacy}_{time.strftime('%Y%m%d-%H%M%S')}"


def run_train(config: Path | None, name: str | None, resume: bool, overrides: list[str],
              allow_budget_increase: bool = False) -> Path | None:
    """Resolve the config and experiment folder, refuse unsafe reuse, train; return the folder.

    Under torchrun every rank trains; rank 0 decides the folder (its name has a timestamp) and is
    the only one to get it back (the others return None: prediction and reports are rank 0's).
    """
    # the name as a YAML string: `--name null`, `--name 42` or `--name 2024-06-01` are names, not values
    overrides = list(overrides) + ([f"experiment.name={json.dumps(check_name(name, '--name'))}"] if name else [])
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    cuda = parallel.resolve_device(cfg.training.device).type == "cuda"
    ranks = parallel.start(cuda, cfg.training.distributed_timeout_s)
    try:
        checked = _resolve_experiment(cfg, config, resume, overrides) if ranks.main else None
    except InputError as exc:
        checked = exc
    checked = parallel.from_main(ranks, checked)
    if isinstance(checked, InputError):
        raise checked
    cfg, exp_dir = checked
    if ranks.main:
        print(f"experiment folder: {exp_dir}" + (f" ({ranks.world} processes)" if ranks.distributed else ""))
    try:
        train(cfg, exp_dir, resume=resume, allow_budget_increase=allow_budget_increase, ranks=ranks)
    except (KeyboardInterrupt, Terminated) as exc:
        exc.hint = (f"private/last.pt keeps the progress saved so far; continue with: python main_2D_DP.py train "
                    f"--name {exp_dir.name} --resume")
        raise
    finally:
        parallel.finish(ranks)
    return exp_dir if ranks.main else None


def _resolve_experiment(cfg, config: Path | None, resume: bool, overrides: list[str]):
    """(config to train, experiment folder), refusing to overwrite or to resume what does not exist."""
    if resume and not cfg.experiment.name:
        raise InputError("--resume needs the experiment's name (--name NAME or experiment.name)")
    exp_dir = inside(Path(cfg.output.target_dir), cfg.experiment.name or _experiment_name(cfg), "experiment.name")
    if resume:
        if not Layout(exp_dir).config.is_file():
            raise InputError(f"--resume: no experiment at {exp_dir}")
        saved = load_experiment_config(exp_dir)
        if config is None:  # continue the saved settings; --set may still change what is resumable
            raw = saved.model_dump(exclude={"derived"})
            cfg = validate(merge(raw, parse_overrides(overrides)), source=f"{exp_dir / 'config.yaml'} + --set")
        check_resume_compatible(saved, cfg)
    elif exp_dir.exists() and any(p.is_file() and p.name != ".lock" for p in exp_dir.rglob("*")):
        # a folder holding only a lock (a run killed before it wrote its config) is started afresh
        raise InputError(f"experiment {exp_dir} already exists; use --resume to continue it or --name for a new one")
    return cfg, exp_dir


def inside(target_dir: Path, name: str, what: str) -> Path:
    """``target_dir / name`` for a checked folder name, refused when it resolves outside ``target_dir``
    (a symlink pointing elsewhere)."""
    expect_folder(target_dir, "output.target_dir")
    folder = target_dir / check_name(name, what)
    if not folder.resolve().is_relative_to(target_dir.resolve()):
        raise InputError(f"{what}: {folder} resolves to {folder.resolve()}, outside {target_dir}; choose another name")
    return folder


def run_predict(source: Path, split: str, data: Path | None = None, overrides: list[str] = (),
                out: Path | None = None, recalibrate: str | None = None, calibrated: bool = False) -> Path:
    """Score a split of an experiment's own dataset with its best.pt or, given a data config, a split
    of another dataset with an experiment or a release bundle (external validation), with
    ``calibrated`` through the model's stored recalibration map; return the folder written."""
    expect_folder(out, "--out")
    if data is None:
        if is_bundle(source):
            raise InputError(f"{source} is a release bundle, which holds no data settings: give --data naming the "
                             f"dataset to score (its labels and preprocessing come from the bundle)")
        if overrides or out is not None or recalibrate is not None or split not in ("test", "valid"):
            raise InputError("--set, --out, --recalibrate and --split train/all are for scoring another dataset "
                             "(--data CONFIG); an experiment scores its own test or valid split into its own folder")
        metrics, out = predict_experiment(source, split, calibrated), source
    else:
        metrics, out = predict_external(load_source(source), load_config(data, overrides), split, recalibrate, out,
                                        calibrated)
        absent = metrics["data"]["absent"]
        if absent:
            print(f"labels absent from this dataset, not scored: {', '.join(absent)}")
    print(format_metrics(metrics))
    name = output_name(split, calibrated)
    print(f"wrote in {out}: private/predictions/{name}.csv, results/{name}_metrics.json, "
          f"results/{name}_fairness.json and .csv, results/{name}_calibration.json, {Layout(out).report(name).name}")
    return out


def run_images(source: Path, images: Path, out: Path | None = None, calibrated: bool = False) -> Path:
    """Score new, unlabelled images (a folder or a CSV listing them) with an experiment or a release
    bundle, at the model's own thresholds (``calibrated``: through its recalibration map); return the
    folder written."""
    expect_folder(out, "--out")
    result, out = predict_images(load_source(source), images, out, calibrated)
    counts = result["counts"]
    kinds = ", ".join(f"{kind}: {n}" for kind, n in counts["bad_per_reason"].items())
    reasons = f" ({kinds})" if kinds else ""
    ignored = f", {counts['other_files_ignored']} other files ignored" if counts["other_files_ignored"] else ""
    print(f"scored {counts['scored']} of {counts['images']} images, {counts['bad']} bad{reasons}{ignored}; "
          f"{result['thresholds_from']}; wrote in {out}: scores.csv, bad_images.csv, inference.json")
    return out


def run_export(exp_dir: Path, out_dir: Path, non_private: bool) -> dict:
    """Write the release bundle of an experiment: weights, model config and model card."""
    card = export_bundle(exp_dir, out_dir, load_experiment_config(exp_dir), non_private)
    print(card["privacy"]["statement"])
    print(card["privacy"]["in_words"])
    print(f"wrote the release bundle {out_dir}: {', '.join(RELEASE_FILES)}")
    return card


def run_compare(exp_a: Path, exp_b: Path, split: str, out: Path | None) -> None:
    expect_folder(out, "--out")
    comparison, table, out_dir = compare_experiments(exp_a, exp_b, split, out)
    boot = comparison["bootstrap"]
    print(f"A = {exp_a} ({comparison['privacy_a']})\nB = {exp_b} ({comparison['privacy_b']})")
    print(f"{comparison['n_images']} {split} images of {boot['units']} {boot['unit']}s, "
          f"{boot['resamples']} paired bootstrap resamples of {boot['unit']}s (seed {boot['seed']})")
    print(format_comparison(table))
    print(f"primary endpoint: {comparison['endpoints']['primary']}; {comparison['endpoints']['secondary']}")
    print(f"wrote {out_dir}: comparison.json, comparison.csv, report.html")


def run_transfer(experiments: list[Path], data: list[Path], split: str, overrides: list[str],
                 out: Path | None) -> dict:
    """Score every experiment (or bundle) on every dataset; write the transfer matrix as CSV, JSON and an
    HTML report with its heat-map."""
    expect_folder(out, "--out")
    result = transfer_matrix(experiments, [load_config(path, overrides) for path in data], split)
    out = out or Path(experiments[0]).parent / "transfer"
    table = pd.DataFrame(result["table"])
    values, low, high = (matrix(result, column) for column in ("auroc_mean", "ci95_low", "ci95_high"))
    ratio = tuple(matrix(result, f"observed_expected_{part}") for part in ("mean", "ci95_low", "ci95_high"))
    if (out / "transfer.json").exists():
        print(f"replacing the transfer matrix in {out} (recomputed)")
    atomic_write_text(out / "transfer.csv", table.to_csv(index=False))
    atomic_write_text(out / "transfer.json", json_text(result))
    atomic_write_text(out / "report.html", transfer_report(f"Transfer matrix ({split} split)", table, result,
                                                           values, low, high, ratio))
    for name, cells in (("mean AUROC", values), ("observed/expected ratio, mean over labels", ratio[0])):
        shown = pd.DataFrame(cells, index=[r["row"] for r in result["rows"]], columns=result["columns"])
        print(f"{name}, rows trained on, columns tested on ({split} split):")
        print(shown.to_string(float_format=lambda v: f"{v:.3f}", na_rep="n/a"))
    for pair in result["private_minus_non_private"]:
        ci = pair["ci95"]
        print(f"{pair['private']} minus {pair['non_private']} on {pair['tested_on']}: {pair['difference']:+.3f}"
              + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}], p {format_p(pair['p_value'])}" if ci else ""))
    print(f"wrote in {out}: transfer.csv, transfer.json, report.html")
    return result


def parse_epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--epsilons: expected numbers or inf separated by commas, got '{text}'") from None
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise InputError(f"--epsilons: expected distinct positive budgets (inf = non-private), got '{text}'")
    return values


def train_to_end(cfg, exp_dir: Path, what: str) -> bool:
    """Train ``exp_dir`` to its last epoch, resuming a started run; True when it was finished before."""
    files = Layout(exp_dir)
    done = files.summary.is_file() and read_json(files.summary)["epochs_completed"] >= cfg.training.epochs
    started = done or files.last.is_file()
    if started:
        check_resume_compatible(load_experiment_config(exp_dir), cfg)
    if done:
        print(f"{what}: finished earlier, skipped")
    else:
        print(f"{what}: {'resuming' if started else 'training'} in {exp_dir}")
        train(cfg, exp_dir, resume=started)
    return done


def run_sweep(epsilons: list[float], name: str, config: Path | None, overrides: list[str], audit: bool = False,
              seeds: int = 1, non_private_overrides: list[str] = ()) -> Path:
    """Train (or resume, or skip when finished) one experiment per budget and seed, then tabulate them,
    compare each budget with the non-private runs (paired, on the same test patients) and fit the trend
    on log epsilon; with ``audit``, audit each run too and add the audit's columns.
    ``non_private_overrides`` apply to the non-private runs only: a reference trained with the recipe
    that suits non-private training, rather than the private one's settings with the noise off."""
    base = load_config(config or DEFAULT_CONFIG, overrides)
    reference = parse_overrides(list(non_private_overrides))
    sweep_dir = inside(Path(base.output.target_dir), name, "sweep --name")
    raw = base.model_dump(exclude={"derived"})
    ledger = ledger_root(base.output.ledger)  # the base's, whatever the sweep folder
    evaluation = base.evaluation
    # several seeds vary the training only: every run keeps the base's patient split (same test patients)
    split = {"split_seed": base.data.split_seed if base.data.split_seed is not None else base.experiment.seed}
    rows, resamples, weights = [], {}, None
    for epsilon in epsilons:
        for k in range(seeds):
            seed = base.experiment.seed + k
            run = f"eps_{epsilon:g}" + (f"_seed{seed}" if seeds > 1 else "")
            privacy = {"enabled": False} if math.isinf(epsilon) else {"enabled": True, "epsilon": epsilon,
                                                                        "noise_multiplier": None}
            own = reference if math.isinf(epsilon) else {}
            cfg = validate(merge(merge(raw, own), {"dp": privacy, "experiment": {"name": run, "seed": seed},
                                                   "data": split if seeds > 1 else {},
                                                   "output": {"target_dir": str(sweep_dir), "ledger": str(ledger)}}),
                           source=f"sweep {name}/{run}")
            exp_dir = sweep_dir / run
            done = train_to_end(cfg, exp_dir, run)
            files = Layout(exp_dir)
            if not done or not (files.results / "test_metrics.json").is_file():
                predict_experiment(exp_dir, "test")
            if audit and (not done or not (files.audit / "audit.json").is_file()):
                audit_experiment(exp_dir)
            found = {kind: read_json(files.results / f"test_{kind}.json") for kind in ("metrics", "fairness")}
            row = sweep_row(run, epsilon, seed, read_json(files.summary), found["metrics"], found["fairness"])
            rows.append({**row, **(audit_columns(read_json(files.audit / "audit.json")) if audit else {})})
            predictions = pd.read_csv(files.predictions / "test.csv", dtype={"patient_id": str}, keep_default_na=True)
            if weights is None:
                weights, _, resampled = resampling(predictions["patient_id"].to_numpy(), max(evaluation.bootstrap, 1),
                                                   evaluation.seed, evaluation.bootstrap_unit)
                test_ids = predictions["image_id"]
            elif not predictions["image_id"].equals(test_ids):
                raise InputError(f"{exp_dir}: its test split differs from the first run's; a sweep compares runs "
                                 f"on the same test patients (data.split_seed)")
            resamples[(epsilon, seed)] = run_resamples(predictions, found["metrics"], weights, evaluation.age_bins,
                                                       evaluation.min_subgroup_size, evaluation.min_positives,
                                                       evaluation.min_negatives, evaluation.calibration_bins)
    table = pd.DataFrame(rows)
    derived = [load_experiment_config(sweep_dir / run).derived for run in table["run"]]
    books = Ledger(ledger, derived[0]["ledger_key"])
    spent, note = books.total([e for e in books.entries() if e["run_id"] in {d["run_id"] for d in derived}],
                              base.dp.accountant)
    differences = paired_differences(resamples, evaluation.seed)
    trend = trends(table, [c for c in resamples[next(iter(resamples))] if c in table])
    result = {"epsilons": epsilons, "seeds": seeds, "experiments": list(table["run"]),
              "table": table.to_dict(orient="records"), "bootstrap": {**resampled, "seeds_resampled": True},
              "difference_to_non_private": differences, "trend_on_log_epsilon": trend,
              "multiplicity": {"tests": add_q_values(differences, trend), "method": "Benjamini-Hochberg over the "
                               "differences and trends of this sweep", "note": "unadjusted p-values are exploratory"},
              "privacy_total": {"epsilon": spent, "note": note, "ledger": str(books.folder)}}
    atomic_write_text(sweep_dir / "sweep.csv", table.to_csv(index=False))
    atomic_write_text(sweep_dir / "sweep.json", json_text(result))
    atomic_write_text(sweep_dir / "report.html", sweep_report(f"Privacy budget sweep {name}", table, result))
    log_sweep_hparams(sweep_dir / "tensorboard", table)
    shown = ["run", "epsilon_spent", "noise_multiplier", "auroc_mean", "auroc_mean_ci95_low", "auroc_mean_ci95_high",
             "brier_mean", "ece_mean"]
    shown += [c for c in ("attack_auroc", "epsilon_lower_bound") if c in table]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    for budget, columns in differences.items():
        for column, metric in (("auroc_mean", "mean AUROC"), ("brier_mean", "mean Brier"), ("ece_mean", "mean ECE")):
            d = columns[column]
            if d["difference"] is None:
                print(f"epsilon {budget}: {metric} minus non-private not estimable")
                continue
            ci = f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d.get("ci95") else ""
            print(f"epsilon {budget}: {metric} minus non-private {d['difference']:+.4f}{ci}, p {format_p(d['p_value'])}")
    print(f"all {len(table)} runs composed per patient: the worst-off patients' epsilon {spent:.4g} ({note})")
    print(f"wrote {sweep_dir / 'sweep.csv'}, sweep.json and report.html")
    return sweep_dir


def run_audit(exp_dir: Path, reference_models: int, checkpoint: str = "best") -> dict:
    """Train the reference runs asked for (kept, resumable, in ``private/audit/references``), then audit.

    Without ``--reference-models``, finished reference runs of an earlier audit are used if there are any.
    """
    cfg = load_experiment_config(exp_dir)
    if reference_models < 0:
        raise InputError(f"--reference-models: expected a number of runs >= 0, got {reference_models}")
    folder = Layout(exp_dir).audit / "references"
    raw = cfg.model_dump(exclude={"derived"})
    for k in range(reference_models):
        ref_cfg = validate(merge(raw, {"audit": {"canaries": 0, "reference": k}, "experiment": {"name": f"ref-{k}"},
                                       "output": {"target_dir": str(folder)}}), source=f"{folder / f'ref-{k}'}")
        train_to_end(ref_cfg, folder / f"ref-{k}", f"reference run {k + 1} of {reference_models}")
    references = sorted(path for path in folder.glob("ref-*") if _finished(path)) if folder.is_dir() else []
    if reference_models:
        references = [folder / f"ref-{k}" for k in range(reference_models)]
    audit = audit_experiment(exp_dir, references, checkpoint)
    print(format_audit(audit))
    print(f"wrote in {Layout(exp_dir).audit} (private): audit.json, audit_attacks.csv, audit_scores.csv, report.html")
    return audit


def _finished(exp_dir: Path) -> bool:
    files = Layout(exp_dir)
    if not files.summary.is_file():
        return False
    done = read_json(files.summary)
    return done["epochs_completed"] >= done["epochs_planned"] and files.best.is_file()


def record_release(exp_dir: Path, released: bool) -> None:
    """Record in its ledger that an experiment's predictions, metrics or anything computed from them were
    published (``released``), or that an entry from before releases were recorded never left."""
    if (Path(exp_dir) / ".lock").exists():
        raise InputError(f"{exp_dir} is being trained ({Path(exp_dir) / '.lock'}); record its release once "
                         f"training has finished")
    cfg = load_experiment_config(exp_dir)
    ledger = Ledger.of_experiment(cfg, exp_dir)
    if released:
        ledger.release(cfg.derived["run_id"], "published")
    else:
        ledger.keep_internal(cfg.derived["run_id"])
    print(f"{exp_dir}: recorded as {'released (published)' if released else 'internal'} in {ledger.folder}")


def _runs_table(runs: list[dict], released: bool) -> str:
    """The ledger's runs as a table; a non-private run has no epsilon and no delta; ``planned``: the steps
    its booking counts (what dp.total_budget guards); ``patients`` it trained (all: not recorded)."""
    rows = []
    for r in runs:
        row = {"experiment": r["experiment"], "private": r["private"], "unit": r["unit"], "steps": r["steps"],
               "epsilon": r["epsilon"], "delta": r["delta"] if r["private"] else None}
        if released:
            row["released"] = (", ".join(f"{e['how']} {e['date']}" for e in r["released"]) if "released" in r
                               else "before the record")
        rows.append({**row, "planned": r.get("planned_steps", r["steps"]),
                     "patients": "all" if r.get("patients") is None else len(r["patients"]), "updated": r["updated"]})
    table = pd.DataFrame(rows).astype({"epsilon": float, "delta": float})  # None -> NaN, shown as -
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def run_ledger(config: Path | None, overrides: list[str], delta: float | None, accountant: str | None,
               dataset: str | None = None, released: list[Path] = (), internal: list[Path] = (),
               earlier: Path | None = None) -> list[dict]:
    """Move an earlier-format ledger's runs in (``earlier``), record the releases given, then print per
    dataset in the privacy ledger (or the one ``dataset`` names: its name or key) the released runs and
    their composition per patient, and the internal runs apart."""
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    root = ledger_root(cfg.output.ledger)
    if earlier is not None:
        for folder, ledger, runs in migrate(earlier, root):
            print(f"{folder}: {runs} run(s) moved into {ledger.folder}, each counted for every patient of its "
                  f"dataset (it did not record which it trained); the old folder is now {folder.name}.migrated")
    refuse_earlier_format(root, earlier_default(cfg.output.target_dir))
    for exp_dir in released:
        record_release(exp_dir, True)
    for exp_dir in internal:
        record_release(exp_dir, False)
    datasets = [d for d in describe_ledger(root, accountant or cfg.dp.accountant, delta)
                if dataset is None or dataset in (d["dataset"]["dataset"], d["key"])]
    if dataset is not None and not datasets:
        raise InputError(f"ledger --dataset {dataset}: no such dataset name or key in {root}")
    for d in datasets:
        about = {k: v for k, v in d["dataset"].items() if k not in ("format", "dataset")}
        trained = f"{d['patients']} patients trained on" if d["patients"] is not None else "patients not recorded"
        print(f"{d['dataset']['dataset']} ({', '.join(f'{k} {v}' for k, v in about.items())}; {trained}): "
              f"ledger {d['folder']}")
        for kind, released in (("released (exported or published; composed)", True),
                               ("internal (never released; not composed)", False)):
            runs = d["released" if released else "internal"]
            if runs:
                print(f"{kind}:\n{_runs_table(runs, released)}")
        every = d["all_runs"]
        print(f"  released runs composed per patient ({d['accountant'].upper()}): worst patient's epsilon "
              f"{d['total_epsilon']:.4g}{_patients(d['worst_patients'])} ({d['note']})\n"
              f"  every run as planned, as if all were released (what dp.total_budget guards): worst patient's "
              f"epsilon {every['epsilon']:.4g}{_patients(every['worst_patients'])} ({every['note']})\n")
    if not datasets:
        print(f"{root}: no dataset recorded yet")
    return datasets


def _patients(count: int | None) -> str:
    """How many patients are at a level of the ledger (none: no run composed)."""
    return ", every patient at that level" if count is None else f", {count} patient(s) at that level" if count else ""


def run_describe(config: Path | None, overrides: list[str]) -> Path:
    """Print and save what the configured dataset holds, before any training."""
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    description = describe(load_table(cfg.data, cfg.experiment.seed), cfg.evaluation.age_bins)
    rows = []
    for split, part in description["splits"].items():
        for kind in ("view", "sex", "age_bin"):
            rows += [{"split": split, "what": kind, "value": k, "count": v} for k, v in part[kind].items()]
        for label, m in part["labels"].items():
            rows.append({"split": split, "what": "label", "value": label, "count": m["positives"],
                         "labelled": m["labelled"], "prevalence": m["prevalence"]})
    table = pd.DataFrame(rows).astype({"labelled": "Int64"})
    out = private_folder(cfg.output.target_dir) / "data_description" / cfg.data.dataset
    atomic_write_text(out / "description.json", json_text(description))
    atomic_write_text(out / "description.csv", table.to_csv(index=False))
    print(f"{description['images']} images of {description['patients']} patients in {description['root']}")
    for split, part in description["splits"].items():
        print(f"  {split}: {part['images']} images, {part['patients']} patients")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""))
    print("source label values before the label policy (uncertain = -1):")
    for label, counts in description["source_label_values"].items():
        print(f"  {label}: {counts['uncertain']} uncertain, {counts['blank']} blank")
    print(f"wrote {out / 'description.json'} and description.csv")
    return out


def run_prepare(config: Path | None, overrides: list[str]) -> Path:
    """Preprocess every image of the configured dataset into the cache that training then reads."""
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    table = load_table(cfg.data, cfg.experiment.seed, use_cache=False)
    folder = cache_location(table, cfg.data)
    started = time.time()
    result = prepare(folder, cfg.data.dataset, table.root, table.frame["path"].tolist(), preprocessing(cfg.data),
                     cfg.data.cache.workers)
    seconds = time.time() - started
    rate = f", {result.prepared / seconds:.0f} images/s" if result.prepared and seconds > 0 else ""
    print(f"{result.images} images at {cfg.data.image_size}px in {folder}: {result.reused} done before, "
          f"{result.prepared} prepared now ({seconds:.1f} s{rate}), {len(result.bad)} bad "
          f"({result.bad_fraction:.2%})")
    if len(result.bad):
        # per kind of reason (the text before its first ':'), e.g. "unreadable DICOM (JPEG Extended ...)"
        kinds = result.bad["reason"].str.split(":", n=1).str[0]
        print("skipped, per reason:\n" + kinds.value_counts().to_string())
        print(f"bad images are listed in {folder / 'bad_images.csv'} and left out of training and prediction")
    check_bad_share(len(result.bad), result.images, cfg.data.cache.max_bad_fraction, folder / "bad_images.csv")
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main_2D_DP.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    tr = sub.add_parser("train", help="train a model into an experiment folder")
    tr.add_argument("--config", type=Path, default=None, help=f"YAML config (default {DEFAULT_CONFIG})")
    tr.add_argument("--name", help="experiment name (folder under output.target_dir)")
    tr.add_argument("--resume", action="store_true", help="continue the named experiment from private/last.pt")
    tr.add_argument("--allow-budget-increase", action="store_true",
                    help="let training spend more than dp.epsilon (e.g. --resume with more epochs); recorded")
    tr.add_argument("--audit-canaries", type=int, default=None, metavar="M",
                    help="make M training images canaries for `audit`'s one-run epsilon bound (audit.canaries)")
    tr.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override config keys by dotted name, values parsed as YAML")
    pr = sub.add_parser("predict", help="score a split with an experiment's best checkpoint or a release bundle, "
                                         "on its own dataset or (--data) another one")
    pr.add_argument("experiment", type=Path,
                    help="experiment folder, or release bundle (then --data or --images is needed)")
    pr.add_argument("--split", choices=SPLIT_CHOICES, default=None,
                    help="split scored (default test); train and all only of another dataset (--data)")
    pr.add_argument("--data", "--config", type=Path, default=None, dest="data", metavar="CONFIG",
                    help="score the dataset this config describes (external validation): its data section (reader, "
                         "root, site, label_map, merge_sides...) with the model's labels and preprocessing")
    pr.add_argument("--recalibrate", choices=["valid", "train", "test"], default=None, metavar="SPLIT",
                    help="with --data: choose the thresholds on this split of the other dataset (left out of scoring) "
                         "instead of the model's own")
    pr.add_argument("--calibrated", action="store_true",
                    help="apply the model's calibration map (evaluation.recalibration, fit on its validation "
                         "split) to the probabilities and thresholds; results go beside the uncalibrated ones as "
                         "<split>_calibrated (--images: <name>_calibrated); not on the experiment's own valid split")
    pr.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="with --data: override keys of that config")
    pr.add_argument("--out", type=Path, default=None,
                    help="with --data: output folder (default <experiment>/external/<dataset>-<site>-<split>, or "
                         "<bundle>_external/... beside a bundle); with --images: a new folder (default "
                         "<experiment>/inference/<name of PATH>, or <bundle>_inference/<name> beside a bundle)")
    pr.add_argument("--images", type=Path, default=None, metavar="PATH",
                    help="score new, unlabelled images: a folder (walked recursively: PNG, JPEG, DICOM) or a CSV "
                         "with a 'path' column and optional patient_id, sex, age carried to the output")
    ex = sub.add_parser("export", help="the release bundle: weights, model config and a model card")
    ex.add_argument("experiment", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--non-private", action="store_true",
                    help="export a run trained without DP (its card says it has no privacy guarantee)")
    co = sub.add_parser("compare", help="paired AUROC comparison of two experiments on the same images")
    co.add_argument("experiment_a", type=Path)
    co.add_argument("experiment_b", type=Path)
    co.add_argument("--split", choices=["test", "valid"], default="test")
    co.add_argument("--out", type=Path, default=None,
                    help="output folder (default <parent of A>/comparisons/<A>__vs__<B>__<split>)")
    tf = sub.add_parser("transfer", help="the transfer matrix: every experiment (or bundle) scored on every dataset")
    tf.add_argument("--experiments", nargs="+", type=Path, required=True, metavar="DIR",
                    help="experiment folders or release bundles (rows; DP next to non-private when trained alike)")
    tf.add_argument("--data", nargs="+", type=Path, required=True, metavar="CONFIG",
                    help="data configs of the datasets to test on (columns), as for predict --data")
    tf.add_argument("--split", choices=SPLIT_CHOICES, default="test")
    tf.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override keys of every data config")
    tf.add_argument("--out", type=Path, default=None, help="output folder (default <parent of the first>/transfer)")
    sw = sub.add_parser("sweep", help="one experiment per privacy budget and seed, each budget against non-private")
    sw.add_argument("--epsilons", required=True, help="comma-separated budgets; inf = non-private (e.g. inf,8,4,1)")
    sw.add_argument("--name", default="sweep", help="sweep folder under output.target_dir (default: sweep)")
    sw.add_argument("--seeds", type=int, default=1, metavar="K",
                    help="runs per budget with seeds experiment.seed .. +K-1, all on the same patient split (default 1)")
    sw.add_argument("--audit", action="store_true", help="audit every run and add the audit's columns")
    sw.add_argument("--audit-canaries", type=int, default=None, metavar="M", help="canaries per run (audit.canaries)")
    sw.add_argument("--config", type=Path, default=None)
    sw.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides")
    sw.add_argument("--non-private-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="overrides for the non-private runs only (their own recipe, e.g. training.lr=0.002)")
    au = sub.add_parser("audit", help="membership inference and the one-run epsilon lower bound of an experiment")
    au.add_argument("experiment", type=Path)
    au.add_argument("--reference-models", type=int, default=0, metavar="K",
                    help="train K reference runs (each a full training) for the calibrated attack (offline LiRA)")
    au.add_argument("--checkpoint", choices=["best", "last"], default="best",
                    help="model audited: best (what predict uses, default) or last (the end of training)")
    le = sub.add_parser("ledger", help="the privacy spent on each dataset's patients: every run, composed")
    le.add_argument("--dataset", default=None, help="only this dataset (its name, e.g. synthetic, or fingerprint)")
    le.add_argument("--config", type=Path, default=None)
    le.add_argument("--delta", type=float, default=None, help="delta of the composition (default: the runs' largest)")
    le.add_argument("--accountant", choices=["rdp", "prv"], default=None, help="default: the config's dp.accountant")
    le.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides")
    le.add_argument("--released", nargs="+", type=Path, default=[], metavar="EXPERIMENT_DIR",
                    help="record that these experiments' predictions, metrics or anything computed from them were "
                         "published (export records itself)")
    le.add_argument("--internal", nargs="+", type=Path, default=[], metavar="EXPERIMENT_DIR",
                    help="record that these runs, entered before releases were recorded, never left")
    le.add_argument("--migrate", type=Path, default=None, metavar="FOLDER",
                    help="move the runs of a ledger of an earlier version (one folder per set of patients) into "
                         "this one, each counted for every patient of its dataset")
    da = sub.add_parser("data", help="inspect the configured dataset")
    da.add_argument("action", choices=["describe"])
    da.add_argument("--config", type=Path, default=None)
    da.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides")
    pp = sub.add_parser("prepare", help="preprocess all images once into a memory-mapped cache (resumable)")
    pp.add_argument("--config", type=Path, default=None)
    pp.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides")
    return parser


class Terminated(Exception):
    """SIGTERM as an exception, so locks are released and files closed on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def _continue_hint(args) -> str:
    """What an interrupted command (other than train, which knows its folder) kept, and how to continue."""
    return {"sweep": "finished runs are kept and a started one resumes: run the same sweep command again",
            "prepare": "the images cached so far are kept: run prepare again to continue",
            "audit": "finished reference runs are kept: run the same audit command again"}.get(
        args.command, "results are written whole or not at all: run the command again")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if parallel.launched() and args.command not in (None, "train"):
            raise InputError(f"'{args.command}' runs in one process; under torchrun only train (and the "
                             f"default train + predict) are distributed")
        if args.command in ("train", "sweep") and args.audit_canaries is not None:
            args.overrides = [*args.overrides, f"audit.canaries={args.audit_canaries}"]
        if args.command == "train":
            run_train(args.config, args.name, args.resume, args.overrides, args.allow_budget_increase)
        elif args.command == "audit":
            run_audit(args.experiment, args.reference_models, args.checkpoint)
        elif args.command == "predict" and args.images is not None:
            given = [flag for flag, value in (("--data", args.data), ("--split", args.split),
                                              ("--recalibrate", args.recalibrate), ("--set", args.overrides)) if value]
            if given:
                raise InputError(f"{', '.join(given)} cannot be combined with --images: new images have no split, "
                                 f"labels or data config (their preprocessing is the model's)")
            run_images(args.experiment, args.images, args.out, args.calibrated)
        elif args.command == "predict":
            run_predict(args.experiment, args.split or "test", args.data, args.overrides, args.out, args.recalibrate,
                        args.calibrated)
        elif args.command == "export":
            run_export(args.experiment, args.out, args.non_private)
        elif args.command == "prepare":
            run_prepare(args.config, args.overrides)
        elif args.command == "ledger":
            run_ledger(args.config, args.overrides, args.delta, args.accountant, args.dataset, args.released,
                       args.internal, args.migrate)
        elif args.command == "data":
            run_describe(args.config, args.overrides)
        elif args.command == "sweep":
            if args.seeds < 1:
                raise InputError(f"--seeds: expected a positive number of runs per budget, got {args.seeds}")
            run_sweep(parse_epsilons(args.epsilons), args.name, args.config, args.overrides, args.audit, args.seeds,
                      args.non_private_set)
        elif args.command == "transfer":
            run_transfer(args.experiments, args.data, args.split, args.overrides, args.out)
        elif args.command == "compare":
            run_compare(args.experiment_a, args.experiment_b, args.split, args.out)
        else:
            exp_dir = run_train(None, None, False, [])
            if exp_dir is not None:  # rank 0 under torchrun
                run_predict(exp_dir, "test")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OutputError, TrainingStopped) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a read or write the commands do not wrap themselves
        print(f"error: {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        terminated = isinstance(exc, Terminated)
        hint = getattr(exc, "hint", None) or _continue_hint(args)
        print(f"interrupted ({'SIGTERM' if terminated else 'Ctrl-C'}): {hint}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
