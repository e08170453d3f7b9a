"""Plot a run's validation Dice against epsilon (mean over the given folds), from the run folders dpunet_train wrote.

    python scripts/plot_epsilon_curve.py -t 4 -c 2d --width 0.5 --run-tag pubtuned --folds 0 1 2 3 4 \
        --epsilons 1 2 4 8 inf -o documentation/results_epsilon_curve_2d_public_recipe.png

The run identity options (--width, --seed, --init-from, --run-tag) are dpunet_cv_summary's; without --init-from
the plan's start is assumed, as dpunet_train does.

Reads <results>/<Task>/<run>/fold_F/private/validation/summary.json of each epsilon's run and fold (the runs' names as
dpunet_train gives them) and writes the plot and, beside it, a CSV of the numbers plotted. The CSV and plot hold
aggregate validation Dice only (no patient id); like every validation metric they are private by default
(documentation/privacy_model.md): release them as a data owner's decision.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

from dpunet.evaluation.cross_validation import (add_run_identity_arguments, run_folder_name, run_identity_kwargs,
                                                with_planned_start)
from dpunet.paths import results_root
from dpunet.planning.plans import load_plans
from dpunet.utils.arguments import parse_epsilon
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json


def curve_rows(task_name: str, configuration: str, epsilons: list[float], folds: list[str], arch: str,
               identity: dict[str, object]) -> list[dict[str, object]]:
    """One row per epsilon: epsilon, sigma (first fold), Dice per label and their mean, each the mean over folds,
    and the sd over folds of the mean. `identity`: run_folder_name's keywords (width, seed, init_from, run_tag)."""
    rows = []
    for eps in epsilons:
        folder = results_root() / task_name / run_folder_name(arch, configuration, eps, **identity)
        summaries = []
        for fold in folds:
            summary = folder / f"fold_{fold}" / "private" / "validation" / "summary.json"
            if not summary.is_file():
                raise DpunetError(f"{summary} not found: train and validate that run first")
            summaries.append(load_json(summary))
        report = folder / f"fold_{folds[0]}" / "release" / "privacy_report.json"
        labels = list(summaries[0]["mean"])
        rows.append({"epsilon": eps, "folds": len(folds),
                     "sigma": load_json(report)["noise_multiplier"] if report.is_file() else None,
                     **{f"dice_{k}": statistics.mean(v["mean"][k]["Dice"] for v in summaries) for k in labels},
                     "dice_mean": statistics.mean(v["foreground_mean"]["Dice"] for v in summaries),
                     "dice_mean_sd_over_folds": (statistics.stdev(v["foreground_mean"]["Dice"] for v in summaries)
                                                 if len(summaries) > 1 else None)})
    return rows


def plot(rows: list[dict[str, object]], output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if math.isfinite(float(r["epsilon"]))]
    labels = [k for k in rows[0] if k.startswith("dice_") and not k.endswith("_sd_over_folds")]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in labels:
        ax.plot([r["epsilon"] for r in finite], [r[key] for r in finite], marker="o",
                label=key.replace("dice_", "Dice "), lw=2 if key == "dice_mean" else 1)
        private_max = max(float(r["epsilon"]) for r in finite)
        for r in rows:
            if not math.isfinite(float(r["epsilon"])):  # non-private: a dashed level on the right
                ax.axhline(r[key], ls="--", lw=0.8, color=ax.lines[-1].get_color())
                ax.annotate("inf", (private_max, r[key]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (delta 1e-5, per patient)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--task", required=True)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("--arch", default="unet")
    add_run_identity_arguments(p)
    p.add_argument("--folds", nargs="+", default=["0"], help="folds to average (0)")
    p.add_argument("--epsilons", nargs="+", type=parse_epsilon, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    task_name, _ = load_plans(args.task)
    identity = with_planned_start(task_name, args.configuration, run_identity_kwargs(args))
    rows = curve_rows(task_name, args.configuration, args.epsilons, args.folds, args.arch, identity)
    with open(args.output.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    start = f", from {identity['init_from']}" if identity["init_from"] else ""
    title = f"{task_name} {args.configuration}, {args.arch} width {args.width:g}{start}, folds {' '.join(args.folds)}"
    plot(rows, args.output, title)
    print(f"written: {args.output}, {args.output.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
