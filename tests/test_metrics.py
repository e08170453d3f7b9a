"""Per-class metrics against medpy (Dice, HD95), a brute-force KD-tree oracle (surfaces, NSD), hand counts
and analytic cases (shifted cube / square)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.ndimage import shift as nd_shift
from scipy.spatial import cKDTree

from dpunet.dataset.io import read_label
from dpunet.evaluation.metrics import (
    DISTANCE_SLACK_MM,
    class_metrics,
    dice,
    hd95,
    iou,
    normalized_surface_dice,
    surface_distances,
    surface_mask,
)
from dpunet.utils.errors import DpunetError
from tests.conftest import shared_path

TOL = 1e-4


def blob(shape, seed, sigma=2.0, threshold=0.5):
    """A smooth random binary mask; blobs touch the image border too (exercises border handling)."""
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), sigma) > threshold


def shifted(mask, offset):
    """Shift without wrap-around (zero fill)."""
    return nd_shift(mask.astype(np.uint8), offset, order=0, mode="constant", cval=0).astype(bool)


def brute_force_surface(mask):
    """Independent surface: mask voxels with a face neighbour outside the mask (image outside = background)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_neighbours_in = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            all_neighbours_in &= np.roll(padded, step, axis=axis)[inner]
    return mask & ~all_neighbours_in


def brute_force_distances(ref, pred, spacing):
    """Surface-to-surface distances with a KD-tree over physical coordinates (no distance transform)."""
    spacing = np.asarray(spacing, dtype=float)
    ref_pts = np.argwhere(brute_force_surface(ref)) * spacing
    pred_pts = np.argwhere(brute_force_surface(pred)) * spacing
    d_ref = cKDTree(pred_pts).query(ref_pts)[0]
    d_pred = cKDTree(ref_pts).query(pred_pts)[0]
    return d_ref, d_pred


# ---------------------------------------------------------------- medpy oracle, synthetic (always runs)

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 1.25)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_hd95_match_medpy_synthetic_3d(seed, spacing):
    ref = blob((18, 26, 22), seed)
    pred = blob((18, 26, 22), seed + 100)
    assert ref.any() and pred.any()
    m = class_metrics(ref, pred, spacing)
    assert m["Dice"] == pytest.approx(medpy_binary.dc(pred, ref), abs=TOL)
    assert m["HD95"] == pytest.approx(medpy_binary.hd95(pred, ref, voxelspacing=spacing), abs=TOL)
    assert hd95(ref, pred, spacing) == pytest.approx(m["HD95"], abs=1e-12)
    assert hd95(pred, ref, spacing) == pytest.approx(m["HD95"], abs=1e-12)  # symmetric


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.4, 1.7)])
def test_dice_hd95_match_medpy_synthetic_2d(spacing):
    ref = blob((40, 50), 3, sigma=3.0)
    pred = shifted(ref, (2, -3)) | blob((40, 50), 4, sigma=3.0, threshold=0.53)
    m = class_metrics(ref, pred, spacing)
    assert m["Dice"] == pytest.approx(medpy_binary.dc(pred, ref), abs=TOL)
    assert m["HD95"] == pytest.approx(medpy_binary.hd95(pred, ref, voxelspacing=spacing), abs=TOL)


def test_single_slice_volume_uses_2d_surfaces():
    ref2 = blob((30, 40), 5, sigma=3.0)
    pred2 = shifted(ref2, (1, 2))
    spacing3 = (5.0, 0.8, 1.1)
    m = class_metrics(ref2[None], pred2[None], spacing3)
    assert m["HD95"] == pytest.approx(medpy_binary.hd95(pred2, ref2, voxelspacing=spacing3[1:]), abs=TOL)
    # a 3D one-slice surface would be the whole mask: a different (wrong) surface
    assert surface_mask(ref2[None]).sum() == ref2.sum()
    assert surface_mask(ref2).sum() < ref2.sum()
    d_ref, d_pred = brute_force_distances(ref2, pred2, spacing3[1:])
    limit = 1.0 + DISTANCE_SLACK_MM
    nsd = (np.sum(d_ref <= limit) + np.sum(d_pred <= limit)) / (d_ref.size + d_pred.size)
    assert m["NSD"] == pytest.approx(nsd, abs=1e-12)


