"""Coverage of the bootstrap intervals and type-I error of the paired comparison, with clustered patients.

    python bench/bench_coverage.py [--patients 300] [--replications 2000] [--resamples 500] [--markdown] [--quick]

Data model: P patients with 1, 2 or 3 images each (uniform), like the built-in test split. Patient i has
random effects a_i, u_i and image j its own e_ij, f_ij, all iid N(0, 1); with intra-class correlation ICC

    y_ij = 1[sqrt(ICC) a_i + sqrt(1 - ICC) e_ij > Phi^-1(1 - prevalence)],
    s_ij = mu y_ij + sqrt(ICC) u_i + sqrt(1 - ICC) f_ij,

so P(y = 1) = prevalence and s | y ~ N(mu y, 1): over images of different patients the AUROC is
Phi(mu / sqrt 2), and mu = sqrt 2 Phi^-1(AUROC) hits a target AUROC. (The empirical AUROC also pairs images of
one patient, a share O(1/P) of its pairs.) At the fixed threshold t = mu / 2 the true values are
sensitivity = 1 - Phi(t - mu), specificity = Phi(t), accuracy = p sens + (1 - p) spec and
precision = p sens / (p sens + (1 - p)(1 - spec)), p the prevalence.

Part 1 (coverage): for AUROC {0.8, 0.95} x ICC {0, 0.6}, R data sets, each scored by
``bootstrap_intervals`` under B resamples of patients (cluster bootstrap) and of images; the coverage of a
metric is the share of its intervals that contain the true value (a missing interval counts as a miss), and
"W" columns give the share of intervals that are Wilson's rather than percentile.

Part 2 (type-I error): models A and B with the same true AUROC and ICC for the labels and for each model,
s_ijk = mu y_ij + sqrt(ICC) u_ik + sqrt(1 - ICC) f_ijk with corr(u_iA, u_iB) = corr(f_ijA, f_ijB) = rho;
the size of each test is the share of the R data sets with p < 0.05.

The Monte Carlo standard error of a share q over R replications is sqrt(q (1 - q) / R).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.bootstrap import bootstrap_intervals, resampling, weighted_auroc  # noqa: E402
from evaluation.compare import paired_auroc_comparison  # noqa: E402

METRICS = ("auroc", "sensitivity", "specificity", "accuracy", "precision")
PROPORTIONS = METRICS[1:]
SHORT = {"sensitivity": "sens", "specificity": "spec", "accuracy": "acc", "precision": "prec"}
AUROCS = (0.8, 0.95)
ICCS = (0.0, 0.6)
UNITS = ("patient", "image")
COVERAGE_TARGET = (93.0, 97.0)
SIZE_TARGET = (4.0, 6.0)
ALPHA = 0.05


def simulate(rng: np.random.Generator, patients: int, mu: float, icc: float, prevalence: float,
             models: int = 1, rho: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient id [n], truth [n], scores [n, models]) of the data model; the models' patient effects u_ik
    and image noises f_ijk are equicorrelated with correlation rho."""
    sizes = rng.integers(1, 4, size=patients)
    patient = np.repeat(np.arange(patients), sizes)
    n = len(patient)
    latent = np.sqrt(icc) * rng.standard_normal(patients)[patient] + np.sqrt(1 - icc) * rng.standard_normal(n)
    truth = latent > norm.ppf(1 - prevalence)

    def correlated(shape: tuple[int, ...]) -> np.ndarray:
        """N(0, 1) columns with pairwise correlation rho: sqrt(rho) z_0 + sqrt(1 - rho) z_k."""
        return np.sqrt(rho) * rng.standard_normal(shape[:1] + (1,)) + np.sqrt(1 - rho) * rng.standard_normal(shape)

    scores = (mu * truth[:, None] + np.sqrt(icc) * correlated((patients, models))[patient]
              + np.sqrt(1 - icc) * correlated((n, models)))
    return patient, truth, scores


