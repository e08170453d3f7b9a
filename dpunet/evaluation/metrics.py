"""Per-case, per-class segmentation metrics: overlap counts, Dice, IoU, HD95 and normalised surface Dice.

Definitions (documentation/evaluation.md explains them with examples):

- **Surface** of a binary mask: the mask voxels removed by one binary erosion with the face-connectivity
  structuring element (`scipy.ndimage.generate_binary_structure(ndim, 1)`; 6-neighbourhood in 3D, 4 in 2D),
  the outside of the image counting as background. A voxel is on the surface iff it is in the mask and one of
  its face neighbours is not (or lies outside the image). This is medpy.metric.binary's definition.
- **Surface distances**: for each surface voxel of one mask, the Euclidean distance in mm (voxel centre to
  voxel centre, with the voxel spacing) to the nearest surface voxel of the other mask.
- **HD95**: the 95th percentile (numpy's linear interpolation) of the distances of both directions pooled
  together (as medpy.metric.binary.hd95), not the maximum of the two directed percentiles.
- **NSD** at tolerance tau (Nikolov et al. 2021, voxel form): the fraction of surface voxels of both masks
  whose distance to the other mask's surface is <= tau (+ 1e-6 mm for rounding): (|{r in S_ref: d(r, S_pred) <= tau}| +
  |{p in S_pred: d(p, S_ref) <= tau}|) / (|S_ref| + |S_pred|). Every surface voxel weighs the same (the paper
  weighs surface elements by their area; the voxel form is what the nnU-Net ecosystem and MONAI's default use).
- **Empty masks**: both empty -> Dice, IoU and NSD are NaN (nnU-Net's rule; `empty_both="one"` makes them 1)
  and HD95 is NaN (0 with `empty_both="one"`); one empty -> Dice, IoU, NSD are 0 and HD95 is NaN (no
  surface to measure a distance to). Means over cases skip NaN and report how many they skipped.
- **2D cases**: an array with a single z slice is evaluated as a 2D image (2D surfaces, (y, x) spacing),
  otherwise every voxel of a one-slice volume would be on the surface.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from dpunet.utils.errors import DpunetError

EMPTY_BOTH_RULES = ("nan", "one")
#: NSD counts a distance d as within tolerance tau when d <= tau + DISTANCE_SLACK_MM, so that a surface
#: exactly tau away (common: tau equal to a voxel spacing) counts whatever the floating-point rounding of d
DISTANCE_SLACK_MM = 1e-6
#: the per-class metrics `class_metrics` returns, in this order
METRIC_NAMES = ("Dice", "IoU", "HD95", "NSD", "TP", "FP", "FN", "TN", "n_ref", "n_pred")

SURFACE_DEFINITION = (
    "mask voxels removed by one binary erosion with the face-connectivity structuring element "
    "(scipy generate_binary_structure(ndim, {connectivity})), the outside of the image counting as background; "
    "distances in mm between voxel centres; cases with one z slice use 2D surfaces"
)
HD95_DEFINITION = (
    "95th percentile (linear interpolation) of the surface distances of both directions pooled "
    "(medpy.metric.binary.hd95); NaN when one mask is empty"
)
NSD_DEFINITION = (
    "fraction of surface voxels of reference and prediction within the tolerance of the other's surface, "
    "each surface voxel weighted equally (Nikolov et al. 2021, voxel form); 0 when one mask is empty"
)


def _check_empty_rule(empty_both: str) -> None:
    if empty_both not in EMPTY_BOTH_RULES:
        raise DpunetError(f"empty_both must be one of {EMPTY_BOTH_RULES}, got '{empty_both}'")


def _as_binary_pair(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Boolean arrays and matching spacing; a single-slice 3D array becomes 2D (see module docstring)."""
    ref = np.asarray(ref).astype(bool, copy=False)
    pred = np.asarray(pred).astype(bool, copy=False)
    if ref.shape != pred.shape:
        raise DpunetError(f"reference shape {ref.shape} and prediction shape {pred.shape} differ")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ref.ndim:
        raise DpunetError(f"spacing {spacing} has {len(spacing)} entries for a {ref.ndim}D mask")
    if ref.ndim == 3 and ref.shape[0] == 1:
        ref, pred, spacing = ref[0], pred[0], spacing[1:]
    return ref, pred, spacing


