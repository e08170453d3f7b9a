"""Sliding-window inference with Gaussian importance weighting and mirroring test-time augmentation.

Works on one preprocessed case (c, z, y, x). A 2D network is applied slice by slice along z.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn


@lru_cache(maxsize=8)
def _gaussian_cached(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    centre = np.zeros(patch_size, dtype=np.float32)
    centre[tuple(s // 2 for s in patch_size)] = 1
    g = gaussian_filter(centre, [s * sigma_scale for s in patch_size], mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g > 0].min()  # border tiles must still count
    return g.astype(np.float32)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Weights that favour tile centres, where predictions see the most context (nnU-Net)."""
    return _gaussian_cached(tuple(int(s) for s in patch_size), sigma_scale)


def tile_starts(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Start indices per axis so tiles overlap by (1 - step_size) and cover the image exactly."""
    starts = []
    for size, patch in zip(image_size, patch_size):
        if size <= patch:
            starts.append([0])
            continue
        n = int(np.ceil((size - patch) / (patch * step_size))) + 1
        starts.append([int(round(v)) for v in np.linspace(0, size - patch, n)])
    return starts


def _forward(model: nn.Module, x: Tensor, mirror_axes: Sequence[int]) -> Tensor:
    """Softmax averaged over all mirror combinations of the spatial axes `mirror_axes` (0 = first spatial)."""
    def logits(t: Tensor) -> Tensor:
        out = model(t)
        return out[0] if isinstance(out, (list, tuple)) else out

    probs = torch.softmax(logits(x).float(), 1)
    combos = [c for r in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for combo in combos:
        dims = [a + 2 for a in combo]
        probs += torch.flip(torch.softmax(logits(torch.flip(x, dims)).float(), 1), dims)
    return probs / (len(combos) + 1)


@torch.no_grad()
def predict_sliding_window(model: nn.Module, image: Tensor, patch_size: Sequence[int], num_classes: int,
                           step_size: float = 0.5, mirror_axes: Sequence[int] = (), tile_batch_size: int = 4,
                           use_gaussian: bool = True) -> Tensor:
    """Softmax probabilities (classes, *spatial) for one image (channels, *spatial), spatial = patch dims."""
    device = next(model.parameters()).device
    spatial = list(image.shape[1:])
    pad = [max(0, p - s) for s, p in zip(spatial, patch_size)]
    pad_before = [p // 2 for p in pad]
    if any(pad):
        widths = []
        for pb, p in zip(reversed(pad_before), reversed(pad)):
            widths += [pb, p - pb]
        image = torch.nn.functional.pad(image, widths)
    padded = list(image.shape[1:])
    weights = torch.from_numpy(gaussian_importance(patch_size) if use_gaussian
                               else np.ones(patch_size, np.float32)).to(device)
    acc = torch.zeros([num_classes] + padded, device=device)
    norm = torch.zeros(padded, device=device)
    tiles = list(itertools.product(*tile_starts(padded, patch_size, step_size)))
    for i in range(0, len(tiles), tile_batch_size):
        chunk = tiles[i:i + tile_batch_size]
        slicers = [tuple(slice(s, s + p) for s, p in zip(t, patch_size)) for t in chunk]
        batch = torch.stack([image[(slice(None),) + sl] for sl in slicers]).to(device)
        probs = _forward(model, batch, mirror_axes)
        for sl, p in zip(slicers, probs):
            acc[(slice(None),) + sl] += p * weights
            norm[sl] += weights
    out = acc / norm
    crop = tuple(slice(pb, pb + s) for pb, s in zip(pad_before, spatial))
    return out[(slice(None),) + crop]


@torch.no_grad()
def predict_case(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], num_classes: int,
                 step_size: float = 0.5, mirror_axes: Sequence[int] = (), tile_batch_size: int = 4) -> np.ndarray:
    """Probabilities (classes, z, y, x) for a preprocessed case; 2D patches run slice by slice."""
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        if len(patch_size) == 3:
            return predict_sliding_window(model, x, patch_size, num_classes, step_size, mirror_axes,
                                          tile_batch_size).cpu().numpy()
        slices = [predict_sliding_window(model, x[:, z], patch_size, num_classes, step_size, mirror_axes,
                                         tile_batch_size).cpu() for z in range(x.shape[1])]
        return torch.stack(slices, 1).numpy()
    finally:
        model.train(was_training)
