"""Sliding-window inference with Gaussian importance weighting and mirroring test-time augmentation.

Works on one preprocessed case (c, z, y, x). Tiles of the plan's patch size overlap by (1 - step_size); each
tile's softmax is weighted by a Gaussian centred on the tile (predictions near a tile's border see less context)
and the weighted sum is divided by the summed weights, so every voxel gets a convex combination of the tiles
that cover it. A 2D network runs on (1, py, px) windows of the volume: slices are batched together, and
the mirror axes refer to the network's own spatial axes (0 = y, 1 = x for 2D; 0 = z ... for 3D).
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

GAUSSIAN_SIGMA_SCALE = 1 / 8  # sigma per axis as a fraction of the patch size (nnU-Net's choice)


@lru_cache(maxsize=8)
def _gaussian_cached(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    centre = np.zeros(patch_size, dtype=np.float32)
    centre[tuple(s // 2 for s in patch_size)] = 1
    g = gaussian_filter(centre, [s * sigma_scale for s in patch_size], mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g > 0].min()  # border voxels of a tile must still count
    g.flags.writeable = False  # shared by the cache
    return g.astype(np.float32, copy=False)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Tile weights (max 1, min > 0) that favour tile centres, where predictions see the most context."""
    return _gaussian_cached(tuple(int(s) for s in patch_size), float(sigma_scale))


