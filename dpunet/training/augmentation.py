"""Per-patch data augmentation with batchgenerators, modelled on nnU-Net's defaults.

Every patch is augmented on its own (a batch dimension of 1): under patient-level DP no transform may mix
samples, and a patch's randomness must come only from the generator the sampler hands in, so that a patch is a
pure function of (seed, step, patient, patch index).

The spatial transform (rotation, scaling) samples the output patch from a larger *source* patch centred on the
same point, so that rotated or zoomed-out corners are filled with image content instead of padding.
`params["source_patch_size"]` is the size the sampler must cut; it covers every coordinate the spatial transform
can reach. For anisotropic 3D data (nnU-Net's "dummy 2D" augmentation) the spatial transform runs in-plane only:
the first axis is folded into the channels, so slices are rotated and scaled but never mixed along z.

The augmentation entry of a plan is what `default_augmentation_params` returns: plain JSON, angles in degrees.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
from typing import Any, Iterator, Sequence

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

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


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed the global RNGs batchgenerators draws from (numpy's, and Python's `random` for the Gaussian noise
    variance) and restore their previous states afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class _FoldFirstAxisIntoChannels(AbstractTransform):
    """(1, C, Z, Y, X) <-> (1, C*Z, Y, X): lets the 2D spatial transform act slice by slice (in-plane only)."""

    def __init__(self, fold: bool, depth: int) -> None:
        self.fold = fold
        self.depth = depth

    def __call__(self, **data_dict):
        for key in ("data", "seg"):
            arr = data_dict[key]
            if self.fold:
                data_dict[key] = arr.reshape(arr.shape[0], arr.shape[1] * arr.shape[2], *arr.shape[3:])
            else:
                data_dict[key] = arr.reshape(arr.shape[0], arr.shape[1] // self.depth, self.depth, *arr.shape[2:])
        return data_dict


class PatchAugmenter:
    """The transforms of one augmentation plan entry, applied to one patch at a time."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.patch_size = [int(p) for p in params["patch_size"]]
        self.source_size = [int(s) for s in params.get("source_patch_size") or source_patch_size(params)]
        self.in_plane_only = bool(params.get("in_plane_only", False))
        if any(s < p or (s - p) % 2 for s, p in zip(self.source_size, self.patch_size)):
            raise ValueError(f"source patch {self.source_size} must exceed patch {self.patch_size} by an even "
                             "number of voxels per axis")
        if self.in_plane_only and self.source_size[0] != self.patch_size[0]:
            raise ValueError("in-plane-only augmentation needs source and patch of equal size along axis 0")
        self.transforms = self._build()

    def _build(self) -> list[AbstractTransform]:
        p = self.params
        dim = len(self.patch_size)
        transforms: list[AbstractTransform] = []
        spatial = p.get("spatial")
        if spatial:
            rot = [[math.radians(a) for a in r] for r in spatial["rotation_deg"]]
            rot = rot + [[0.0, 0.0]] * (3 - len(rot))
            spatial_patch = self.patch_size[1:] if self.in_plane_only else self.patch_size
            if self.in_plane_only:
                transforms.append(_FoldFirstAxisIntoChannels(True, self.patch_size[0]))
            transforms.append(SpatialTransform(
                spatial_patch,
                patch_center_dist_from_border=None,
                do_elastic_deform=bool(spatial["elastic"]),
                alpha=tuple(spatial["elastic_alpha"]),
                sigma=tuple(spatial["elastic_sigma"]),
                p_el_per_sample=spatial["p_elastic"],
                do_rotation=spatial["p_rotation"] > 0,
                angle_x=tuple(rot[0]), angle_y=tuple(rot[1]), angle_z=tuple(rot[2]),
                p_rot_per_sample=spatial["p_rotation"],
                p_rot_per_axis=1,
                do_scale=spatial["p_scale"] > 0,
                scale=tuple(spatial["scale_range"]),
                p_scale_per_sample=spatial["p_scale"],
                independent_scale_for_each_axis=bool(spatial["independent_scale_per_axis"]),
                border_mode_data="constant", border_cval_data=0, order_data=int(spatial["order_data"]),
                border_mode_seg="constant", border_cval_seg=0, order_seg=int(spatial["order_seg"]),
                random_crop=False,  # the sampler chose the location; keep the centre
            ))
            if self.in_plane_only:
                transforms.append(_FoldFirstAxisIntoChannels(False, self.patch_size[0]))
        if p.get("gaussian_noise"):
            g = p["gaussian_noise"]
            transforms.append(GaussianNoiseTransform(tuple(g["variance"]), p_per_sample=g["p_per_sample"]))
        if p.get("gaussian_blur"):
            g = p["gaussian_blur"]
            transforms.append(GaussianBlurTransform(tuple(g["sigma"]), different_sigma_per_channel=True,
                                                    p_per_sample=g["p_per_sample"],
                                                    p_per_channel=g["p_per_channel"]))
        if p.get("brightness_multiplicative"):
            g = p["brightness_multiplicative"]
            transforms.append(BrightnessMultiplicativeTransform(tuple(g["range"]), p_per_sample=g["p_per_sample"]))
        if p.get("contrast"):
            g = p["contrast"]
            transforms.append(ContrastAugmentationTransform(tuple(g["range"]), p_per_sample=g["p_per_sample"]))
        if p.get("low_resolution"):
            g = p["low_resolution"]
            transforms.append(SimulateLowResolutionTransform(
                zoom_range=tuple(g["zoom_range"]), per_channel=True, p_per_channel=g["p_per_channel"],
                order_downsample=0, order_upsample=3, p_per_sample=g["p_per_sample"],
                ignore_axes=tuple(g["ignore_axes"]) or None))
        for key, invert in (("gamma_inverted", True), ("gamma", False)):
            if p.get(key):
                g = p[key]
                transforms.append(GammaTransform(tuple(g["range"]), invert, per_channel=True,
                                                 retain_stats=bool(g["retain_stats"]),
                                                 p_per_sample=g["p_per_sample"]))
        mirror_axes = [int(a) for a in p.get("mirror_axes") or []]
        if any(a >= dim for a in mirror_axes):
            raise ValueError(f"mirror axes {mirror_axes} do not fit a {dim}D patch")
        if mirror_axes:
            transforms.append(MirrorTransform(tuple(mirror_axes)))
        return transforms

    def __call__(self, data: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if tuple(data.shape[1:]) != tuple(self.source_size) or tuple(seg.shape[1:]) != tuple(self.source_size):
            raise ValueError(f"expected a source patch of size {self.source_size}, got data {data.shape} and seg "
                             f"{seg.shape}")
        batch = {"data": np.array(data, dtype=np.float32)[None], "seg": np.array(seg, dtype=np.float32)[None]}
        if not self.params.get("spatial"):
            batch = {k: _center_crop(v, self.patch_size) for k, v in batch.items()}
        with seeded_global_rngs(int(rng.integers(2**31))):
            for transform in self.transforms:
                batch = transform(**batch)
        out_seg = np.rint(batch["seg"][0]).astype(seg.dtype if np.issubdtype(seg.dtype, np.integer) else np.int16)
        return np.ascontiguousarray(batch["data"][0], dtype=np.float32), out_seg


def _center_crop(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    spatial = arr.shape[2:]
    slices = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(spatial, size))
    return arr[(slice(None), slice(None)) + slices]


def augment_patch(
    data: np.ndarray, seg: np.ndarray, params: dict[str, Any], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one source patch (data (C, *S), seg (1, *S)) into a patch of `params["patch_size"]`.

    S is `params["source_patch_size"]`. The result depends only on the inputs and on `rng`; the global
    random states (numpy's, Python's) are left as they were.
    """
    return PatchAugmenter(params)(data, seg, rng)