def true_values(auroc: float, prevalence: float) -> tuple[float, dict[str, float]]:
    """(mu, true metric values) for a target AUROC, at the threshold t = mu / 2."""
    mu = np.sqrt(2) * norm.ppf(auroc)
    t = mu / 2
    sens, spec = norm.sf(t - mu), norm.cdf(t)
    positive = prevalence * sens
    return mu, {"auroc": auroc, "sensitivity": sens, "specificity": spec,
                "accuracy": positive + (1 - prevalence) * spec,
                "precision": positive / (positive + (1 - prevalence) * (1 - spec))}


def check_true_auroc(rng: np.random.Generator, auroc: float, icc: float, prevalence: float, patients: int) -> float:
    """AUROC of the positives of one simulated sample against the negatives of an independent one: every
    pair is of different patients, so its expectation is Phi(mu / sqrt 2) exactly."""
    mu, _ = true_values(auroc, prevalence)
    (_, y1, s1), (_, y2, s2) = (simulate(rng, patients, mu, icc, prevalence) for _ in range(2))
    truth = np.r_[np.ones(y1.sum(), bool), np.zeros((~y2).sum(), bool)]
    score = np.r_[s1[y1, 0], s2[~y2, 0]]
    return float(weighted_auroc(truth, score, np.ones((1, len(truth)), np.float32))[0])


def coverage(rng: np.random.Generator, args: argparse.Namespace, bar: tqdm) -> pd.DataFrame:
    """Coverage (%) per metric and Wilson share (%) per proportion, for every AUROC x ICC x unit cell; both
    units score the same data sets."""
    rows = []
    for auroc in AUROCS:
        mu, truth_values = true_values(auroc, args.prevalence)
        for icc in ICCS:
            hits = {unit: {m: 0 for m in METRICS} for unit in UNITS}
            wilson = {unit: {m: 0 for m in PROPORTIONS} for unit in UNITS}
            bar.set_description(f"coverage AUROC {auroc} ICC {icc}")
            for _ in range(args.replications):
                patient, truth, scores = simulate(rng, args.patients, mu, icc, args.prevalence)
                seed = int(rng.integers(2**32))
                for unit in UNITS:
                    weights, _, _ = resampling(patient, args.resamples, seed, unit)
                    entry = bootstrap_intervals(truth[:, None], scores, ["y"], {"y": mu / 2}, weights)["labels"]["y"]
                    for m in METRICS:
                        ci = entry["ci95"][m]
                        hits[unit][m] += ci is not None and ci[0] <= truth_values[m] <= ci[1]
                    for m in PROPORTIONS:
                        wilson[unit][m] += entry["ci_method"][m] == "wilson"
                bar.update()
            for unit in UNITS:
                rows.append({"AUROC": f"{auroc:g}", "ICC": f"{icc:g}", "unit": unit,
                             **{m: 100 * hits[unit][m] / args.replications for m in METRICS},
                             **{f"W {SHORT[m]}": 100 * wilson[unit][m] / args.replications for m in PROPORTIONS}})
    return pd.DataFrame(rows)


