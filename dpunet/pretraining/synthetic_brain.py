"""Synthetic brain MR images with tissue labels, from the public MNI152 template: pretraining data without patients.

Domain randomisation in the spirit of SynthSeg (Billot et al. 2023): the anatomy comes from the template (its
grey- and white-matter maps give the labels), everything an MR scanner and a preprocessing pipeline change is
drawn at random so the network learns shapes and boundaries rather than one contrast. A sample is a crop of the
template the size of the patch (2D: a slice crop, axial, coronal or sagittal) around a random brain voxel, under
a random affine (rotation +-15 degrees per plane, scale 0.85-1.15 per axis, axis flips) and a smooth elastic
displacement; the image mixes the warped T1 (random gamma, sometimes inverted) with a per-tissue random-intensity
image (random means per tissue, partial volume from the maps, texture), then a multiplicative bias field, a blur,
a resolution jitter (one axis acquired coarser), Gaussian noise, and a z-score per channel.

Labels: 0 background and CSF, 1 grey matter, 2 white matter; with one foreground class (num_classes 2) grey
matter only, with more than two foreground classes the classes above 2 do not occur. Every random number comes
from the caller's generator.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from dpunet.pretraining.mni_template import MniTemplate
from dpunet.pretraining.random_images import MAX_GENERATION_SIZE, _standardise

MAX_ROTATION_DEGREES = 15.0
SCALE_RANGE = (0.85, 1.15)
# elastic displacement: a 4-per-axis grid of Gaussian offsets (mm, standard deviation up to this), interpolated
MAX_ELASTIC_MM = 3.0
ELASTIC_CONTROL_POINTS = 4


def _upsampled_field(rng: np.random.Generator, count: int, control: int, shape: Sequence[int]) -> np.ndarray:
    """`count` smooth fields on `shape`: standard normal values on a control grid, linearly interpolated."""
    coarse = torch.from_numpy(rng.standard_normal((1, count, *([control] * len(shape)))).astype(np.float32))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)[0].numpy()


# rng -> (3,) template voxel coordinates of a patch's centre
CentreFunction = Callable[[np.random.Generator], np.ndarray]


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A rotation by at most MAX_ROTATION_DEGREES in each coordinate plane."""
    matrix = np.eye(dim)
    for i, j in ([(0, 1)] if dim == 2 else [(0, 1), (0, 2), (1, 2)]):
        angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
        plane = np.eye(dim)
        plane[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
        matrix = plane @ matrix
    return matrix


def _template_coordinates(rng: np.random.Generator, draw_centre: CentreFunction, shape: tuple[int, ...],
                          voxel_mm: float, deform: bool) -> np.ndarray:
    """(3, *shape) template voxel coordinates of the patch's voxels, centred on the template voxel
    `draw_centre(rng)` (drawn after the axes, so seeded samples stay what they were before centres could vary).
    Without `deform`: an axis-aligned crop (3D: the template's axis order; 2D: a slice across a random axis) at
    template spacing, at integer offsets, so every patch voxel falls on a template voxel."""
    dim = len(shape)
    axes = np.sort(rng.permutation(3)[:dim]) if not deform or dim == 2 else rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], dim) if deform else np.ones(dim)
    embed = np.zeros((3, dim))
    embed[axes, np.arange(dim)] = signs
    centre = draw_centre(rng)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")).reshape(dim, -1)
    points = grid * voxel_mm
    if deform:
        affine = _rotation(rng, dim) @ np.diag(rng.uniform(*SCALE_RANGE, size=dim))
        elastic = _upsampled_field(rng, dim, ELASTIC_CONTROL_POINTS, shape) * rng.uniform(0, MAX_ELASTIC_MM)
        points = affine @ points + elastic.reshape(dim, -1)
    return (centre[:, None] + embed @ points).reshape(3, *shape)


def random_voxel(rng: np.random.Generator, flat_indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One of the template voxels `flat_indices`, drawn uniformly, as (3,) voxel coordinates."""
    return np.array(np.unravel_index(flat_indices[rng.integers(flat_indices.size)], shape), dtype=np.float64)


def _labels(gm: np.ndarray, wm: np.ndarray, num_classes: int) -> np.ndarray:
    """The most probable tissue (0 background/CSF, 1 GM, 2 WM), folded to the task's classes."""
    tissue = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.int16)
    if num_classes >= 3:
        return tissue
    if num_classes == 2:
        return (tissue == 1).astype(np.int16)
    return np.zeros_like(tissue)


