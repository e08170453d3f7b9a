"""Cross-validation summary of one run: pooled out-of-fold metrics, spread over cases and folds, and each
fold model's privacy parameters (`dpunet_cv_summary`).

Inputs, per fold f of results_dir (= results_root()/<Task>/<arch>__<config>__eps<e>/):
  fold_f/private/validation/summary.json   evaluate_folder on that fold's out-of-fold predictions (required)
  fold_f/release/privacy_report.json the trainer's report for that fold's model (optional; skipped with a note)
Outputs in results_dir: cv_summary.json (nnU-Net-shaped merged summary plus `table`, `per_fold`, `privacy`,
`notes`) and cv_summary.md (the same as Markdown tables).
"""
from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dpunet.dataset.msd import case_id_from_path
from dpunet.evaluation.evaluate import aggregate_metrics
from dpunet.paths import preprocessed_root, raw_root, resolve_task, results_root
from dpunet.planning.dp_plan import INIT_FROM_METAVAR, PUBLIC_PRETRAINING_SOURCES
from dpunet.planning.plans import planned_init_from
from dpunet.release import private_folder, release_folder
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import read_json_file, write_json, write_text

#: privacy_report.json keys copied into the summary (top-level keys of the report)
PRIVACY_KEYS = ("epsilon_prv", "epsilon_rdp", "delta", "noise_multiplier", "sample_rate", "steps", "clip_norm")
#: metrics in the cross-validation table
TABLE_METRICS = ("Dice", "IoU", "HD95", "NSD")
DEFAULT_FOLDS = (0, 1, 2, 3, 4)


def format_epsilon(eps: float) -> str:
    """Epsilon as it appears in run folder names: 8.0 -> '8', inf -> 'inf', 0.5 -> '0.5'."""
    eps = float(eps)
    if math.isnan(eps) or eps <= 0:
        raise DpunetError(f"epsilon must be a positive number or inf, got {eps}")
    if math.isinf(eps):
        return "inf"
    if eps.is_integer():
        return str(int(eps))
    return repr(eps)  # shortest string that reads back as the same float, e.g. '0.5', '2.25'


#: the initialisation that adds nothing to a run's name: the plan's default (training.init_from)
DEFAULT_INIT = "random_images"


def _format_number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _init_label(init_from: str) -> str:
    """'none' and the public sources (random_images, synthetic_brain) stay readable; a checkpoint path becomes
    its stem plus a short hash of the path (two checkpoints with the same file name stay apart, and '/' never
    enters a folder name)."""
    if init_from == "none" or init_from in PUBLIC_PRETRAINING_SOURCES:
        return init_from
    stem = Path(init_from).name.split(".")[0] or "checkpoint"
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem)[:24]
    return f"{stem}-{hashlib.sha256(str(init_from).encode()).hexdigest()[:6]}"


def run_folder_name(arch: str, configuration: str, eps: float, *, width: float = 1.0, seed: int = 0,
                    init_from: Optional[str] = None, run_tag: str = "") -> str:
    """The run's identity, the folder of one run under results_root()/<Task>/.

    '<arch>__<configuration>__eps<e>' with the defaults (width 1, seed 0, random_images start, no tag), so
    older runs keep their names; each non-default factor is appended, e.g.
    'unet__2d__eps8__w0.25__seed1__init-none__h1a2b3c4' (run_tag: a study's short hash of its other overrides).
    dpunet_train, dpunet_predict, dpunet_cv_summary and dpunet_study all name runs through this function.
    """
    if not float(width) > 0:
        raise DpunetError(f"width must be positive, got {width}")
    parts = [arch, configuration, f"eps{format_epsilon(eps)}"]
    if float(width) != 1.0:
        parts.append(f"w{_format_number(width)}")
    if int(seed) != 0:
        parts.append(f"seed{int(seed)}")
    if init_from is not None and init_from != DEFAULT_INIT:
        parts.append(f"init-{_init_label(init_from)}")
    if run_tag:
        if not all(ch.isalnum() or ch in "-_." for ch in run_tag):
            raise DpunetError(f"run tag {run_tag!r}: only letters, digits, '-', '_' and '.' are allowed")
        parts.append(run_tag)
    return "__".join(parts)


