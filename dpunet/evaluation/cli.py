"""`dpunet_evaluate`: evaluate a folder of predictions against reference label maps, write summary.json."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from dpunet.evaluation.metrics import EMPTY_BOTH_RULES
from dpunet.utils.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpunet_evaluate",
        description="Compare predicted segmentations with reference label maps (matched by file name) and "
        "write summary.json: Dice, IoU, HD95, normalised surface Dice, TP/FP/FN/TN per case and label, "
        "and means. Metric definitions: documentation/evaluation.md.",
    )
    p.add_argument("-ref", required=True, type=Path, help="folder of reference label maps (e.g. labelsTr)")
    p.add_argument("-pred", required=True, type=Path, help="folder of predicted segmentations")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("-t", "-d", "--task", "--dataset", dest="task",
                       help="task id or name; labels come from its dataset.json in DPUNET_RAW")
    which.add_argument("-l", "--labels", type=int, nargs="+", help="label values to evaluate (instead of -t)")
    p.add_argument("--ignore-label", type=int, default=None,
                   help="with -l: label value whose reference voxels are excluded from the evaluation")
    p.add_argument("-o", "--output", type=Path, default=None, help="summary file (default PRED/summary.json)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0,
                   help="tolerance in mm of the normalised surface Dice (default 1.0)")
    p.add_argument("--empty-both", choices=EMPTY_BOTH_RULES, default="nan",
                   help="Dice/IoU/NSD when reference and prediction are both empty (default nan, as nnU-Net)")
    p.add_argument("--only-predicted", action="store_true",
                   help="evaluate only the cases present in PRED (e.g. one fold's validation cases) instead of "
                   "requiring a prediction for every reference")
    return p


def _fmt(value: float, digits: int) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """Mean Dice / HD95 / NSD per label and the foreground mean, as a short text table."""
    tol = summary["settings"]["nsd_tolerance_mm"]
    nsd_head = f"NSD@{tol:g}mm"
    rows = [f"{'label':<20} {'Dice':>7} {'HD95 mm':>8} {nsd_head:>10}  undefined Dice/HD95"]
    for label, means in summary["mean"].items():
        label_name = summary.get("labels", {}).get(label, "")
        name = label if label_name in ("", label) else f"{label} {label_name}"
        nan = summary["nan_counts"][label]
        rows.append(
            f"{name[:20]:<20} {_fmt(means['Dice'], 4):>7} {_fmt(means['HD95'], 2):>8} {_fmt(means['NSD'], 4):>10}"
            f"  {nan['Dice']}/{nan['HD95']} of {summary['n_cases']}"
        )
    fg = summary["foreground_mean"]
    rows.append(f"{'foreground mean':<20} {_fmt(fg['Dice'], 4):>7} {_fmt(fg['HD95'], 2):>8} {_fmt(fg['NSD'], 4):>10}")
    return "\n".join(rows)


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    from dpunet.api import evaluate

    args = build_parser().parse_args(argv)
    summary = evaluate(args.ref, args.pred, args.task, labels=args.labels, ignore_label=args.ignore_label,
                       output=args.output, num_processes=args.num_processes, nsd_tolerance=args.nsd_tolerance,
                       empty_both=args.empty_both, only_predicted=args.only_predicted)
    print(f"{summary['n_cases']} cases evaluated")
    print(format_table(summary))
    print(f"summary written to {summary['summary_file']}")
    return 0


if __name__ == "__main__":
    main()