def _channel(rng: np.random.Generator, t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """One randomised MR contrast of the warped template."""
    shape = t1.shape
    contrast = np.clip(t1, 0, 1) ** np.exp(rng.normal(0.0, 0.3))
    if rng.random() < 0.3:  # T2-like: dark tissue bright
        contrast = 1.0 - contrast
    background = np.clip(1.0 - gm - wm, 0, 1)
    means = rng.uniform(0.0, 1.0, 3)
    # grey and white matter always differ by some contrast, of either sign: the labelled boundary is visible
    means[2] = means[1] + rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.6)
    tissues = means[0] * background + means[1] * gm + means[2] * wm
    tissues = tissues + rng.uniform(0.0, 0.05) * ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    weight = rng.uniform(0.0, 1.0)
    image = weight * contrast + (1.0 - weight) * tissues
    image = ndimage.gaussian_filter(image, rng.uniform(0.0, 1.0, len(shape)))
    image = _resolution_jitter(rng, image)
    image = image * np.exp(rng.uniform(0.0, 0.4) * _upsampled_field(rng, 1, 3, shape)[0])
    return image + rng.uniform(0.0, 0.05) * rng.standard_normal(shape)


def _resolution_jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Half the time, one axis acquired up to 3 times coarser (thick slices), then resampled back."""
    if rng.random() < 0.5:
        return image
    axis = int(rng.integers(image.ndim))
    coarse = list(image.shape)
    coarse[axis] = max(2, round(image.shape[axis] / rng.uniform(1.0, 3.0)))
    mode = "bilinear" if image.ndim == 2 else "trilinear"
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    down = torch.nn.functional.interpolate(tensor, size=tuple(coarse), mode=mode, align_corners=True)
    return torch.nn.functional.interpolate(down, size=image.shape, mode=mode, align_corners=True)[0, 0].numpy()


# labels of a patch from its template coordinates and the warped grey- and white-matter maps
LabelFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def warped_template_sample(rng: np.random.Generator, shape: Sequence[int], channels: int, template: MniTemplate,
                           draw_centre: CentreFunction, labels_of: LabelFunction,
                           deform: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A randomised MR patch of the template around the voxel `draw_centre(rng)`, labelled by
    `labels_of(coords, gm, wm)`: (image (channels, *shape) float32, z-scored per channel; labels (1, *shape) int16)."""
    shape = tuple(int(n) for n in shape)
    scale = min(1.0, MAX_GENERATION_SIZE / max(shape))
    # a large patch is generated on a coarser grid covering the same field of view, then resized
    generated = shape if scale == 1.0 else tuple(max(4, round(n * scale)) for n in shape)
    coords = _template_coordinates(rng, draw_centre, generated, 1.0 / scale, deform)
    t1, gm, wm = (ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)
                  for volume in (template.t1, template.gm, template.wm))
    labels = labels_of(coords, gm, wm).astype(np.int16)
    image = np.stack([_channel(rng, t1, gm, wm) for _ in range(channels)]).astype(np.float32)
    if generated != shape:
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        image = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=shape, mode=mode,
                                                align_corners=False)[0].numpy()
        labels = torch.nn.functional.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None],
                                                 size=shape, mode="nearest")[0, 0].numpy().astype(np.int16)
    return _standardise(image), labels[None]


def synthetic_brain_sample(rng: np.random.Generator, shape: Sequence[int], channels: int, num_classes: int,
                           template: MniTemplate, deform: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image (channels, *shape) float32, z-scored per channel; labels (1, *shape) int16 in 0..num_classes-1),
    like random_segmentation_sample, around a random brain voxel. `deform=False` leaves out the affine, the
    flips and the elastic warp."""
    return warped_template_sample(rng, shape, channels, template,
                                  partial(random_voxel, flat_indices=template.brain_voxels, shape=template.t1.shape),
                                  lambda coords, gm, wm: _labels(gm, wm, num_classes), deform)
