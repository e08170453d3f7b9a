"""Crop to the non-zero region of an image (per case: uses only that patient's own pixels)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is non-zero, holes filled (dark tissue inside the body stays in)."""
    mask = np.any(data != 0, axis=0)
    return binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> list[list[int]]:
    """[[start, stop), ...] per axis of the mask's True voxels; the whole array when the mask is empty."""
    if not mask.any():
        return [[0, int(s)] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.where(mask.any(axis=other))[0]
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box


def crop_to_box(array: np.ndarray, box: list[list[int]]) -> np.ndarray:
    """Crop the last len(box) axes of `array`."""
    slicer = (Ellipsis,) + tuple(slice(a, b) for a, b in box)
    return array[slicer]


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, list[list[int]]]:
    """Crop (c, z, y, x) data (and (z, y, x) seg) to the bounding box of the non-zero mask."""
    box = bounding_box(nonzero_mask(data))
    return crop_to_box(data, box), None if seg is None else crop_to_box(seg, box), box


def paste_into_box(cropped: np.ndarray, box: list[list[int]], full_shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Inverse of crop_to_box: place `cropped` back into an array of `full_shape` (last axes)."""
    lead = cropped.shape[: cropped.ndim - len(box)]
    out = np.full(tuple(lead) + tuple(full_shape), fill, dtype=cropped.dtype)
    out[(Ellipsis,) + tuple(slice(a, b) for a, b in box)] = cropped
    return out
