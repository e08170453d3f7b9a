"""Target spacing, patch size and U-Net topology, following nnU-Net v2's published rules (design brief s.4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Topology:
    patch_size: list[int]
    strides: list[list[int]]  # per stage; first is all ones
    kernel_sizes: list[list[int]]
    pools_per_axis: list[int]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> list[int]:
        """Each patch axis must be divisible by this (product of strides)."""
        return [int(np.prod([s[a] for s in self.strides])) for a in range(len(self.patch_size))]


def fullres_target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                           anisotropy_threshold: float = 3.0) -> list[float]:
    """Median spacing; for strongly anisotropic data the coarse axis takes its 10th percentile instead
    (nnU-Net: otherwise thick-slice outliers dictate a blurry grid)."""
    spacings, shapes = np.asarray(spacings, float), np.asarray(shapes, float)
    target = np.percentile(spacings, 50, axis=0)
    if len(target) < 3:
        return [float(t) for t in target]
    size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > anisotropy_threshold * max(target[others])
    aniso_voxels = size[worst] * anisotropy_threshold < min(size[others])
    if aniso_spacing and aniso_voxels:
        p10 = np.percentile(spacings[:, worst], 10)
        target[worst] = max(p10, max(target[others]) + 1e-5) if p10 < max(target[others]) else p10
    return [float(t) for t in target]


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[int], voxels_per_axis: int) -> list[int]:
    """A patch of voxels_per_axis^dim voxels with aspect ratio following the physical size, capped to the
    median image shape."""
    inv = 1.0 / np.asarray(spacing, float)
    dim = len(spacing)
    scaled = inv * (voxels_per_axis ** dim / np.prod(inv)) ** (1.0 / dim)
    return [int(min(round(s), m)) for s, m in zip(scaled, median_shape)]


def plan_topology(spacing: Sequence[float], patch_size: Sequence[int], min_feature_map: int = 4,
                  max_pools: int = 999) -> Topology:
    """Pool an axis while its feature map stays >= 2*min_feature_map and its spacing is within 2x of the
    finest; 3x3 kernels once an axis' spacing is within 2x of the finest (1 before); then round the patch up to
    a multiple of the total stride."""
    dim = len(spacing)
    cur_spacing, cur_size = list(map(float, spacing)), list(map(float, patch_size))
    pools = [0] * dim
    kernel = [1] * dim
    strides, kernels = [[1] * dim], []
    while True:
        axes = [a for a in range(dim) if cur_size[a] >= 2 * min_feature_map]
        if not axes:
            break
        finest = min(cur_spacing[a] for a in axes)
        axes = [a for a in axes if cur_spacing[a] / finest < 2 and pools[a] < max_pools]
        if len(axes) == 1 and cur_size[axes[0]] < 3 * min_feature_map:
            break  # pooling a single axis is only worth it while it is clearly large
        if not axes:
            break
        for a in range(dim):
            if kernel[a] != 3 and cur_spacing[a] / min(cur_spacing) < 2:
                kernel[a] = 3
        stride = [2 if a in axes else 1 for a in range(dim)]
        for a in axes:
            pools[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = np.ceil(cur_size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)  # bottleneck
    divisor = [2 ** p for p in pools]
    padded = [int(np.ceil(s / d) * d) for s, d in zip(patch_size, divisor)]
    return Topology(padded, strides, kernels, pools)


def features_per_stage(n_stages: int, base: int, cap: int, width: float = 1.0, multiple_of: int = 8) -> list[int]:
    feats = []
    for i in range(n_stages):
        f = min(base * 2 ** i, cap) * width
        feats.append(max(multiple_of, int(round(f / multiple_of)) * multiple_of))
    return feats
