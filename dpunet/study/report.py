"""The study's report: results.csv (one row per cell), report.md (per task and epsilon: architectures ranked,
mean +- sd over folds and seeds, bootstrap 95% CI over cases, DP gap, Wilcoxon signed-rank against the
baseline `unet` with Holm correction, the budget of every cell) and PNG plots.

Scores are computed on each cell's evaluation summaries (validation: the fold's held-out patients; test: the
task's labelled test set when it has one). The primary score of a task is the mean foreground Dice, or the mIoU
for CamVid (void is the ignore label and is never evaluated). A case's score is its mean over the evaluated
labels (NaN-skipping), so the tests below pair the same cases across architectures.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dpunet.study.cells import DONE, cell_folder
from dpunet.study.spec import Cell, StudySpec
from dpunet.study.status import cell_states
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json, write_text

BASELINE = "unet"
BOOTSTRAP_SAMPLES = 2000
PRIVACY_COLUMNS = {"sigma": "noise_multiplier", "q": "sample_rate", "T": "steps", "C": "clip_norm",
                   "delta": "delta", "epsilon_prv": "epsilon_prv", "epsilon_rdp": "epsilon_rdp"}


def primary_metric(task_name: str) -> str:
    """'IoU' (reported as mIoU) for CamVid, the convention of that benchmark; 'Dice' otherwise."""
    return "IoU" if "camvid" in task_name.lower() else "Dice"


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def case_scores(summary: dict[str, Any], metric: str) -> dict[str, float]:
    """{case id: mean of `metric` over the evaluated labels} of an evaluation summary."""
    scores = {}
    for entry in summary["metric_per_case"]:
        case_id = entry.get("case_id") or Path(entry["reference_file"]).name.split(".")[0]
        scores[case_id] = _nanmean([m.get(metric, math.nan) for m in entry["metrics"].values()])
    return scores


def pooled_iou(summary: dict[str, Any]) -> dict[str, float]:
    """Per-label IoU from the TP, FP and FN summed over all cases (the usual CamVid figure)."""
    totals: dict[str, list[float]] = {}
    for entry in summary["metric_per_case"]:
        for label, m in entry["metrics"].items():
            if all(k in m for k in ("TP", "FP", "FN")):
                t = totals.setdefault(label, [0.0, 0.0, 0.0])
                t[0] += m["TP"]
                t[1] += m["FP"]
                t[2] += m["FN"]
    return {label: (tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan) for label, (tp, fp, fn) in totals.items()}


def _summary_columns(summary: dict[str, Any], prefix: str) -> dict[str, Any]:
    labels = summary.get("labels", {})
    row: dict[str, Any] = {f"{prefix}n_cases": summary.get("n_cases", len(summary["metric_per_case"]))}
    for label, metrics in summary["mean"].items():
        name = labels.get(label, label)
        row[f"{prefix}dice_{name}"] = metrics.get("Dice")
        row[f"{prefix}iou_{name}"] = metrics.get("IoU")
    fg = summary.get("foreground_mean", {})
    row[f"{prefix}dice_mean"] = fg.get("Dice")
    row[f"{prefix}iou_mean"] = fg.get("IoU")
    pooled = pooled_iou(summary)
    row[f"{prefix}miou"] = _nanmean(list(pooled.values())) if pooled else None
    for metric in ("HD95", "NSD"):
        value = fg.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            row[f"{prefix}{metric.lower()}_mean"] = value
    return row


def cell_row(spec: StudySpec, cell: Cell, state: str) -> dict[str, Any]:
    """One results.csv row: factors, status, parameters, privacy figures, metrics, time and memory."""
    row: dict[str, Any] = {"key": cell.key, "status": state, **cell.factors(),
                           "overrides": json.dumps(cell.override_dict, sort_keys=True), "run_name": cell.run_name}
    if state != "done":
        return row
    from dpunet.privacy.report import key_figures

    done = load_json(cell_folder(spec.folder, cell) / DONE)
    row["task_name"] = done["task_name"]
    run_config = load_json(done["run_config"]) if Path(done["run_config"]).is_file() else {}
    params = run_config.get("parameters", {})
    row["parameters"] = params.get("total")
    row["trained_parameters"] = params.get("trained")
    report = load_json(done["privacy_report"])
    figures = key_figures(report)
    for column, key in PRIVACY_COLUMNS.items():
        row[column] = figures.get(key)
    row["K"] = report.get("patches_per_patient")
    row["N"] = report.get("num_patients")
    metric = primary_metric(done["task_name"])
    row["score_metric"] = "mIoU" if metric == "IoU" else "foreground Dice"
    for name, prefix in (("validation_summary", ""), ("test_summary", "test_")):
        if done.get(name) and Path(done[name]).is_file():
            summary = load_json(done[name])
            row.update(_summary_columns(summary, prefix))
            row[f"{prefix}score"] = row[f"{prefix}miou"] if metric == "IoU" else row[f"{prefix}dice_mean"]
    for key in ("wall_seconds", "dp_step_seconds", "peak_rss_mb", "peak_gpu_mb"):
        row[key] = done.get(key)
    return row


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        return f"{value:.6g}"
    return str(value)


def results_rows(spec: StudySpec) -> list[dict[str, Any]]:
    states = cell_states(spec)
    return [cell_row(spec, c, states[c.key]) for c in spec.cells]


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k)) for k in columns})
    write_text(buf.getvalue(), path)


# -------------------------------------------------------------------------------------------- statistics
def bootstrap_ci(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean over cases (resampling cases with replacement); NaN below 2 cases."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)  # fixed: the report is a deterministic function of the results
    means = arr[rng.integers(0, arr.size, size=(samples, arr.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def case_counts(summary: dict[str, Any]) -> dict[str, np.ndarray]:
    """{case id: (labels, 3) array of TP, FP, FN}, labels in the summary's order: what pooled IoU sums."""
    out = {}
    for entry in summary["metric_per_case"]:
        case_id = entry.get("case_id") or Path(entry["reference_file"]).name.split(".")[0]
        out[case_id] = np.asarray([[m.get(k, 0) for k in ("TP", "FP", "FN")] for m in entry["metrics"].values()],
                                  dtype=np.float64)
    return out


