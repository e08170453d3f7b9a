"""Synthetic hippocampus crops from the public MNI152 template: a pretraining task shaped like hippocampus
segmentation (MSD Task04: crops around one hippocampus, labels anterior and posterior), with no patient data.

The labels are a public anatomical prior, not a segmentation of any person. It is fixed by published numbers
only, never by a patient's label:
- the hippocampal long axis: the segment between the two hippocampus ROI centres of Seitzman et al. 2020's
  300-ROI set ("A set of functionally-defined brain regions with improved representation of the subcortex and
  cerebellum", NeuroImage 206; the table ships in the nilearn wheel as
  seitzman_2018_ROIs_300inVol_MNI_allInfo.txt), (+-25.6, -11.8, -21.5) and (+-25.2, -38.8, -2.0) MNI mm,
  extended by AXIS_EXTENSION_MM at each end;
- the hippocampus: template grey matter (probability > GREY_MATTER_THRESHOLD) within HIPPOCAMPUS_RADIUS_MM of
  that axis and nearer to it than to the same set's amygdala ROI centre (+-20.3, -2.3, -22.2). A 6 mm radius
  gives about 4.0 cm^3 per side in this (enlarged, non-linear MNI) template, the order of published adult
  hippocampal volumes;
- anterior (label 1, the head) and posterior (label 2, body and tail) split at the uncal apex, the coronal
  plane y = -21 mm in MNI space (Poppenk et al. 2013, "Long-axis specialization of the human hippocampus",
  Trends Cogn Sci 17).

A sample is synthesised as in dpunet.pretraining.synthetic_brain (random contrast, warp, bias, blur, noise)
around a crop centre that is a prior voxel of either hemisphere (most samples) or any voxel near the axis (the
rest, so slices without hippocampus occur too), jittered by up to CENTRE_JITTER_MM per axis.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from dpunet.pretraining.mni_template import MniTemplate
from dpunet.pretraining.synthetic_brain import warped_template_sample

# MNI mm; Seitzman et al. 2020's hippocampus and amygdala ROI centres, right hemisphere (x mirrored for left)
HIPPOCAMPUS_ANTERIOR_MM = (25.57, -11.78, -21.54)
HIPPOCAMPUS_POSTERIOR_MM = (25.24, -38.78, -2.01)
AMYGDALA_MM = (20.30, -2.27, -22.21)
UNCAL_APEX_Y_MM = -21.0
AXIS_EXTENSION_MM = 4.0
HIPPOCAMPUS_RADIUS_MM = 6.0
GREY_MATTER_THRESHOLD = 0.5
# crop centres: this share on a prior voxel, the rest anywhere within NEIGHBOURHOOD_MM of the axis
CENTRE_ON_HIPPOCAMPUS = 0.75
NEIGHBOURHOOD_MM = 15.0
CENTRE_JITTER_MM = 4.0


def _distance_to_axis(points_mm: np.ndarray, x_sign: float) -> np.ndarray:
    """Distance (mm) of (n, 3) MNI points to one hemisphere's extended hippocampal axis."""
    mirror = np.array([x_sign, 1.0, 1.0])
    start, end = np.array(HIPPOCAMPUS_ANTERIOR_MM) * mirror, np.array(HIPPOCAMPUS_POSTERIOR_MM) * mirror
    length = float(np.linalg.norm(end - start))
    direction = (end - start) / length
    along = np.clip((points_mm - start) @ direction, -AXIS_EXTENSION_MM, length + AXIS_EXTENSION_MM)
    return np.linalg.norm(points_mm - (start + along[:, None] * direction), axis=1)


# id(template) -> (template, prior): the template is kept so that its id is not reused while cached
_PRIORS: dict[int, tuple[MniTemplate, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}


def _prior(template: MniTemplate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels on the template grid (int16: 0, 1 anterior, 2 posterior), flat indices of the hippocampus voxels,
    flat indices of the neighbourhood voxels), computed once per template object."""
    cached = _PRIORS.get(id(template))
    if cached is None or cached[0] is not template:
        if len(_PRIORS) >= 2:
            _PRIORS.clear()
        cached = _PRIORS[id(template)] = (template, _compute_prior(template))
    return cached[1]


def _compute_prior(template: MniTemplate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = np.indices(template.gm.shape).reshape(3, -1)
    points = (template.affine[:3, :3] @ index + template.affine[:3, 3:4]).T
    grey = template.gm.ravel() > GREY_MATTER_THRESHOLD
    labels = np.zeros(points.shape[0], dtype=np.int16)
    near = np.zeros(points.shape[0], dtype=bool)
    for x_sign in (1.0, -1.0):
        axis_distance = _distance_to_axis(points, x_sign)
        amygdala_distance = np.linalg.norm(points - np.array(AMYGDALA_MM) * [x_sign, 1.0, 1.0], axis=1)
        inside = grey & (axis_distance < HIPPOCAMPUS_RADIUS_MM) & (axis_distance < amygdala_distance)
        labels[inside] = np.where(points[inside, 1] > UNCAL_APEX_Y_MM, 1, 2)
        near |= axis_distance < NEIGHBOURHOOD_MM
    return labels.reshape(template.gm.shape), np.flatnonzero(labels), np.flatnonzero(near)


def hippocampus_prior(template: MniTemplate) -> np.ndarray:
    """The prior's labels on the template grid: 0 elsewhere, 1 anterior (head), 2 posterior (body and tail)."""
    return _prior(template)[0]


def _draw_centre(rng: np.random.Generator, template: MniTemplate) -> np.ndarray:
    _, hippocampus, neighbourhood = _prior(template)
    pool = hippocampus if rng.random() < CENTRE_ON_HIPPOCAMPUS and hippocampus.size else neighbourhood
    voxel = np.array(np.unravel_index(pool[rng.integers(pool.size)], template.gm.shape), dtype=np.float64)
    voxel_mm = np.linalg.norm(template.affine[:3, :3], axis=0)  # spacing per voxel axis, rotated grids too
    return voxel + rng.uniform(-CENTRE_JITTER_MM, CENTRE_JITTER_MM, 3) / voxel_mm


def _fold_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Anterior and posterior as classes 1 and 2; with one foreground class, the whole hippocampus."""
    if num_classes >= 3:
        return labels
    if num_classes == 2:
        return (labels > 0).astype(labels.dtype)
    return np.zeros_like(labels)


def synthetic_hippocampus_sample(rng: np.random.Generator, shape: Sequence[int], channels: int, num_classes: int,
                                 template: MniTemplate, deform: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image (channels, *shape) float32, z-scored per channel; labels (1, *shape) int16 in 0..num_classes-1),
    like random_segmentation_sample: a randomised MR crop near a hippocampus, labelled by the prior."""
    prior = hippocampus_prior(template)

    def labels_of(coords: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
        # folded on the patch: folding the whole template grid per sample would cost ~9M voxels each time
        return _fold_labels(ndimage.map_coordinates(prior, coords, order=0, mode="constant", cval=0), num_classes)

    return warped_template_sample(rng, shape, channels, template, lambda r: _draw_centre(r, template), labels_of,
                                  deform)