# ---------------------------------------------------------------- medpy oracle, real hippocampus labels

def _hippocampus_label(case: str) -> np.ndarray:
    return read_label(shared_path("data", "Task04_Hippocampus", "labelsTr", f"hippocampus_{case}.nii.gz"))[0]


def _perturbations(label, other):
    shape = tuple(min(a, b) for a, b in zip(label.shape, other.shape))
    crop = tuple(slice(0, s) for s in shape)
    eroded = np.zeros_like(label)
    for value in (1, 2):
        eroded[binary_erosion(label == value)] = value
    return {
        "shifted": (label, nd_shift(label, (1, -2, 1), order=0, mode="constant", cval=0)),
        "eroded": (label, eroded),
        "other_case": (label[crop], other[crop]),
    }


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.75, 1.3)])
def test_dice_hd95_match_medpy_on_hippocampus(spacing):
    label, other = _hippocampus_label("001"), _hippocampus_label("003")
    for name, (ref, pred) in _perturbations(label, other).items():
        for value in (1, 2):
            r, p = ref == value, pred == value
            assert r.any() and p.any(), name
            m = class_metrics(r, p, spacing)
            assert m["Dice"] == pytest.approx(medpy_binary.dc(p, r), abs=TOL), (name, value)
            expected = medpy_binary.hd95(p, r, voxelspacing=spacing)
            assert m["HD95"] == pytest.approx(expected, abs=TOL), (name, value)
            assert m["n_ref"] == int(r.sum()) and m["n_pred"] == int(p.sum())


# ---------------------------------------------------------------- surfaces and NSD vs brute force

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.6, 1.0)])
def test_surface_distances_and_nsd_match_brute_force(spacing):
    ref = blob((14, 20, 18), 7)
    pred = blob((14, 20, 18), 8)
    assert np.array_equal(surface_mask(ref), brute_force_surface(ref))
    d_ref, d_pred = surface_distances(ref, pred, spacing)
    b_ref, b_pred = brute_force_distances(ref, pred, spacing)
    np.testing.assert_allclose(np.sort(d_ref), np.sort(b_ref), atol=1e-9)
    np.testing.assert_allclose(np.sort(d_pred), np.sort(b_pred), atol=1e-9)
    for tau in (0.0, 0.6, 1.0, 2.5, 4.0):
        limit = tau + DISTANCE_SLACK_MM  # distances exactly at tau count, whatever their rounding
        expected = (np.sum(b_ref <= limit) + np.sum(b_pred <= limit)) / (b_ref.size + b_pred.size)
        assert normalized_surface_dice(ref, pred, spacing, tau) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- analytic NSD: shifted cube / square

def _cube(side, shift, size=14):
    """Cube of `side` voxels at offset 2 (+`shift` along the last axis) inside a size^3 image."""
    m = np.zeros((size, size, size), bool)
    m[2:2 + side, 2:2 + side, 2 + shift:2 + shift + side] = True
    return m


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.2, 2.0)])
def test_nsd_shifted_cube_analytic(spacing):
    side, s = 6, 1
    ref, pred = _cube(side, 0), _cube(side, s)
    n_surface = side**3 - (side - 2) ** 3
    # below the smallest voxel spacing only coinciding surface voxels count: the four side faces where the
    # cubes overlap along x, (side - s) columns of the (side-1)*4-voxel ring each, on both surfaces
    coinciding = (side - s) * 4 * (side - 1)
    below = 0.99 * min(spacing)
    assert normalized_surface_dice(ref, pred, spacing, below) == pytest.approx(coinciding / n_surface, abs=1e-12)
    # every surface voxel is within s * spacing_x of the other surface (faces move by exactly that much)
    shift_mm = s * spacing[2]
    assert normalized_surface_dice(ref, pred, spacing, shift_mm) == 1.0
    assert normalized_surface_dice(ref, pred, spacing, shift_mm * 0.99) < 1.0
    assert class_metrics(ref, pred, spacing, nsd_tolerance_mm=shift_mm)["NSD"] == 1.0


