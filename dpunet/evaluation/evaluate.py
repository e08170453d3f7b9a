"""Evaluate a folder of predicted segmentations against reference label maps (summary.json as nnU-Net v2).

summary.json keys shared with nnU-Net v2: `metric_per_case` (one entry per case: `reference_file`,
`prediction_file`, `metrics` keyed by the label value as a string), `mean` (per label, NaN-skipping mean over
cases) and `foreground_mean` (mean over labels of the per-label means). dpunet adds `case_id` per case,
`labels` (names), `n_cases`, `nan_counts` (per label and metric: cases left out of the mean because the metric
is undefined), `empty_counts` (cases with an empty reference / prediction / both) and `settings` (surface
definition, NSD tolerance, empty-mask rule, ignore and background labels). NaN is written as the JSON
extension `NaN`, as nnU-Net does; Python's json module reads it back.

Every reference and prediction passes the integrity check of dpunet_verify_dataset (`stored_data_problems`:
a truncated or NaN-holding NIfTI is refused, not scored). With `declared_labels` (dpunet_evaluate -t: the labels
of dataset.json) voxel values outside them are listed in `warnings` (they count as background for every label).
"""
from __future__ import annotations

import math
import multiprocessing
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from dpunet.dataset.io import SEGMENTATION_SUFFIXES, read_label
from dpunet.dataset.msd import case_id_from_path
from dpunet.dataset.verify import stored_data_problems
from dpunet.evaluation.metrics import (
    EMPTY_BOTH_RULES,
    HD95_DEFINITION,
    METRIC_NAMES,
    NSD_DEFINITION,
    SURFACE_DEFINITION,
    class_metrics,
)
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import write_json

NIFTI_SUFFIXES = SEGMENTATION_SUFFIXES  # NIfTI, .mha, .nrrd, 2D .png/.tif/.bmp