def add_run_identity_arguments(p: argparse.ArgumentParser) -> None:
    """--width, --seed, --init-from, --run-tag: the factors that, with arch, configuration and epsilon, name a run
    (give the values the run was trained with; see run_folder_name)."""
    p.add_argument("--width", type=float, default=1.0, help="width multiplier the run was trained with (1)")
    p.add_argument("--seed", type=int, default=0, help="seed the run was trained with (0)")
    p.add_argument("--init-from", default=None, metavar=INIT_FROM_METAVAR,
                   help="initial weights the run was trained from (default: the plan's training.init_from)")
    p.add_argument("--run-tag", default="", help="run tag the run was trained with (dpunet_study sets one)")


def run_identity_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of run_folder_name from parsed add_run_identity_arguments options."""
    return {"width": args.width, "seed": args.seed, "init_from": args.init_from, "run_tag": args.run_tag}


def with_planned_start(task_name: str, configuration: str, identity: dict[str, Any] | None) -> dict[str, Any]:
    """`identity` (run_folder_name's keywords) with no init_from given filled with the plan's start, as
    dpunet_train without --init-from uses it (the run's folder name carries it)."""
    identity = dict(identity or {})
    if identity.get("init_from") is None:
        identity["init_from"] = planned_init_from(task_name, configuration)
    return identity


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample sd, n) over the defined (non-NaN) values; sd is NaN below two values."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    mean = float(arr.mean()) if arr.size else math.nan
    sd = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return mean, sd, int(arr.size)


def _read_privacy(report_path: Path, fold: int, notes: list[str]) -> Optional[dict[str, Any]]:
    if not report_path.is_file():
        notes.append(f"fold {fold}: {report_path.name} not found, its privacy parameters are not shown")
        return None
    report = read_json_file(report_path, "privacy report")
    if not isinstance(report, dict):
        raise DpunetError(f"{report_path}: expected a JSON object")
    from dpunet.privacy.report import key_figures

    figures = key_figures(report)
    absent = [k for k in PRIVACY_KEYS if k not in figures]
    if absent:
        notes.append(f"fold {fold}: {report_path.name} has no {', '.join(absent)}")
    return {k: figures.get(k) for k in PRIVACY_KEYS}


def _case_foreground(metrics: dict[str, dict[str, float]], name: str) -> float:
    """One case's mean over labels of a metric (NaN-skipping; NaN when no label defines it)."""
    values = np.asarray([m.get(name, math.nan) for m in metrics.values()], dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def summarize_cross_validation(
    results_dir: Path, folds: Sequence[int] = DEFAULT_FOLDS, n_splits: int = 5, write: bool = True
) -> dict[str, Any]:
    """Merge the folds' validation summaries of `results_dir` into one cross-validation summary.

    Means are recomputed over all pooled cases (NaN-skipping, as in evaluate_folder). `table[label][metric]`
    holds mean and sample sd across cases and across folds (sd of the fold means); the row `foreground`
    uses each case's mean over labels. With `write`, cv_summary.json and cv_summary.md go to `results_dir`.
    """
    results_dir = Path(results_dir)
    folds = [int(f) for f in folds]
    if not folds:
        raise DpunetError("no folds to summarise")
    if len(set(folds)) != len(folds):
        raise DpunetError(f"folds listed twice: {folds}")
    if not results_dir.is_dir():
        raise DpunetError(f"{results_dir}: run folder not found")
    summary_paths = {f: private_folder(results_dir / f"fold_{f}") / "validation" / "summary.json" for f in folds}
    missing = [str(p) for p in summary_paths.values() if not p.is_file()]
    if missing:
        raise DpunetError(f"validation summaries missing (evaluate those folds first): {', '.join(missing)}")

    notes: list[str] = []
    settings: Optional[dict[str, Any]] = None
    labels: dict[str, str] = {}
    metric_per_case: list[dict[str, Any]] = []
    per_fold: dict[str, dict[str, Any]] = {}
    fold_of_case: dict[str, int] = {}
    privacy: dict[str, Optional[dict[str, Any]]] = {}
    for f, path in summary_paths.items():
        fold_summary = read_json_file(path, "fold summary")
        if not isinstance(fold_summary, dict) or "metric_per_case" not in fold_summary:
            raise DpunetError(f"{path}: not an evaluation summary (no 'metric_per_case')")
        fold_settings = fold_summary.get("settings")
        if settings is None:
            settings = fold_settings
        elif fold_settings != settings:
            raise DpunetError(
                f"{path}: evaluation settings differ from fold {folds[0]}'s; re-evaluate all folds alike"
            )
        labels.update(fold_summary.get("labels", {}))
        cases = []
        for entry in fold_summary["metric_per_case"]:
            case_id = entry.get("case_id") or case_id_from_path(entry["reference_file"])
            if case_id in fold_of_case:
                raise DpunetError(
                    f"{path}: case '{case_id}' is also in fold {fold_of_case[case_id]}'s validation set; "
                    "out-of-fold cases must be disjoint"
                )
            fold_of_case[case_id] = f
            cases.append({**entry, "case_id": case_id, "fold": f})
        if not cases:
            raise DpunetError(f"{path}: no cases")
        metric_per_case.extend(cases)
        fold_agg = aggregate_metrics(cases)
        per_fold[str(f)] = {
            "n_cases": fold_agg["n_cases"],
            "mean": fold_agg["mean"],
            "foreground_mean": fold_agg["foreground_mean"],
        }
        privacy[str(f)] = _read_privacy(release_folder(results_dir / f"fold_{f}") / "privacy_report.json", f, notes)

    pooled = aggregate_metrics(metric_per_case)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for label in list(pooled["mean"]) + ["foreground"]:
        table[label] = {}
        for name in TABLE_METRICS:
            if label == "foreground":
                case_values = [_case_foreground(c["metrics"], name) for c in metric_per_case]
                fold_values = [per_fold[str(f)]["foreground_mean"].get(name, math.nan) for f in folds]
            else:
                case_values = [c["metrics"].get(label, {}).get(name, math.nan) for c in metric_per_case]
                fold_values = [per_fold[str(f)]["mean"].get(label, {}).get(name, math.nan) for f in folds]
            case_mean, case_sd, n_defined = _mean_sd(case_values)
            fold_mean, fold_sd, n_folds = _mean_sd(fold_values)
            table[label][name] = {
                "mean_over_cases": case_mean,
                "sd_over_cases": case_sd,
                "n_cases_defined": n_defined,
                "mean_over_folds": fold_mean,
                "sd_over_folds": fold_sd,
                "n_folds": n_folds,
            }

    notes.append(
        f"In {n_splits}-fold cross-validation each patient is in the training set of {n_splits - 1} of the "
        f"{n_splits} fold models and in the validation set of one. The privacy parameters above describe one "
        "fold model each; a patient's guarantee for an ensemble of the fold models composes the "
        f"{n_splits - 1} models it helped train and is computed elsewhere (the ensemble privacy report)."
    )
    if sorted(folds) != list(range(n_splits)):
        notes.append(f"only folds {folds} of {n_splits} are summarised; the pooled cases are not all patients")

    cv: dict[str, Any] = {"metric_per_case": metric_per_case}
    cv.update(pooled)
    cv.update(
        {
            "labels": labels,
            "settings": settings,
            "folds": folds,
            "n_splits": n_splits,
            "per_fold": per_fold,
            "table": table,
            "privacy": privacy,
            "notes": notes,
            "run": results_dir.name,
        }
    )
    if write:
        write_json(cv, results_dir / "cv_summary.json")
        write_text(format_cv_markdown(cv), results_dir / "cv_summary.md")
    return cv


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def format_cv_markdown(cv: dict[str, Any]) -> str:
    """cv_summary.md: the table across cases and folds, per-fold means, privacy per fold, notes."""
    settings = cv.get("settings") or {}
    lines = [
        f"# Cross-validation summary: {cv.get('run', '')}",
        "",
        f"Folds {' '.join(str(f) for f in cv['folds'])}; {cv['n_cases']} out-of-fold cases; "
        f"NSD tolerance {settings.get('nsd_tolerance_mm', '?')} mm; both-empty rule "
        f"'{settings.get('empty_both', '?')}'. Means skip undefined (NaN) values; sd is the sample sd.",
        "",
        "| label | metric | mean ± sd over cases | cases defined | mean ± sd over folds |",
        "|---|---|---|---|---|",
    ]
    for label, metrics in cv["table"].items():
        name = label if label == "foreground" else f"{label} {cv['labels'].get(label, '')}".strip()
        for metric, row in metrics.items():
            digits = 2 if metric == "HD95" else 4
            lines.append(
                f"| {name} | {metric} | {_fmt(row['mean_over_cases'], digits)} ± {_fmt(row['sd_over_cases'], digits)}"
                f" | {row['n_cases_defined']}/{cv['n_cases']}"
                f" | {_fmt(row['mean_over_folds'], digits)} ± {_fmt(row['sd_over_folds'], digits)} |"
            )
    labels = [k for k in cv["mean"]]
    lines += [
        "",
        "## Per fold (mean Dice)",
        "",
        "| fold | cases | " + " | ".join(f"Dice {k}" for k in labels) + " | foreground Dice |",
        "|---|---|" + "---|" * (len(labels) + 1),
    ]
    for f in cv["folds"]:
        entry = cv["per_fold"][str(f)]
        cells = [_fmt(entry["mean"].get(k, {}).get("Dice", math.nan)) for k in labels]
        lines.append(
            f"| {f} | {entry['n_cases']} | " + " | ".join(cells) + f" | {_fmt(entry['foreground_mean'].get('Dice'))} |"
        )
    lines += [
        "",
        "## Privacy per fold model",
        "",
        "| fold | " + " | ".join(PRIVACY_KEYS) + " |",
        "|---|" + "---|" * len(PRIVACY_KEYS),
    ]
    for f in cv["folds"]:
        report = cv["privacy"].get(str(f))
        cells = ["not reported"] + [""] * (len(PRIVACY_KEYS) - 1) if report is None else [
            _fmt(report.get(k)) for k in PRIVACY_KEYS
        ]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in cv["notes"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpunet_cv_summary",
        description="Merge the folds' validation summaries of one run into cv_summary.json and cv_summary.md "
        "(mean and sd over cases and folds, privacy parameters per fold).",
    )
    p.add_argument("-t", "--task", required=True, help="task id or name")
    p.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres or 2d")
    p.add_argument("--eps", required=True, type=float, help="the run's epsilon (a number or inf)")
    p.add_argument("--arch", default="unet", help="architecture name in the run folder (default unet)")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=list(DEFAULT_FOLDS), help="folds (default 0-4)")
    p.add_argument("--n-splits", type=int, default=5, help="number of folds of the split (default 5)")
    add_run_identity_arguments(p)
    return p


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    task = resolve_task(args.task, results_root(), raw_root(), preprocessed_root())
    identity = with_planned_start(task, args.configuration, run_identity_kwargs(args))
    name = run_folder_name(args.arch, args.configuration, args.eps, **identity)
    run_dir = results_root() / task / name
    cv = summarize_cross_validation(run_dir, args.folds, n_splits=args.n_splits)
    print(format_cv_markdown(cv))
    print(f"written: {run_dir / 'cv_summary.json'}, {run_dir / 'cv_summary.md'}")
    return 0


if __name__ == "__main__":
    main()
