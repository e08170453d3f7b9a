"""Per-patch data augmentation with batchgenerators, modelled on nnU-Net's defaults.

Every patch is augmented on its own (a batch dimension of 1): under patient-level DP no transform may mix
samples, and a patch's randomness must come only from the generator the sampler hands in, so that a patch is a
pure function of (seed, step, patient, patch index).

The spatial transform (rotation, scaling) samples the output patch from a larger *source* patch centred on the
same point, so that rotated or zoomed-out corners are filled with image content instead of padding.
`params["source_patch_size"]` is the size the sampler must cut; it covers every coordinate the spatial transform
can reach. For anisotropic 3D data (nnU-Net's "dummy 2D" augmentation) the spatial transform runs in-plane only:
the first axis is folded into the channels, so slices are rotated and scaled but never mixed along z.

The augmentation entry of a plan is what `dpunet.planning.augmentation.default_augmentation_params` returns: plain
JSON, angles in degrees.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterator, Sequence

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

# the plan's defaults live with the planner (plans are data that training reads); importable from here as well
from dpunet.planning.augmentation import default_augmentation_params, source_patch_size  # noqa: F401


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