def _pooled_miou(counts: np.ndarray) -> np.ndarray:
    """mIoU of (..., cases, labels, 3) counts summed over cases (labels with no voxels anywhere left out)."""
    tp, fp, fn = np.moveaxis(counts.sum(axis=-3), -1, 0)
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    return np.nanmean(iou, axis=-1)


def bootstrap_pooled_miou_ci(counts: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
                             ) -> tuple[float, float]:
    """Percentile 95% interval of the pooled mIoU when the cases ((cases, labels, 3) TP/FP/FN) are resampled."""
    if counts.shape[0] < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = _pooled_miou(counts[rng.integers(0, counts.shape[0], size=(samples, counts.shape[0]))])
    return float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1); NaN entries stay NaN and do not count."""
    defined = sorted((p, k) for k, p in p_values.items() if not math.isnan(p))
    m = len(defined)
    adjusted, running = {k: math.nan for k in p_values}, 0.0
    for i, (p, k) in enumerate(defined):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[k] = running
    return adjusted


def wilcoxon_p(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p over the cases both define (NaN when fewer than 2 or all equal)."""
    from scipy.stats import wilcoxon

    common = [c for c in a if c in b and not math.isnan(a[c]) and not math.isnan(b[c])]
    diffs = np.asarray([a[c] - b[c] for c in common])
    if len(common) < 2 or not np.any(diffs != 0):
        return math.nan, len(common)
    return float(wilcoxon(diffs).pvalue), len(common)


