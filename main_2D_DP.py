"""DP-CXR command line.

    python main_2D_DP.py                      train with configs/config.yaml, then predict on test
    python main_2D_DP.py train [--config FILE] [--name NAME] [--resume] [--set KEY=VALUE ...]
    python main_2D_DP.py predict EXPERIMENT_DIR [--split test|valid]
    python main_2D_DP.py compare EXP_A EXP_B [--split test|valid] [--out DIR]

Exit codes: 0 success, 2 bad input (config, paths, data), 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from config import InputError, load_config, merge, parse_overrides, validate
from Prediction_DP import (compare_experiments, format_comparison, format_metrics, load_experiment_config,
                           predict_experiment)
from Train_Valid_DP import check_resume_compatible, train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "config.yaml"


def _experiment_name(cfg) -> str:
    privacy = f"eps{cfg.dp.epsilon:g}" if cfg.dp.enabled and cfg.dp.epsilon else (
        f"sigma{cfg.dp.noise_multiplier:g}" if cfg.dp.enabled else "nonprivate")
    return f"{cfg.data.dataset}-{cfg.data.site}_{cfg.model.name}_{privacy}_{time.strftime('%Y%m%d-%H%M%S')}"


def run_train(config: Path | None, name: str | None, resume: bool, overrides: list[str]) -> Path:
    """Resolve the config and experiment folder, refuse unsafe reuse, train; return the folder."""
    overrides = list(overrides) + ([f"experiment.name={name}"] if name else [])
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if resume and not cfg.experiment.name:
        raise InputError("--resume needs the experiment's name (--name NAME or experiment.name)")
    exp_dir = Path(cfg.output.target_dir) / (cfg.experiment.name or _experiment_name(cfg))
    if resume:
        if not (exp_dir / "config.yaml").is_file():
            raise InputError(f"--resume: no experiment at {exp_dir}")
        saved = load_experiment_config(exp_dir)
        if config is None:  # continue the saved settings; --set may still change what is resumable
            raw = saved.model_dump(exclude={"derived"})
            cfg = validate(merge(raw, parse_overrides(overrides)), source=f"{exp_dir / 'config.yaml'} + --set")
        check_resume_compatible(saved, cfg)
    elif exp_dir.exists() and any(exp_dir.iterdir()):
        raise InputError(f"experiment {exp_dir} already exists; use --resume to continue it or --name for a new one")
    print(f"experiment folder: {exp_dir}")
    train(cfg, exp_dir, resume=resume)
    return exp_dir


def run_predict(exp_dir: Path, split: str) -> None:
    metrics = predict_experiment(exp_dir, split)
    print(format_metrics(metrics))
    print(f"wrote {Path(exp_dir) / 'predictions' / f'{split}.csv'} and "
          f"{Path(exp_dir) / 'results' / f'{split}_metrics.json'}")


def run_compare(exp_a: Path, exp_b: Path, split: str, out: Path | None) -> None:
    comparison, table = compare_experiments(exp_a, exp_b, split, out)
    print(f"A = {exp_a}\nB = {exp_b}\n{comparison['n_images']} {split} images, "
          f"{comparison['bootstrap']['resamples']} paired bootstrap resamples (seed {comparison['bootstrap']['seed']})")
    print(format_comparison(table))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main_2D_DP.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    tr = sub.add_parser("train", help="train a model into an experiment folder")
    tr.add_argument("--config", type=Path, default=None, help=f"YAML config (default {DEFAULT_CONFIG})")
    tr.add_argument("--name", help="experiment name (folder under output.target_dir)")
    tr.add_argument("--resume", action="store_true", help="continue the named experiment from checkpoints/last.pt")
    tr.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override config keys by dotted name, values parsed as YAML")
    pr = sub.add_parser("predict", help="score a split with an experiment's best checkpoint")
    pr.add_argument("experiment", type=Path)
    pr.add_argument("--split", choices=["test", "valid"], default="test")
    co = sub.add_parser("compare", help="paired AUROC comparison of two experiments on the same images")
    co.add_argument("experiment_a", type=Path)
    co.add_argument("experiment_b", type=Path)
    co.add_argument("--split", choices=["test", "valid"], default="test")
    co.add_argument("--out", type=Path, default=None,
                    help="output folder (default <parent of A>/comparisons/<A>__vs__<B>__<split>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            run_train(args.config, args.name, args.resume, args.overrides)
        elif args.command == "predict":
            run_predict(args.experiment, args.split)
        elif args.command == "compare":
            run_compare(args.experiment_a, args.experiment_b, args.split, args.out)
        else:
            run_predict(run_train(None, None, False, []), "test")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