def tile_starts(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Start indices per axis: the first tile at 0, the last ending at the image border, neighbours at most
    patch * step_size apart (at least one voxel), evenly spread. Requires image_size >= patch_size."""
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    starts = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image size {list(image_size)} is smaller than the patch {list(patch_size)}")
        if size == patch:
            starts.append([0])
            continue
        max_step = max(1.0, patch * step_size)
        n = int(np.ceil((size - patch) / max_step)) + 1
        starts.append(sorted({int(round(v)) for v in np.linspace(0, size - patch, n)}))
    return starts


def _network_output(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, (list, tuple)) else out  # deep supervision: full resolution first


def mirrored_softmax(model: nn.Module, x: Tensor, mirror_axes: Sequence[int] = ()) -> Tensor:
    """Softmax of (N, C, *spatial) averaged over every combination of flips of `mirror_axes` (0 = first
    spatial axis), each prediction flipped back: 2^len(mirror_axes) forward passes."""
    axes = sorted({int(a) for a in mirror_axes})
    spatial_dims = x.ndim - 2
    if any(a < 0 or a >= spatial_dims for a in axes):
        raise ValueError(f"mirror axes {axes} do not fit a {spatial_dims}D input")
    probs = torch.softmax(_network_output(model, x).float(), 1)
    combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    for combo in combos:
        dims = [a + 2 for a in combo]
        probs += torch.flip(torch.softmax(_network_output(model, torch.flip(x, dims)).float(), 1), dims)
    return probs / (len(combos) + 1)


def _pad_to_window(image: Tensor, window: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Zero-pad (C, *spatial) symmetrically so every axis is at least the window; returns the pad before."""
    spatial = list(image.shape[1:])
    pad = [max(0, w - s) for s, w in zip(spatial, window)]
    before = [p // 2 for p in pad]
    if any(pad):
        widths: list[int] = []
        for b, p in zip(reversed(before), reversed(pad)):  # F.pad takes the last axis first
            widths += [b, p - b]
        image = torch.nn.functional.pad(image, widths)
    return image, before


def sliding_window_weight_sum(image_size: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5,
                              use_gaussian: bool = True) -> np.ndarray:
    """Sum of the tile weights at every voxel of an image at least as large as the patch (the normaliser of
    the weighted average; > 0 wherever tiles cover the image)."""
    weights = gaussian_importance(patch_size) if use_gaussian else np.ones(patch_size, np.float32)
    total = np.zeros(image_size, dtype=np.float64)
    for start in itertools.product(*tile_starts(image_size, patch_size, step_size)):
        total[tuple(slice(s, s + p) for s, p in zip(start, patch_size))] += weights
    return total


@torch.no_grad()
def _predict_windows(model: nn.Module, image: Tensor, window: Sequence[int], num_classes: int, step_size: float,
                     mirror_axes: Sequence[int], tile_batch_size: int, use_gaussian: bool,
                     squeeze_leading: int, use_amp: bool) -> Tensor:
    """Weighted tile average over (C, *spatial) with windows of `window`; the first `squeeze_leading` window
    axes have size 1 and are removed before the network sees the tile (a 2D network on a volume)."""
    device = next(model.parameters()).device
    spatial = list(image.shape[1:])
    image, pad_before = _pad_to_window(image.to(device, torch.float32), window)
    padded = list(image.shape[1:])
    net_window = list(window[squeeze_leading:])
    weights = torch.tensor(gaussian_importance(net_window) if use_gaussian else np.ones(net_window, np.float32),
                           device=device)
    acc = torch.zeros([num_classes] + padded, dtype=torch.float32, device=device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    tiles = list(itertools.product(*tile_starts(padded, window, step_size)))
    amp = torch.autocast(device.type, enabled=use_amp and device.type == "cuda")
    for i in range(0, len(tiles), max(1, tile_batch_size)):
        slicers = [tuple(slice(s, s + w) for s, w in zip(t, window)) for t in tiles[i:i + tile_batch_size]]
        batch = torch.stack([image[(slice(None),) + sl] for sl in slicers])
        batch = batch.reshape(batch.shape[:2] + tuple(net_window))
        with amp:
            probs = mirrored_softmax(model, batch, mirror_axes)
        if probs.shape[1] != num_classes:
            raise ValueError(f"the network predicts {probs.shape[1]} classes, expected {num_classes}")
        probs = probs.float().reshape((probs.shape[0], num_classes) + tuple(window))
        for sl, p in zip(slicers, probs):
            acc[(slice(None),) + sl] += p * weights
            norm[sl] += weights
    out = acc / norm
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    return out[(slice(None),) + crop]


@torch.no_grad()
def predict_sliding_window(model: nn.Module, image: Tensor, patch_size: Sequence[int], num_classes: int,
                           step_size: float = 0.5, mirror_axes: Sequence[int] = (), tile_batch_size: int = 4,
                           use_gaussian: bool = True, use_amp: bool = True) -> Tensor:
    """Softmax probabilities (classes, *spatial) for one image (channels, *spatial), with as many spatial
    axes as the patch. Images smaller than the patch are zero-padded (then cropped back)."""
    if image.ndim != len(patch_size) + 1:
        raise ValueError(f"image {tuple(image.shape)} does not fit a {len(patch_size)}D patch {list(patch_size)}")
    return _predict_windows(model, image, list(patch_size), num_classes, step_size, mirror_axes, tile_batch_size,
                            use_gaussian, 0, use_amp)


@torch.no_grad()
def predict_case(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], num_classes: int,
                 step_size: float = 0.5, mirror_axes: Sequence[int] = (), tile_batch_size: int = 4,
                 use_gaussian: bool = True, use_amp: bool = True) -> np.ndarray:
    """Probabilities (classes, z, y, x), float32 on the CPU, for a preprocessed case (channels, z, y, x).
    A 2D patch (py, px) runs on (1, py, px) windows, several slices per batch."""
    if data.ndim != 4:
        raise ValueError(f"a preprocessed case is (channels, z, y, x), got shape {data.shape}")
    if len(patch_size) not in (2, 3):
        raise ValueError(f"patch size must have 2 or 3 entries, got {list(patch_size)}")
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        window = list(patch_size) if len(patch_size) == 3 else [1] + list(patch_size)
        squeeze = 3 - len(patch_size)
        probs = _predict_windows(model, x, window, num_classes, step_size, mirror_axes, tile_batch_size,
                                 use_gaussian, squeeze, use_amp)
        return probs.cpu().numpy()
    finally:
        model.train(was_training)