def test_nsd_shifted_square_analytic_2d():
    side, s = 10, 2
    ref = np.zeros((16, 18), bool)
    ref[3:3 + side, 3:3 + side] = True
    pred = shifted(ref, (0, s))
    # 2 * (side - s) coinciding edge voxels per surface of 4 * (side - 1) voxels
    assert normalized_surface_dice(ref, pred, (1.0, 1.0), 0.5) == pytest.approx(
        (side - s) / (2 * (side - 1)), abs=1e-12
    )
    assert normalized_surface_dice(ref, pred, (1.0, 1.0), float(s)) == 1.0
    # the same square as a one-slice volume gives the same 2D answer
    assert normalized_surface_dice(ref[None], pred[None], (9.0, 1.0, 1.0), 0.5) == pytest.approx(
        (side - s) / (2 * (side - 1)), abs=1e-12
    )


# ---------------------------------------------------------------- counts by hand

def test_counts_dice_iou_by_hand():
    ref = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    pred = np.array([[0, 1, 1, 1, 0], [0, 1, 0, 0, 1]], bool)
    m = class_metrics(ref, pred, (1.0, 1.0))
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (3, 2, 2, 3)
    assert (m["n_ref"], m["n_pred"]) == (5, 5)
    assert m["Dice"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    assert m["IoU"] == pytest.approx(3 / 7)
    assert dice(ref, pred) == m["Dice"] and iou(ref, pred) == m["IoU"]


def test_valid_mask_excludes_voxels_from_both():
    ref = np.array([[1, 1, 0, 0, 0, 0]], bool)
    pred = np.array([[1, 1, 1, 0, 1, 1]], bool)
    valid = np.array([[1, 1, 1, 1, 0, 0]], bool)  # the last two voxels hold the ignore label in the reference
    m = class_metrics(ref, pred, (1.0, 1.0), valid=valid)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (2, 1, 0, 1)
    assert m["n_pred"] == 3
    assert m["Dice"] == pytest.approx(4 / 5)
    assert m["HD95"] == pytest.approx(medpy_binary.hd95(pred & valid, ref, voxelspacing=(1.0, 1.0)), abs=TOL)


# ---------------------------------------------------------------- empty masks

def test_both_empty_default_is_nan():
    empty = np.zeros((4, 5, 6), bool)
    m = class_metrics(empty, empty, (1.0, 1.0, 1.0))
    for name in ("Dice", "IoU", "NSD", "HD95"):
        assert math.isnan(m[name]), name
    assert (m["TP"], m["FP"], m["FN"], m["TN"], m["n_ref"], m["n_pred"]) == (0, 0, 0, 120, 0, 0)


def test_both_empty_rule_one():
    empty = np.zeros((4, 5, 6), bool)
    m = class_metrics(empty, empty, (1.0, 1.0, 1.0), empty_both="one")
    assert (m["Dice"], m["IoU"], m["NSD"], m["HD95"]) == (1.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("empty_both", ["nan", "one"])
@pytest.mark.parametrize("which_empty", ["ref", "pred"])
def test_one_empty(which_empty, empty_both):
    full = np.zeros((4, 5, 6), bool)
    full[1:3, 1:4, 2:5] = True
    empty = np.zeros_like(full)
    ref, pred = (empty, full) if which_empty == "ref" else (full, empty)
    m = class_metrics(ref, pred, (1.0, 2.0, 1.0), empty_both=empty_both)
    assert (m["Dice"], m["IoU"], m["NSD"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["HD95"])
    assert m["FP" if which_empty == "ref" else "FN"] == 18


def test_bad_arguments_raise():
    a = np.ones((3, 3), bool)
    with pytest.raises(DpunetError, match="empty_both"):
        dice(a, a, empty_both="zero")
    with pytest.raises(DpunetError, match="shape"):
        class_metrics(a, np.ones((3, 4), bool), (1.0, 1.0))
    with pytest.raises(DpunetError, match="spacing"):
        hd95(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(DpunetError, match="tolerance"):
        normalized_surface_dice(a, a, (1.0, 1.0), -1.0)