def surface_mask(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Surface voxels of a boolean mask: mask minus its erosion (the image border counts as background)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = generate_binary_structure(mask.ndim, connectivity)
    return mask & ~binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def _union_bounding_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding both masks. Cropping to it changes neither surfaces nor distances: voxels just
    outside the box are background, as is the outside of the crop to the erosion and the distance transform."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def surface_distances(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], connectivity: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(distances from each reference surface voxel to the prediction surface,
    distances from each prediction surface voxel to the reference surface), in mm. Both masks non-empty."""
    ref, pred, spacing = _as_binary_pair(ref, pred, spacing)
    if not ref.any() or not pred.any():
        raise DpunetError("surface distances need two non-empty masks")
    box = _union_bounding_box(ref, pred)
    ref, pred = ref[box], pred[box]
    ref_surface = surface_mask(ref, connectivity)
    pred_surface = surface_mask(pred, connectivity)
    # the distance transform measures the distance to the nearest zero, so the surface is passed inverted
    to_pred_surface = distance_transform_edt(~pred_surface, sampling=spacing)
    to_ref_surface = distance_transform_edt(~ref_surface, sampling=spacing)
    return to_pred_surface[ref_surface], to_ref_surface[pred_surface]


def dice(ref: np.ndarray, pred: np.ndarray, empty_both: str = "nan") -> float:
    """2|R & P| / (|R| + |P|); both empty: NaN or 1 (`empty_both`)."""
    _check_empty_rule(empty_both)
    ref, pred = np.asarray(ref, dtype=bool), np.asarray(pred, dtype=bool)
    denominator = int(ref.sum()) + int(pred.sum())
    if denominator == 0:
        return math.nan if empty_both == "nan" else 1.0
    return 2.0 * int((ref & pred).sum()) / denominator


def iou(ref: np.ndarray, pred: np.ndarray, empty_both: str = "nan") -> float:
    """|R & P| / |R | P|; both empty: NaN or 1 (`empty_both`)."""
    _check_empty_rule(empty_both)
    ref, pred = np.asarray(ref, dtype=bool), np.asarray(pred, dtype=bool)
    union = int((ref | pred).sum())
    if union == 0:
        return math.nan if empty_both == "nan" else 1.0
    return int((ref & pred).sum()) / union


def _both_empty_value(empty_both: str, perfect: float) -> float:
    return math.nan if empty_both == "nan" else perfect


def _check_tolerance(tolerance_mm: float) -> None:
    if not tolerance_mm >= 0:  # also rejects NaN
        raise DpunetError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")


def hd95(
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    connectivity: int = 1,
    empty_both: str = "nan",
) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (medpy's definition). One mask empty: NaN;
    both empty: NaN, or 0 with `empty_both="one"`."""
    _check_empty_rule(empty_both)
    ref, pred, spacing = _as_binary_pair(ref, pred, spacing)
    ref_any, pred_any = bool(ref.any()), bool(pred.any())
    if not ref_any and not pred_any:
        return _both_empty_value(empty_both, 0.0)
    if not (ref_any and pred_any):
        return math.nan  # no surface to measure a distance to
    d_ref, d_pred = surface_distances(ref, pred, spacing, connectivity)
    return float(np.percentile(np.concatenate([d_pred, d_ref]), 95))


def _nsd_from_distances(d_ref: np.ndarray, d_pred: np.ndarray, tolerance_mm: float) -> float:
    limit = tolerance_mm + DISTANCE_SLACK_MM
    return (int((d_ref <= limit).sum()) + int((d_pred <= limit).sum())) / (d_ref.size + d_pred.size)


def normalized_surface_dice(
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    connectivity: int = 1,
    empty_both: str = "nan",
) -> float:
    """Normalised surface Dice at `tolerance_mm` (voxel form, see module docstring). One mask empty: 0;
    both empty: NaN, or 1 with `empty_both="one"`."""
    _check_empty_rule(empty_both)
    _check_tolerance(tolerance_mm)
    ref, pred, spacing = _as_binary_pair(ref, pred, spacing)
    ref_any, pred_any = bool(ref.any()), bool(pred.any())
    if not ref_any and not pred_any:
        return _both_empty_value(empty_both, 1.0)
    if not (ref_any and pred_any):
        return 0.0
    d_ref, d_pred = surface_distances(ref, pred, spacing, connectivity)
    return _nsd_from_distances(d_ref, d_pred, tolerance_mm)


def class_metrics(
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    empty_both: str = "nan",
    connectivity: int = 1,
    valid: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """All metrics of METRIC_NAMES for one case and one class.

    `ref`, `pred`: binary masks (z, y, x) or (y, x); `spacing` in the same axis order (mm).
    `valid`: voxels to evaluate (False where the reference holds the ignore label); outside it both masks are
    treated as background, and TN counts only valid voxels.
    """
    _check_empty_rule(empty_both)
    _check_tolerance(nsd_tolerance_mm)
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise DpunetError(f"reference shape {ref.shape} and prediction shape {pred.shape} differ")
    n_valid = ref.size
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != ref.shape:
            raise DpunetError(f"valid-voxel mask shape {valid.shape} differs from the masks' {ref.shape}")
        ref, pred, n_valid = ref & valid, pred & valid, int(valid.sum())
    tp = int((ref & pred).sum())
    n_ref, n_pred = int(ref.sum()), int(pred.sum())
    fp, fn = n_pred - tp, n_ref - tp
    if n_ref and n_pred:
        d_ref, d_pred = surface_distances(ref, pred, spacing, connectivity)
        hd = float(np.percentile(np.concatenate([d_pred, d_ref]), 95))
        nsd = _nsd_from_distances(d_ref, d_pred, nsd_tolerance_mm)
    else:
        hd = hd95(ref, pred, spacing, connectivity, empty_both)
        nsd = normalized_surface_dice(ref, pred, spacing, nsd_tolerance_mm, connectivity, empty_both)
    return {
        "Dice": dice(ref, pred, empty_both),
        "IoU": iou(ref, pred, empty_both),
        "HD95": hd,
        "NSD": nsd,
        "TP": tp,
        "FP": fp,
        "FN": fn,
        "TN": n_valid - tp - fp - fn,
        "n_ref": n_ref,
        "n_pred": n_pred,
    }