def _group_case_scores(spec: StudySpec, rows: list[dict[str, Any]]
                       ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """({cell key: per-case primary scores}, {cell key: per-case TP/FP/FN} for mIoU tasks) on the validation
    cases of the done cells."""
    scores, counts = {}, {}
    for row in rows:
        if row["status"] != "done":
            continue
        done = load_json(cell_folder(spec.folder, spec.cell(row["key"])) / DONE)
        if done.get("validation_summary") and Path(done["validation_summary"]).is_file():
            summary = load_json(done["validation_summary"])
            metric = primary_metric(done["task_name"])
            scores[row["key"]] = case_scores(summary, metric)
            if metric == "IoU":
                counts[row["key"]] = case_counts(summary)
    return scores, counts


def _eps_sort_key(text: str) -> float:
    return math.inf if text == "inf" else float(text)


def arch_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{cell key: the name its architecture is ranked under}: the architecture's name at the width most cells of
    its task and configuration use, `name (width w)` otherwise, so that a width study is never pooled with the
    common width's cells (nor compared as if it were the same network)."""
    widths: dict[tuple, list[float]] = {}
    for row in rows:
        widths.setdefault((row["task"], row["configuration"]), []).append(float(row["width"]))
    common = {key: max(set(ws), key=ws.count) for key, ws in widths.items()}
    return {row["key"]: row["arch"] if float(row["width"]) == common[(row["task"], row["configuration"])]
            else f"{row['arch']} (width {float(row['width']):g})" for row in rows}


def arch_table(rows: list[dict[str, Any]], scores: dict[str, dict[str, float]],
               counts: Optional[dict[str, dict[str, np.ndarray]]] = None) -> list[dict[str, Any]]:
    """Per (task, configuration, epsilon, arch) over the done cells: mean +- sd of the cells' scores (folds and
    seeds), bootstrap CI over the pooled cases (each case's score averaged over the arch's cells), DP gap and the
    Holm-corrected Wilcoxon p against the baseline."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    labels = arch_labels(rows)
    for row in rows:
        if row["status"] == "done" and row.get("score") is not None:
            key = (row["task_name"], row["configuration"], row["epsilon"], labels[row["key"]])
            groups.setdefault(key, []).append(row)
    table = []
    case_means: dict[tuple, dict[str, float]] = {}
    for (task, config, eps, arch), members in groups.items():
        cells = [scores.get(m["key"], {}) for m in members]
        cases = sorted({c for s in cells for c in s})
        case_means[(task, config, eps, arch)] = {c: _nanmean([s.get(c, math.nan) for s in cells]) for c in cases}
        values = [float(m["score"]) for m in members]
        if counts and all(m["key"] in counts for m in members):
            # mIoU is pooled over cases (CamVid): resample cases, sum their counts over the arch's cells
            pooled = np.stack([sum(counts[m["key"]][c] for m in members if c in counts[m["key"]]) for c in cases])
            lo, hi = bootstrap_pooled_miou_ci(pooled)
        else:
            lo, hi = bootstrap_ci(list(case_means[(task, config, eps, arch)].values()))
        table.append({"task": task, "configuration": config, "epsilon": eps, "arch": arch, "n_cells": len(members),
                      "mean": float(np.mean(values)),
                      "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                      "ci_low": lo, "ci_high": hi, "n_cases": len(cases), "score_metric": members[0]["score_metric"],
                      "parameters": members[0].get("trained_parameters"),
                      "test_mean": _nanmean([float(m["test_score"]) for m in members
                                             if m.get("test_score") is not None]),
                      "width": members[0].get("width")})
    by_key = {(r["task"], r["configuration"], r["epsilon"], r["arch"]): r for r in table}
    for r in table:
        private = by_key.get((r["task"], r["configuration"], "inf", r["arch"]))
        r["dp_gap"] = r["mean"] / private["mean"] if private and r["epsilon"] != "inf" and private["mean"] > 0 \
            else math.nan
    for (task, config, eps) in {(r["task"], r["configuration"], r["epsilon"]) for r in table}:
        members = [r for r in table if (r["task"], r["configuration"], r["epsilon"]) == (task, config, eps)]
        base = case_means.get((task, config, eps, BASELINE))
        raw = {}
        for r in members:
            if base is None or r["arch"] == BASELINE:
                r["p_raw"], r["n_pairs"] = math.nan, 0
                continue
            r["p_raw"], r["n_pairs"] = wilcoxon_p(case_means[(task, config, eps, r["arch"])], base)
            raw[r["arch"]] = r["p_raw"]
        adjusted = holm(raw)
        for r in members:
            r["p_holm"] = adjusted.get(r["arch"], math.nan)
    table.sort(key=lambda r: (r["task"], r["configuration"], _eps_sort_key(r["epsilon"]), -r["mean"]))
    return table


# ------------------------------------------------------------------------------------------------- report
def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2g}" if value < 0.01 else f"{value:.3f}"


def summary_tables(table: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per task and configuration, one row per architecture and one column per epsilon (mean
    score over its cells), the DP gap at each finite epsilon and the trained parameters; ranked by the score at
    the largest finite epsilon (the private setting the study is about), then the non-private one."""
    lines = ["## Summary", ""]
    for task, config in _panels(table):
        members = [r for r in table if (r["task"], r["configuration"]) == (task, config)]
        eps_order = sorted({r["epsilon"] for r in members}, key=_eps_sort_key)
        finite = [e for e in eps_order if e != "inf"]
        cell = {(r["arch"], r["epsilon"]): r for r in members}

        def rank_key(arch: str) -> tuple:
            scores = [cell[(arch, e)]["mean"] if (arch, e) in cell else -1.0 for e in (finite[-1:] + ["inf"])]
            return tuple(-v for v in scores)

        archs = sorted({r["arch"] for r in members}, key=rank_key)
        lines += [f"**{task} {config}** ({members[0]['score_metric']}; cells per entry in the tables below)", "",
                  "| architecture | " + " | ".join(f"ε={e}" for e in eps_order) + " | "
                  + " | ".join(f"DP gap ε={e}" for e in finite) + " | trained parameters |",
                  "|---" * (2 + len(eps_order) + len(finite)) + "|"]
        for arch in archs:
            scores = [_f(cell[(arch, e)]["mean"]) if (arch, e) in cell else "-" for e in eps_order]
            gaps = [_f(cell[(arch, e)]["dp_gap"], 2) if (arch, e) in cell else "-" for e in finite]
            params = next((r["parameters"] for r in members if r["arch"] == arch and r["parameters"] is not None),
                          "-")
            lines.append(f"| {arch} | " + " | ".join(scores + gaps) + f" | {params} |")
        lines.append("")
    return lines


def format_report(spec: StudySpec, rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> str:
    states = [r["status"] for r in rows]
    lines = [f"# Study {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [f"Spec `{spec.path}`; {len(rows)} cells: " + ", ".join(f"{states.count(s)} {s}" for s in
                                                                      sorted(set(states))) + ".",
              "Scores: validation on each fold's held-out patients (mean foreground Dice; mIoU, void excluded, for "
              "CamVid). mean ± sd over the cells (folds and seeds) of an architecture; 95% CI: bootstrap over the "
              f"pooled cases ({BOOTSTRAP_SAMPLES} resamples); DP gap: score at epsilon / the same architecture's "
              f"non-private score; p: two-sided Wilcoxon signed-rank over the same cases against `{BASELINE}`, "
              "Holm-corrected within each task and epsilon; test set: the same score on the task's labelled test "
              "set (imagesTs/labelsTs) where it has one.", ""]
    if spec.budget_note:
        lines += [f"Budget: {spec.budget_note.strip()}", ""]
    lines += summary_tables(table)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in table:
        groups.setdefault((r["task"], r["configuration"], r["epsilon"]), []).append(r)
    for (task, config, eps), members in groups.items():
        metric = members[0]["score_metric"]
        lines += [f"## {task} {config}, epsilon {eps}", "",
                  f"| rank | architecture | {metric} mean ± sd | cells | 95% CI (cases) | DP gap | p vs {BASELINE} "
                  "(Holm) | trained parameters | test set |", "|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(members, 1):
            lines.append(f"| {i} | {r['arch']} | {_f(r['mean'])} ± {_f(r['sd'])} | {r['n_cells']} | "
                         f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}] ({r['n_cases']}) | {_f(r['dp_gap'], 2)} | "
                         f"{_p(r['p_holm'])} | {r['parameters'] if r['parameters'] is not None else '-'} | "
                         f"{_f(r['test_mean'])} |")
        lines.append("")
    lines += ["## Budget of every cell", "",
              "Wall time: all sessions of the cell, including the public pretraining when this cell made it (the "
              "first cell of an architecture, width and seed; later cells reuse the cached weights). DP step: "
              "median seconds of one training step.", "",
              "| cell | width | T | q | K | sigma | C | epsilon PRV / RDP | delta | score | wall | DP step |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['key']} | {r['width']} | {r['status']} |  |  |  |  |  |  |  |  |  |")
            continue
        wall = r.get("wall_seconds")
        lines.append(f"| {r['key']} | {r['width']} | {r.get('T')} | {_f(r.get('q'))} | {r.get('K')} | "
                     f"{_f(r.get('sigma'))} | {_f(r.get('C'), 2)} | {_f(r.get('epsilon_prv'))} / "
                     f"{_f(r.get('epsilon_rdp'))} | {'-' if r.get('delta') is None else format(r['delta'], 'g')} | "
                     f"{_f(r.get('score'))} | "
                     f"{_f(wall / 60 if wall else None, 1)} min | {_f(r.get('dp_step_seconds'), 2)} s |")
    failed = [r["key"] for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed cells (their error is in cells/<key>/error.txt): " + ", ".join(failed)]
    lines += ["", "Plots: score_vs_epsilon.png, dp_gap.png, score_vs_parameters.png"
              + (", score_vs_width.png" if len({r['width'] for r in rows}) > 1 else "") + "."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- plots
def _panels(table: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted({(r["task"], r["configuration"]) for r in table})


def _save(fig: Any, path: Path) -> None:
    from dpunet.utils.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def make_plots(table: list[dict[str, Any]], rows: list[dict[str, Any]], folder: Path, study: str = "") -> list[Path]:
    """The report's PNGs; every title starts with the study's name, so a plot is never read without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    panels = _panels(table)
    if not panels:
        return written
    # score vs epsilon: categorical axis so that inf sits on the right
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, config) in zip(axes[0], panels):
        members = [r for r in table if (r["task"], r["configuration"]) == (task, config)]
        eps_order = sorted({r["epsilon"] for r in members}, key=_eps_sort_key)
        for arch in sorted({r["arch"] for r in members}):
            pts = sorted(((eps_order.index(r["epsilon"]), r["mean"]) for r in members if r["arch"] == arch))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arch)
        ax.set_xticks(range(len(eps_order)), [f"ε={e}" for e in eps_order])
        ax.set_title(f"{study}: {task} {config}")
        ax.set_ylabel(members[0]["score_metric"])
        ax.legend(fontsize=7)
    written.append(folder / "score_vs_epsilon.png")
    _save(fig, written[-1])
    plt.close(fig)
    # DP gap bars per finite epsilon
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, config) in zip(axes[0], panels):
        members = [r for r in table if (r["task"], r["configuration"]) == (task, config) and r["epsilon"] != "inf"]
        archs = sorted({r["arch"] for r in members})
        eps_list = sorted({r["epsilon"] for r in members}, key=_eps_sort_key)
        barw = 0.8 / max(1, len(eps_list))
        for j, eps in enumerate(eps_list):
            vals = [next((r["dp_gap"] for r in members if r["arch"] == a and r["epsilon"] == eps), math.nan)
                    for a in archs]
            ax.bar(np.arange(len(archs)) + j * barw, vals, width=barw, label=f"ε={eps}")
        ax.set_xticks(np.arange(len(archs)) + 0.4 - barw / 2, archs, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("private / non-private score")
        ax.set_title(f"{study}: DP gap, {task} {config}")
        ax.legend(fontsize=7)
    written.append(folder / "dp_gap.png")
    _save(fig, written[-1])
    plt.close(fig)
    # score vs trained parameters
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, config) in zip(axes[0], panels):
        members = [r for r in table if (r["task"], r["configuration"]) == (task, config) and r["parameters"]]
        for eps in sorted({r["epsilon"] for r in members}, key=_eps_sort_key):
            pts = [r for r in members if r["epsilon"] == eps]
            ax.scatter([r["parameters"] for r in pts], [r["mean"] for r in pts], label=f"ε={eps}")
            for r in pts:
                ax.annotate(r["arch"], (r["parameters"], r["mean"]), fontsize=6)
        ax.set_xscale("log")
        thousands = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k")
        ax.xaxis.set_major_formatter(thousands)
        ax.xaxis.set_minor_formatter(thousands)
        ax.set_ylabel(members[0]["score_metric"] if members else "score")
        ax.set_xlabel("trained parameters")
        ax.set_title(f"{study}: {task} {config}")
        ax.legend(fontsize=7)
    written.append(folder / "score_vs_parameters.png")
    _save(fig, written[-1])
    plt.close(fig)
    if len({r["width"] for r in rows if r["status"] == "done"}) > 1:
        written.append(_width_plot(rows, panels, folder, plt, study))
    return written


def _width_plot(rows: list[dict[str, Any]], panels: list[tuple[str, str]], folder: Path, plt: Any,
                study: str) -> Path:
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, config) in zip(axes[0], panels):
        done = [r for r in rows if r["status"] == "done" and (r.get("task_name"), r["configuration"]) == (task, config)
                and r.get("score") is not None]
        for arch, eps in sorted({(r["arch"], r["epsilon"]) for r in done}):
            widths = sorted({r["width"] for r in done if (r["arch"], r["epsilon"]) == (arch, eps)})
            if len(widths) < 2:  # an architecture at one width has no width effect to show
                continue
            means = [_nanmean([float(r["score"]) for r in done if (r["arch"], r["epsilon"], r["width"]) ==
                               (arch, eps, w)]) for w in widths]
            ax.plot(widths, means, marker="o", label=f"{arch} ε={eps}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width multiplier")
        ax.set_title(f"{study}: {task} {config}")
        ax.legend(fontsize=6)
    path = folder / "score_vs_width.png"
    _save(fig, path)
    plt.close(fig)
    return path


def write_report(spec: StudySpec, folder: Optional[Path] = None) -> dict[str, Any]:
    """results.csv, report.md and plots under `folder` (default: the study folder)."""
    folder = Path(folder or spec.folder)
    rows = results_rows(spec)
    if not any(r["status"] == "done" for r in rows):
        raise DpunetError(f"{spec.folder}: no cell of study {spec.name} is done yet (dpunet_study run {spec.path})")
    write_results_csv(rows, folder / "results.csv")
    table = arch_table(rows, *_group_case_scores(spec, rows))
    write_text(format_report(spec, rows, table), folder / "report.md")
    plots = make_plots(table, rows, folder, spec.name)
    return {"rows": rows, "table": table, "files": [folder / "results.csv", folder / "report.md", *plots]}