def type_one_error(rng: np.random.Generator, args: argparse.Namespace, bar: tqdm) -> pd.DataFrame:
    """Share (%) of data sets with p < ALPHA under the null AUROC_A = AUROC_B, per test and AUROC."""
    tests = ("(a) bootstrap, patient", "(b) bootstrap, image", "(c) DeLong, clustered", "(d) DeLong, image")
    rows = []
    for auroc in AUROCS:
        mu, _ = true_values(auroc, args.prevalence)
        rejected = dict.fromkeys(tests, 0)
        bar.set_description(f"type-I error AUROC {auroc}")
        for _ in range(args.replications):
            patient, truth, scores = simulate(rng, args.patients, mu, args.null_icc, args.prevalence,
                                              models=2, rho=args.model_correlation)
            seed = int(rng.integers(2**32))
            p = {}
            for unit in UNITS:
                weights, codes, _ = resampling(patient, args.resamples, seed, unit)
                entry = paired_auroc_comparison(truth[:, None], scores[:, :1], scores[:, 1:], ["y"], weights,
                                                clusters=codes if unit == "patient" else None)["labels"]["y"]
                p[tests[0] if unit == "patient" else tests[1]] = entry["bootstrap"]["p_value"]
                if unit == "patient":
                    p[tests[2]], p[tests[3]] = entry["delong"]["p_value"], entry["delong_image_level"]["p_value"]
            for test in tests:
                rejected[test] += p[test] is not None and p[test] < ALPHA
            bar.update()
        rows.append({"AUROC": f"{auroc:g}", **{t: 100 * rejected[t] / args.replications for t in tests}})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A table as GitHub Markdown, numbers to one decimal."""
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def misses(table: pd.DataFrame, columns: list[str], target: tuple[float, float]) -> list[str]:
    """'key: column value' for every value of ``columns`` outside ``target``."""
    keys = [c for c in ("AUROC", "ICC", "unit") if c in table]
    return [f"{', '.join(f'{k} {row[k]}' for k in keys)}: {c} {row[c]:.1f}%"
            for _, row in table.iterrows() for c in columns if not target[0] <= row[c] <= target[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--replications", type=int, default=2000)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--prevalence", type=float, default=0.3)
    parser.add_argument("--null-icc", type=float, default=0.6, help="ICC of labels and models in part 2")
    parser.add_argument("--model-correlation", type=float, default=0.5, help="rho of the two models in part 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 replications of 100 resamples")
    args = parser.parse_args()
    if args.quick:
        args.replications, args.resamples = 10, 100

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    check_patients = 20_000 if args.quick else 400_000
    for auroc in AUROCS:
        print(f"true AUROC {auroc}: Phi(mu / sqrt 2) = {auroc:.4f}, different-patient pairs of "
              f"2 x {check_patients:,} simulated patients (ICC {ICCS[-1]:g}): "
              f"{check_true_auroc(rng, auroc, ICCS[-1], args.prevalence, check_patients):.4f}")

    r = args.replications
    print(f"\n{args.patients} patients (1-3 images), prevalence {args.prevalence}, threshold mu / 2, "
          f"{r} replications x {args.resamples} resamples, seed {args.seed}")
    with tqdm(total=len(AUROCS) * (len(ICCS) + 1) * r, unit="rep") as bar:
        table = coverage(rng, args, bar)
        sizes = type_one_error(rng, args, bar)

    print(f"\nPart 1: coverage (%) of nominal 95% intervals; W = share (%) of Wilson intervals. "
          f"Monte Carlo SE at 95%: {100 * np.sqrt(0.95 * 0.05 / r):.1f} points")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    coverage_misses = misses(table[table.unit == "patient"], list(METRICS), COVERAGE_TARGET)
    print(f"patient-unit cells outside {COVERAGE_TARGET[0]:g}-{COVERAGE_TARGET[1]:g}%:"
          + ("".join(f"\n  {m}" for m in coverage_misses) or " none"))

    print(f"\nPart 2: type-I error (%) at alpha {ALPHA}, equal AUROCs, ICC {args.null_icc}, model correlation "
          f"{args.model_correlation}. Monte Carlo SE at 5%: {100 * np.sqrt(ALPHA * (1 - ALPHA) / r):.1f} points")
    print(sizes.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    size_misses = misses(sizes, ["(a) bootstrap, patient", "(c) DeLong, clustered"], SIZE_TARGET)
    print(f"(a) and (c) outside {SIZE_TARGET[0]:g}-{SIZE_TARGET[1]:g}%:"
          + ("".join(f"\n  {m}" for m in size_misses) or " none"))

    if args.markdown:
        print("\n" + markdown(table) + "\n\n" + markdown(sizes))
    print(f"\ntotal runtime {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
