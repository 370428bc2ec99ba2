"""Where privacy becomes cheap: DP-SGD minus non-private mean AUROC against the number of patients.

    python bench/bench_scale.py [--sizes 1000,4000,16000] [--epsilons 8,1] [--seeds 2] [--out DIR]
                                [--set KEY=VALUE ...] [--non-private-set KEY=VALUE ...]

For each size N the built-in generator draws a private site of N patients (``data.synthetic.
private_patients``; 70% of them train) and one ``sweep`` trains the same recipe (the config, from
scratch unless --set says otherwise, 32 px by default) at every epsilon and non-privately (with
``--non-private-set``'s changes, a recipe suited to non-private training), each with ``--seeds``
seeds, on one patient split. The sweep pairs every budget with the non-private runs on the
same test patients, resampling patients and seeds (``evaluation/sweep.py``), so each point is a paired
difference with its 95% interval. The study's claim is that the difference shrinks as N grows.

Writes, under --out (default ``experiments/scale``): one sweep folder per size, ``scale.csv`` and
``scale.json`` (size, training patients, budget, both means, the difference, its interval and p-value)
and ``scale.png`` (the difference with its interval against training patients, log scale), and prints
the table. Finished runs are skipped on a second call, so an interrupted benchmark continues.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from artifacts import atomic_write_text, json_text, read_json  # noqa: E402
from main_2D_DP import DEFAULT_CONFIG, parse_epsilons, run_sweep  # noqa: E402
from Prediction_DP import load_experiment_config  # noqa: E402

SCRATCH = ["model.pretrained_checkpoint=null", "data.image_size=32"]


def scale_rows(sweep_dir: Path, size: int) -> list[dict]:
    """One row per private budget of a finished sweep: both means and the paired difference."""
    result = read_json(sweep_dir / "sweep.json")
    table = pd.DataFrame(result["table"])
    reference = table[table["epsilon"].isna()]["auroc_mean"].mean()  # inf (non-private) is null in JSON
    rows = []
    for budget, columns in result["difference_to_non_private"].items():
        d, private = columns["auroc_mean"], table[table["epsilon"] == float(budget)]
        ci = d.get("ci95") or [None, None]
        rows.append({"patients": size, "epsilon": float(budget),
                     "non_private_auroc": reference, "dp_auroc": private["auroc_mean"].mean(),
                     "difference": d["difference"], "ci95_low": ci[0], "ci95_high": ci[1], "p_value": d["p_value"],
                     "seeds": result["seeds"]})
    return rows


def plot(table: pd.DataFrame, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for budget, rows in table.groupby("epsilon"):
        rows = rows.sort_values("training_patients")
        axis.errorbar(rows["training_patients"], rows["difference"],
                      yerr=[rows["difference"] - rows["ci95_low"], rows["ci95_high"] - rows["difference"]],
                      marker="o", capsize=4, label=f"epsilon {budget:g}")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("training patients (log scale)")
    axis.set_ylabel("DP minus non-private mean AUROC")
    axis.set_title("The cost of privacy against dataset size\n(paired, 95% interval over test patients and seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000,16000", help="private patients per dataset, comma-separated")
    parser.add_argument("--epsilons", default="8,1", help="private budgets (the non-private reference is added)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=Path("experiments") / "scale")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"config overrides after the benchmark's own ({' '.join(SCRATCH)})")
    parser.add_argument("--non-private-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides of the non-private reference runs only (their own recipe)")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    epsilons = [float("inf"), *parse_epsilons(args.epsilons)]
    rows = []
    for size in sizes:
        started = time.time()
        sweep_dir = run_sweep(epsilons, f"patients_{size}", args.config,
                              [*SCRATCH, f"data.synthetic.private_patients={size}",
                               f"output.target_dir={args.out}", *args.overrides], seeds=args.seeds,
                              non_private_overrides=args.non_private_set)
        trained = load_experiment_config(next(sweep_dir.glob("eps_inf*"))).derived["n_train_patients"]
        rows += [{**row, "training_patients": trained} for row in scale_rows(sweep_dir, size)]
        print(f"{size} patients: {time.time() - started:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "scale.csv", table.to_csv(index=False))
    atomic_write_text(args.out / "scale.json", json_text({"sizes": sizes, "epsilons": epsilons[1:],
                                                          "seeds": args.seeds, "overrides": args.overrides,
                                                          "non_private_overrides": args.non_private_set,
                                                          "rows": table.to_dict(orient="records")}))
    plot(table, args.out / "scale.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out / 'scale.csv'}, scale.json and scale.png")


if __name__ == "__main__":
    main()
