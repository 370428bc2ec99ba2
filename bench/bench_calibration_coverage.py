"""Coverage of the calibration intervals (evaluation/calibration.py) with clustered patients, and how often
an over-confident model is flagged.

    python bench/bench_calibration_coverage.py [--patients 300] [--replications 500] [--resamples 500] [--quick]

Data model: P patients with 1, 2 or 3 images each (uniform), as in bench_coverage.py. Image j of patient i
has the true probability q_ij = expit(m + s (sqrt(ICC) u_i + sqrt(1 - ICC) f_ij)) and the outcome
y_ij = 1[Phi(sqrt(ICC) a_i + sqrt(1 - ICC) e_ij) < q_ij], all of u, f, a, e iid N(0, 1): the Phi(...) is
uniform, so P(y = 1 | q) = q exactly, while outcomes of one patient stay correlated given their scores.

- calibrated model, score p = q: the true slope is 1, intercept 0, O/E 1, ECE 0 (any binning by p) and Brier
  score E[q (1 - q)] (estimated on 2,000,000 draws);
- over-confident model, p = expit(3 logit q): "flagged" = slope interval entirely below 1 and ECE interval
  away from 0 (both, as tests/test_calibration.py asks). (Its slope interval covers the true 1/3 exactly when
  the calibrated model's covers 1: logit p is 3 logit q, so every fitted slope is divided by 3.)

The intercept and O/E columns agree by construction: in every resample the offset fit's intercept is > 0
exactly when O/E > 1 (its score equation is sum y = sum expit(a + logit p)), so one interval holds 0 when the
other holds 1 (up to the clip).

Each simulated set is scored by ``calibration_report`` under B resamples of patients and of images (the same
data for both). Coverage = share of intervals containing the true value (a missing interval is a miss); its
Monte Carlo standard error over R replications is sqrt(q (1 - q) / R), 1 point for R = 500.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, logit
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.bootstrap import resampling  # noqa: E402
from evaluation.calibration import calibration_report  # noqa: E402

ICCS = (0.0, 0.6)
UNITS = ("patient", "image")
MEAN, SPREAD, SHARPEN = -1.0, 1.5, 3.0  # logit of the true probability ~ N(-1, 1.5^2): prevalence about 0.3


def simulate(rng: np.random.Generator, patients: int, icc: float, size: int | None = None):
    """(patient id, outcome, true probability q) of the data model (``size`` images of distinct patients
    when given, for the true values)."""
    sizes = np.ones(size, int) if size else rng.integers(1, 4, size=patients)
    patient = np.repeat(np.arange(len(sizes)), sizes)
    n = len(patient)

    def shared() -> np.ndarray:
        return np.sqrt(icc) * rng.standard_normal(len(sizes))[patient] + np.sqrt(1 - icc) * rng.standard_normal(n)

    q = expit(MEAN + SPREAD * shared())
    y = (norm.cdf(shared()) < q).astype(np.float64)
    return patient, y, q


def covers(entry: dict, value: float) -> bool:
    ci = entry["ci95"]
    return ci is not None and ci[0] <= value <= ci[1]


def run(args: argparse.Namespace) -> pd.DataFrame:
    rng = np.random.default_rng(args.seed)
    _, _, q = simulate(rng, 0, 0.0, size=2_000_000)
    true_brier = float(np.mean(q * (1 - q)))
    rows = []
    for icc in ICCS:
        hits = {unit: {} for unit in UNITS}
        for _ in range(args.replications):
            patient, y, q = simulate(rng, args.patients, icc)
            seed = int(rng.integers(2**32))
            over = expit(SHARPEN * logit(q))
            for unit in UNITS:
                weights, _, _ = resampling(patient, args.resamples, seed, unit)
                report = calibration_report(np.c_[y, y], np.c_[q, over], ["calibrated", "over"], weights,
                                            bins=args.bins)
                m, o = (report["labels"][label]["metrics"] for label in ("calibrated", "over"))
                flagged = (o["slope"]["ci95"] is not None and o["slope"]["ci95"][1] < 1
                           and o["ece"]["ci95"] is not None and o["ece"]["ci95"][0] > 0)
                for name, hit in (("slope", covers(m["slope"], 1.0)), ("intercept", covers(m["intercept"], 0.0)),
                                  ("O/E", covers(m["observed_expected"], 1.0)), ("ECE", covers(m["ece"], 0.0)),
                                  ("Brier", covers(m["brier"], true_brier)), ("over: flagged", flagged)):
                    hits[unit][name] = hits[unit].get(name, 0) + bool(hit)
        for unit in UNITS:
            rows.append({"ICC": f"{icc:g}", "resampled": unit + "s",
                         **{name: 100 * count / args.replications for name, count in hits[unit].items()}})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--replications", type=int, default=500)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100 replications of 200 resamples")
    args = parser.parse_args()
    if args.quick:
        args.replications, args.resamples = 100, 200
    start = time.perf_counter()
    table = run(args)
    se = 100 * np.sqrt(0.95 * 0.05 / args.replications)
    print(f"{args.patients} patients (1-3 images each), {args.replications} simulated sets x {args.resamples} "
          f"resamples, {args.bins} equal-mass bins; share (%) of nominal 95% intervals containing the true value "
          f"(Monte Carlo SE {se:.1f} points at 95%); 'over: flagged' = share of over-confident models (logits x "
          f"{SHARPEN:g}) with slope interval below 1 and ECE interval above 0")
    print("| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in row) + " |")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