def list_segmentations(folder: Path) -> dict[str, Path]:
    """NIfTI files of a folder by case id (hidden files, e.g. unfinished atomic writes, are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DpunetError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not path.name.endswith(NIFTI_SUFFIXES):
            continue
        case_id = case_id_from_path(path)
        if case_id in found:
            raise DpunetError(f"{folder}: case '{case_id}' is there twice ({found[case_id].name}, {path.name})")
        found[case_id] = path
    return found


def evaluation_settings(
    nsd_tolerance_mm: float,
    empty_both: str,
    surface_connectivity: int,
    ignore_label: Optional[int],
    background_label: Optional[int],
) -> dict[str, Any]:
    """The `settings` block of summary.json: everything needed to interpret (and reproduce) the numbers."""
    return {
        "surface": SURFACE_DEFINITION.format(connectivity=surface_connectivity),
        "surface_connectivity": surface_connectivity,
        "hd95": HD95_DEFINITION,
        "nsd": NSD_DEFINITION,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "empty_both": empty_both,
        "empty_rules": (
            "both empty: Dice, IoU, NSD = "
            + ("NaN, HD95 = NaN" if empty_both == "nan" else "1, HD95 = 0")
            + "; one empty: Dice, IoU, NSD = 0, HD95 = NaN"
        ),
        "mean": "NaN-skipping mean over cases; skipped cases counted in nan_counts",
        "foreground_mean": "NaN-skipping mean over labels of the per-label means",
        "ignore_label": ignore_label,
        "ignore_rule": "voxels where the reference holds the ignore label are removed from reference and prediction",
        "background_label": background_label,
    }


def _read_checked_label(path: Path) -> tuple[np.ndarray, Any]:
    """read_label after the integrity check (SimpleITK would score a truncated file's missing voxels as 0)."""
    problems = stored_data_problems(path)[1]
    if problems:
        raise DpunetError("; ".join(problems))
    return read_label(path)


def _undeclared_values(declared: Optional[list[int]], **arrays: np.ndarray) -> dict[str, list[int]]:
    """{'reference': [values], 'prediction': [...]} of the voxel values outside `declared` (None: not checked)."""
    if declared is None:
        return {}
    found = {name: sorted(set(np.unique(a).tolist()) - set(declared)) for name, a in arrays.items()}
    return {name: values for name, values in found.items() if values}


def _evaluate_case(job: dict[str, Any]) -> dict[str, Any]:
    """One case: read both files, check geometry, compute every label's metrics (runs in a worker)."""
    ref_path, pred_path = Path(job["reference_file"]), Path(job["prediction_file"])
    ref, ref_geometry = _read_checked_label(ref_path)
    pred, pred_geometry = _read_checked_label(pred_path)
    diffs = ref_geometry.matches(pred_geometry)
    if diffs:
        raise DpunetError(
            f"{pred_path}: geometry does not match the reference {ref_path} ({'; '.join(diffs)})"
        )
    ignore_label = job["ignore_label"]
    valid = None if ignore_label is None else ref != ignore_label
    metrics = {
        str(label): class_metrics(
            ref == label,
            pred == label,
            ref_geometry.spacing,
            nsd_tolerance_mm=job["nsd_tolerance_mm"],
            empty_both=job["empty_both"],
            connectivity=job["surface_connectivity"],
            valid=valid,
        )
        for label in job["labels"]
    }
    return {
        "case_id": job["case_id"],
        "reference_file": str(ref_path),
        "prediction_file": str(pred_path),
        "metrics": metrics,
        "undeclared": _undeclared_values(job.get("declared_labels"), reference=ref, prediction=pred),
    }


def undeclared_label_warnings(metric_per_case: list[dict[str, Any]], declared: list[int]) -> list[str]:
    """One line per kind of file (reference, prediction) holding values outside the declared labels."""
    warnings = []
    for kind in ("reference", "prediction"):
        hits = {c[f"{kind}_file"]: c["undeclared"][kind] for c in metric_per_case if kind in c.get("undeclared", {})}
        if hits:
            values = sorted({v for vs in hits.values() for v in vs})
            files = ", ".join(Path(f).name for f in list(hits)[:5]) + (" ..." if len(hits) > 5 else "")
            warnings.append(f"{len(hits)} {kind} file(s) hold label values {values} not declared in {declared} "
                            f"(counted as background for every label): {files}")
    return warnings


def _nanmean(values: Iterable[float]) -> tuple[float, int]:
    """(mean of the finite values, number of NaN values); NaN when no value is defined."""
    arr = np.asarray(list(values), dtype=np.float64)
    nan = np.isnan(arr)
    return (float(arr[~nan].mean()) if (~nan).any() else math.nan), int(nan.sum())


def _label_sort_key(key: str) -> tuple[int, Any]:
    return (0, int(key)) if key.lstrip("-").isdigit() else (1, key)


def aggregate_metrics(metric_per_case: list[dict[str, Any]]) -> dict[str, Any]:
    """`mean`, `foreground_mean`, `n_cases`, `nan_counts` and `empty_counts` from per-case entries.

    Every label found in any case is aggregated; a label missing from a case (should not happen with
    evaluate_folder) counts as NaN there.
    """
    labels = sorted({k for case in metric_per_case for k in case["metrics"]}, key=_label_sort_key)
    mean: dict[str, dict[str, float]] = {}
    nan_counts: dict[str, dict[str, int]] = {}
    empty_counts: dict[str, dict[str, int]] = {}
    for label in labels:
        per_case = [case["metrics"].get(label, {}) for case in metric_per_case]
        names = [n for n in METRIC_NAMES if any(n in m for m in per_case)]
        names += sorted({n for m in per_case for n in m} - set(names))
        mean[label], nan_counts[label] = {}, {}
        for name in names:
            mean[label][name], nan_counts[label][name] = _nanmean(m.get(name, math.nan) for m in per_case)
        n_ref = [m.get("n_ref") for m in per_case]
        n_pred = [m.get("n_pred") for m in per_case]
        empty_counts[label] = {
            "reference_empty": sum(1 for r in n_ref if r == 0),
            "prediction_empty": sum(1 for p in n_pred if p == 0),
            "both_empty": sum(1 for r, p in zip(n_ref, n_pred) if r == 0 and p == 0),
        }
    names = [n for n in METRIC_NAMES if any(n in mean[label] for label in labels)]
    foreground_mean = {
        name: _nanmean(mean[label].get(name, math.nan) for label in labels)[0] for name in names
    }
    return {
        "mean": mean,
        "foreground_mean": foreground_mean,
        "n_cases": len(metric_per_case),
        "nan_counts": nan_counts,
        "empty_counts": empty_counts,
    }


def evaluate_folder(
    ref_folder: Path,
    pred_folder: Path,
    labels: dict[int, str],
    ignore_label: Optional[int],
    background_label: Optional[int],
    nsd_tolerance_mm: float = 1.0,
    num_processes: int = 1,
    empty_both: str = "nan",
    surface_connectivity: int = 1,
    case_ids: Optional[list[str]] = None,
    declared_labels: Optional[list[int]] = None,
) -> dict[str, Any]:
    """Evaluate predictions in `pred_folder` against the label maps in `ref_folder`, matched by file name.

    Evaluated labels: every key of `labels` except `background_label` and `ignore_label`. Cases: `case_ids`
    if given (e.g. one fold's validation cases), otherwise every reference in `ref_folder`; each needs a
    prediction (missing ones are listed in the error). Without `case_ids`, predictions that have no reference
    are an error too (a wrong folder, most likely). `declared_labels`: every value a label map may hold;
    others are listed in the summary's `warnings`. Returns the summary dict (see module docstring).
    """
    if empty_both not in EMPTY_BOTH_RULES:
        raise DpunetError(f"empty_both must be one of {EMPTY_BOTH_RULES}, got '{empty_both}'")
    if not nsd_tolerance_mm >= 0:
        raise DpunetError(f"NSD tolerance must be >= 0 mm, got {nsd_tolerance_mm}")
    if num_processes < 1:
        raise DpunetError(f"num_processes must be >= 1, got {num_processes}")
    labels = {int(k): str(v) for k, v in labels.items()}
    foreground = sorted(v for v in labels if v not in (background_label, ignore_label))
    if not foreground:
        raise DpunetError(f"no label to evaluate in {dict(labels)} (background {background_label}, "
                          f"ignore {ignore_label})")
    references = list_segmentations(ref_folder)
    predictions = list_segmentations(pred_folder)
    if case_ids is None:
        wanted = sorted(references)
        extra = sorted(set(predictions) - set(references))
        if extra:
            raise DpunetError(
                f"{pred_folder}: {len(extra)} prediction(s) have no reference in {ref_folder}: "
                f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}"
            )
    else:
        wanted = sorted(dict.fromkeys(case_ids))
        no_ref = [c for c in wanted if c not in references]
        if no_ref:
            raise DpunetError(f"{ref_folder}: no reference for {len(no_ref)} case(s): {', '.join(no_ref[:10])}")
    if not wanted:
        raise DpunetError(f"{ref_folder}: no reference segmentations (.nii.gz, .nii, .mha, .nrrd, .png, .tif, .bmp) to evaluate")
    missing = [c for c in wanted if c not in predictions]
    if missing:
        raise DpunetError(
            f"{pred_folder}: {len(missing)} of {len(wanted)} prediction(s) missing: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    jobs = [
        {
            "case_id": c,
            "reference_file": str(references[c]),
            "prediction_file": str(predictions[c]),
            "labels": foreground,
            "ignore_label": ignore_label,
            "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "empty_both": empty_both,
            "surface_connectivity": surface_connectivity,
            "declared_labels": None if declared_labels is None else [int(v) for v in declared_labels],
        }
        for c in wanted
    ]
    workers = min(num_processes, len(jobs))
    if workers == 1:
        metric_per_case = [_evaluate_case(job) for job in jobs]
    else:
        # spawn, not fork: callers (the trainer) may hold CUDA or torch thread pools that fork would break
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            metric_per_case = pool.map(_evaluate_case, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    warnings = [] if declared_labels is None else undeclared_label_warnings(metric_per_case, sorted(declared_labels))
    for case in metric_per_case:
        del case["undeclared"]  # reported once, in `warnings`
    summary: dict[str, Any] = {"metric_per_case": metric_per_case}
    summary.update(aggregate_metrics(metric_per_case))
    if declared_labels is not None:
        summary["warnings"] = warnings
    summary["labels"] = {str(v): labels[v] for v in foreground}
    summary["settings"] = evaluation_settings(
        nsd_tolerance_mm, empty_both, surface_connectivity, ignore_label, background_label
    )
    return summary


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """Write a summary dict as JSON, atomically."""
    write_json(summary, path)
