"""Images of random processes with segmentation labels: public pretraining data that contains no patient.

Tang et al. (2023) showed that DP-SGD fine-tuning of a network pretrained on images of random processes beats
DP-SGD from scratch by a wide margin, at no privacy cost. This is the segmentation analogue: a smooth random
texture as the scene, a few deformed ellipsoids ("objects") drawn into it with their own intensity, texture and
soft edges, a multiplicative bias field and noise. An object's class decides its contrast to the scene (class
k has contrast k times a random base level, with a random sign), so the task is learnable: find compact regions
that stand out, and sort them by contrast. Every random number comes from the caller's generator; the
generator never reads a file.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

# samples are drawn at most this large per axis and resized to the patch: generation time stays bounded for
# large 3D patches (a 128^3 sample at full size costs seconds) and smooth random fields lose nothing by it
MAX_GENERATION_SIZE = 64


def smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian white noise low-passed at `sigma` voxels, scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    field -= field.mean()
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A uniformly random rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def object_mask(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """A deformed ellipsoid somewhere in the patch: a soft mask in [0, 1]."""
    dim = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = [rng.uniform(0.15 * n, 0.85 * n) for n in shape]
    radii = np.array([rng.uniform(max(1.5, 0.06 * n), max(2.0, 0.3 * n)) for n in shape], dtype=np.float32)
    offsets = np.stack([g - c for g, c in zip(grids, centre)], axis=-1) @ random_rotation(rng, dim).astype(np.float32)
    radius = np.sqrt(((offsets / radii) ** 2).sum(-1))
    wobble = 0.25 * smooth_field(rng, shape, sigma=max(2.0, 0.1 * min(shape)))
    edge = rng.uniform(0.05, 0.2)
    return 1.0 / (1.0 + np.exp(np.clip((radius + wobble - 1.0) / edge, -30, 30)))


def random_segmentation_sample(rng: np.random.Generator, shape: Sequence[int], channels: int,
                               num_classes: int, max_objects: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(image (channels, *shape) float32, z-scored per channel; labels (1, *shape) int16 in 0..num_classes-1)."""
    shape = tuple(int(n) for n in shape)
    scale = MAX_GENERATION_SIZE / max(shape)
    if scale >= 1:
        return _sample(rng, shape, channels, num_classes, max_objects)
    image, labels = _sample(rng, tuple(max(4, round(n * scale)) for n in shape), channels, num_classes, max_objects)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    image = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=shape, mode=mode,
                                            align_corners=False)[0].numpy()
    labels = torch.nn.functional.interpolate(torch.from_numpy(labels.astype(np.float32))[None], size=shape,
                                             mode="nearest")[0].numpy().astype(np.int16)
    return _standardise(image), labels


def _standardise(image: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, image.ndim))
    return ((image - image.mean(axis=axes, keepdims=True)) /
            np.maximum(image.std(axis=axes, keepdims=True), 1e-6)).astype(np.float32)


def _sample(rng: np.random.Generator, shape: tuple[int, ...], channels: int, num_classes: int,
            max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(shape, dtype=np.int16)
    scene = smooth_field(rng, shape, rng.uniform(2.0, max(2.5, 0.3 * min(shape)))) * rng.uniform(0.2, 0.8)
    base_contrast = rng.uniform(0.6, 1.5)
    contrasts: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(1, num_classes))
        soft = object_mask(rng, shape)
        labels[soft > 0.5] = cls
        contrast = rng.choice([-1.0, 1.0]) * base_contrast * cls
        contrasts.append((soft, contrast))
    image = np.empty((channels, *shape), dtype=np.float32)
    bias = np.exp(0.3 * smooth_field(rng, shape, 0.25 * min(shape)))
    for c in range(channels):
        channel = scene * rng.uniform(0.5, 1.5)
        for soft, contrast in contrasts:
            texture = 0.2 * smooth_field(rng, shape, rng.uniform(1.0, 3.0))
            channel = channel * (1 - soft) + soft * (contrast + texture)
        image[c] = channel * bias + rng.uniform(0.02, 0.15) * rng.standard_normal(shape).astype(np.float32)
    return _standardise(image), labels[None]
