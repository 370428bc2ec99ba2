"""Bootstrap speed: vectorised patient resampling vs a per-resample scikit-learn loop, in one process.

    python bench/bench_bootstrap.py [--images 40000] [--labels 8] [--resamples 1000] [--permutations 1000]

Images belong to patients with 1-3 images each; resamples draw patients (the default unit). The loop
baseline is timed on --baseline-resamples resamples and scaled to the full count. The fairness line
times the whole subgroup analysis of a prediction (sex, age and sex x age subgroups with intervals,
every gap with its interval and --permutations shuffles of the patients' groups).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.bootstrap import bootstrap_intervals, resampling  # noqa: E402
from evaluation.fairness import fairness_report  # noqa: E402
from Prediction_DP import auroc, threshold_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--baseline-resamples", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(args.images), rng.integers(1, 4, args.images))[:args.images]
    truth = rng.random((args.images, args.labels)) < 0.15
    scores = 1 / (1 + np.exp(-rng.normal(truth * 1.5 - 1, 1.0)))
    labels = [f"label{i}" for i in range(args.labels)]
    thresholds = dict.fromkeys(labels, 0.5)
    n_patients = len(np.unique(patients))
    sex = np.array(["F", "M"])[rng.integers(0, 2, n_patients)][patients]
    age = rng.uniform(18, 95, n_patients)[patients]

    start = time.perf_counter()
    weights, units, _ = resampling(patients, args.resamples, 0, "patient")
    bootstrap_intervals(truth, scores, labels, thresholds, weights)
    vectorised = time.perf_counter() - start

    start = time.perf_counter()
    fairness_report(truth, scores, labels, thresholds, sex, age, [0, 30, 60, 70, 80, 100], weights, clusters=units,
                    permutations=args.permutations)
    fairness = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(args.baseline_resamples):
        idx = rng.integers(0, args.images, args.images)
        for i in range(args.labels):
            auroc(truth[idx, i], scores[idx, i])
            threshold_metrics(truth[idx, i], scores[idx, i], 0.5)
    loop = (time.perf_counter() - start) * args.resamples / args.baseline_resamples

    print(f"{args.resamples} resamples of {n_patients} patients ({args.images} images) x {args.labels} labels "
          f"(AUROC + 5 threshold metrics)")
    print(f"  scikit-learn loop (baseline, scaled from {args.baseline_resamples}): {loop:8.1f} s   1.00x")
    print(f"  vectorised patient bootstrap:               {vectorised:8.1f} s   {loop / vectorised:.2f}x faster")
    print(f"  subgroups and fairness, {args.permutations} permutations:  {fairness:8.1f} s")


if __name__ == "__main__":
    main()
