"""The augmentation entry of a plan: nnU-Net v2's default training augmentation as plain JSON (angles in degrees).

Plans are data that training reads: the planner writes `default_augmentation_params` into each configuration and
dpunet.training.augmentation applies it. `source_patch_size` sizes the larger patch the sampler must cut so that
rotated or zoomed-out corners are filled with image content (see dpunet/training/augmentation.py).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d

# nnU-Net treats a 3D patch as anisotropic ("dummy 2D" augmentation) when its largest in-plane edge is more than
# this many times its first (through-plane) edge.
NNUNET_ANISOTROPY_THRESHOLD = 3.0
# nnU-Net rotates 2D patches by any angle unless they are elongated beyond this aspect ratio.
NNUNET_2D_FULL_ROTATION_MAX_ASPECT = 1.5
# extra source voxels on each side so cubic interpolation at the outermost reachable coordinate sees image data
INTERPOLATION_MARGIN = 1
# angles per axis at which the rotated patch's extent is evaluated when sizing the source patch
_EXTENT_ANGLE_SAMPLES = 13


def is_anisotropic_patch(patch_size: Sequence[int], threshold: float = NNUNET_ANISOTROPY_THRESHOLD) -> bool:
    """nnU-Net's rule for dummy-2D augmentation: a 3D patch much thinner along its first axis than in-plane."""
    return len(patch_size) == 3 and max(patch_size[1:]) / patch_size[0] > threshold


def default_augmentation_params(
    patch_size: Sequence[int], dim: int, anisotropic: bool = False
) -> dict[str, Any]:
    """nnU-Net v2's default training augmentation as a JSON-able plan entry.

    `dim` is the patch dimensionality (2 or 3). `anisotropic` (3D only) restricts rotation and scaling to the
    plane of the last two axes, as nnU-Net does for anisotropic data.
    """
    patch_size = [int(p) for p in patch_size]
    if dim not in (2, 3) or len(patch_size) != dim:
        raise ValueError(f"patch_size {patch_size} does not match dim {dim}")
    if anisotropic and dim != 3:
        raise ValueError("anisotropic (in-plane) augmentation only applies to 3D patches")

    if dim == 2:
        aspect = max(patch_size) / min(patch_size)
        limit = 180.0 if aspect <= NNUNET_2D_FULL_ROTATION_MAX_ASPECT else 15.0
        rotation = [[-limit, limit]]
    elif anisotropic:
        rotation = [[-180.0, 180.0], [0.0, 0.0], [0.0, 0.0]]
    else:
        rotation = [[-30.0, 30.0]] * 3

    params: dict[str, Any] = {
        "patch_size": patch_size,
        "in_plane_only": bool(anisotropic),
        "spatial": {
            # rotation_deg[i]: angle range of the rotation about spatial axis i (2D: a single in-plane range)
            "rotation_deg": rotation,
            "p_rotation": 0.2,
            "scale_range": [0.7, 1.4],
            "p_scale": 0.2,
            "independent_scale_per_axis": False,
            # the source patch fully covers zoom-outs up to this scale; beyond it (rare: p_scale * a fraction of
            # the range) the outermost corners see zero padding, as in nnU-Net, whose source covers 1/0.85
            "source_cover_scale": 1.25,
            "elastic": False,
            "elastic_alpha": [0.0, 900.0],
            "elastic_sigma": [9.0, 13.0],
            "p_elastic": 0.2,
            "order_data": 3,
            "order_seg": 1,
        },
        "gaussian_noise": {"p_per_sample": 0.1, "variance": [0.0, 0.1]},
        "gaussian_blur": {"p_per_sample": 0.2, "p_per_channel": 0.5, "sigma": [0.5, 1.0]},
        "brightness_multiplicative": {"p_per_sample": 0.15, "range": [0.75, 1.25]},
        "contrast": {"p_per_sample": 0.15, "range": [0.75, 1.25]},
        "low_resolution": {
            "p_per_sample": 0.25,
            "p_per_channel": 0.5,
            "zoom_range": [0.5, 1.0],
            # in-plane-only data keeps its through-plane resolution, as in nnU-Net
            "ignore_axes": [0] if anisotropic else [],
        },
        "gamma_inverted": {"p_per_sample": 0.1, "range": [0.7, 1.5], "retain_stats": True},
        "gamma": {"p_per_sample": 0.3, "range": [0.7, 1.5], "retain_stats": True},
        "mirror_axes": list(range(dim)),
    }
    params["source_patch_size"] = source_patch_size(params)
    return params


def source_patch_size(params: dict[str, Any]) -> list[int]:
    """Size of the patch to cut so the spatial transform never samples outside it.

    The output grid is rotated by at most the configured angles and then scaled by at most
    `spatial["source_cover_scale"]` (default: the largest scale). The source patch is concentric with the output
    patch and (source - patch) is even on every axis, so that the transformed and the untransformed
    (centre-cropped) paths agree to the voxel.
    """
    patch = [int(p) for p in params["patch_size"]]
    spatial = params.get("spatial")
    if not spatial:
        return patch
    in_plane = bool(params.get("in_plane_only", False))
    axes = patch[1:] if in_plane else patch
    rotation = spatial["rotation_deg"][:1] if in_plane or len(patch) == 2 else spatial["rotation_deg"]
    use_rotation = spatial["p_rotation"] > 0
    use_scale = spatial["p_scale"] > 0
    if not use_rotation and not use_scale:
        return patch

    half = np.array([(a - 1) / 2.0 for a in axes])
    corners = np.array(list(itertools.product(*[(-h, h) for h in half]))).T  # (dim, 2**dim)
    if use_rotation:
        extent = _max_rotated_extent(corners, [[math.radians(a) for a in r] for r in rotation])
    else:
        extent = half.copy()
    if use_scale:
        cover = spatial.get("source_cover_scale", max(spatial["scale_range"]))
        extent = extent * max(1.0, min(float(cover), float(max(spatial["scale_range"]))))

    grown = []
    for size, h, e in zip(axes, half, extent):
        extra = max(0.0, e + INTERPOLATION_MARGIN - h)
        grown.append(size + 2 * int(math.ceil(extra - 1e-9)))
    return [patch[0]] + grown if in_plane else grown


def _max_rotated_extent(corners: np.ndarray, angle_ranges: list[list[float]]) -> np.ndarray:
    """Largest |coordinate| per axis of the box corners over a grid of angles within the given ranges."""
    grids = [np.unique(np.concatenate([np.linspace(lo, hi, _EXTENT_ANGLE_SAMPLES), [0.0] if lo <= 0 <= hi else []]))
             for lo, hi in angle_ranges]
    extent = np.abs(corners).max(axis=1)
    for angles in itertools.product(*grids):
        if corners.shape[0] == 2:
            rotated = rotate_coords_2d(corners, angles[0])
        else:
            rotated = rotate_coords_3d(corners, *angles)
        extent = np.maximum(extent, np.abs(rotated).max(axis=1))
    return extent
