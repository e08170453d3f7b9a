"""Resampling to a target spacing, with nnU-Net's treatment of anisotropic data.

When one axis is much coarser than the others (ratio above `anisotropy_threshold`), in-plane and
through-plane are resampled separately: in-plane with the requested order, across slices with `order_z`
(nearest by default), so thick slices are not blurred into each other.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import map_coordinates
from skimage.transform import resize

ANISOTROPY_THRESHOLD = 3.0


def new_shape_for_spacing(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> list[int]:
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target_spacing)]


def separate_axis(spacing: Sequence[float], target_spacing: Sequence[float],
                  threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The coarse axis to resample on its own, or None (decided on the source spacing first, like nnU-Net)."""
    for sp in (spacing, target_spacing):
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            return int(np.argmax(sp))
    return None


def _resize(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    if tuple(volume.shape) == tuple(shape):
        return volume.astype(np.float32, copy=False)
    return resize(volume.astype(np.float32, copy=False), tuple(shape), order=order, mode="edge",
                  anti_aliasing=False, preserve_range=True).astype(np.float32)


def _resize_along_axis(volume: np.ndarray, axis: int, size: int, order: int) -> np.ndarray:
    old = volume.shape[axis]
    if old == size:
        return volume
    # same sample positions as skimage's resize: centres of the new voxels in old-voxel coordinates
    coords_1d = (np.arange(size) + 0.5) * old / size - 0.5
    grid = np.meshgrid(*[coords_1d if a == axis else np.arange(n) for a, n in enumerate(volume.shape)],
                       indexing="ij")
    return map_coordinates(volume, grid, order=order, mode="nearest").astype(np.float32)


def resample_volume(volume: np.ndarray, new_shape: Sequence[int], order: int, axis: int | None,
                    order_z: int = 0) -> np.ndarray:
    """Resample one (z, y, x) volume; with `axis` set, that axis separately with `order_z`."""
    if axis is None or volume.shape[axis] == 1:
        return _resize(volume, new_shape, order)
    in_plane = [n if a != axis else volume.shape[axis] for a, n in enumerate(new_shape)]
    slices = np.moveaxis(volume, axis, 0)
    plane_shape = [n for a, n in enumerate(in_plane) if a != axis]
    resized = np.stack([_resize(s, plane_shape, order) for s in slices])
    resized = np.moveaxis(resized, 0, axis)
    return _resize_along_axis(resized, axis, new_shape[axis], order_z)


def resample_data(data: np.ndarray, new_shape: Sequence[int], order: int = 3, axis: int | None = None,
                  order_z: int = 0) -> np.ndarray:
    """(c, z, y, x) float data to `new_shape` (spatial)."""
    return np.stack([resample_volume(c, new_shape, order, axis, order_z) for c in data]).astype(np.float32)


def resample_segmentation(seg: np.ndarray, new_shape: Sequence[int], order: int = 1, axis: int | None = None,
                          order_z: int = 0) -> np.ndarray:
    """(z, y, x) label map: each label resampled as a soft mask and kept where it exceeds 0.5 (order 0: nearest)."""
    if tuple(seg.shape) == tuple(new_shape):
        return seg.copy()
    labels = np.unique(seg)
    if order == 0:
        return resample_volume(seg.astype(np.float32), new_shape, 0, axis, 0).round().astype(seg.dtype)
    out = np.zeros(tuple(new_shape), dtype=seg.dtype)
    for label in labels:
        if label == 0:
            continue
        soft = resample_volume((seg == label).astype(np.float32), new_shape, order, axis, order_z)
        out[soft >= 0.5] = label
    return out
