"""Seeded synthetic MSD tasks (2D or 3D, one or more channels) for tests and the demo.

Each case is a "body" (an ellipsoid of non-zero tissue inside a frame of exact zeros, so crop-to-nonzero has
work to do) holding an "organ" (label 1) and smaller blobs (labels 2..K) inside it or next to it. Every label
has its own mean intensity per channel (channels have different contrasts), blurred at the edges, with noise,
a smooth multiplicative bias field and a per-case intensity scale, so that normalisation matters but the
labels stay learnable. Shapes vary by up to +-15 % per case; geometry is non-trivial (non-zero origin, some
cases with a flipped or rotated but orthonormal direction matrix) so geometry round-trips are really tested.

Randomness: the task-level contrast table comes from `seed`; each patient's anatomy from (seed, patient) and
each case's shape, noise and geometry from (seed, case), so a case does not change when `num_cases` does.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from dpunet import paths
from dpunet.dataset.io import Geometry, write_image, write_segmentation
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import write_json


@dataclass(frozen=True)
class SyntheticAppearance:
    """Knobs of the intensity model (defaults give a task a small U-Net learns in a few epochs)."""

    shape_variation: float = 0.15  # relative +- per axis
    contrast_step: float = 0.55  # mean intensity step between label groups (body tissue has mean 1)
    edge_blur_voxels: float = 0.7  # partial-volume blur of the label-wise mean map
    noise_std: float = 0.1  # additive Gaussian noise, relative to body tissue
    bias_amplitude: float = 0.2  # multiplicative bias field 1 +- amplitude
    scale_range: tuple[float, float] = (0.5, 2.0)  # per case, per channel intensity scale
    channel_base_scale: float = 100.0


_LABEL_NAMES = ("background", "organ", "lesion")


def _label_name(value: int) -> str:
    return _LABEL_NAMES[value] if value < len(_LABEL_NAMES) else f"blob{value}"


def _contrast_table(num_labels: int, num_channels: int, step: float) -> np.ndarray:
    """Mean intensity per (channel, label); body tissue (label 0) is 1 in channel 0.

    Label j lies ceil(j/2) steps above (odd j) or below (even j) body tissue, so neighbouring labels always
    differ by at least one step; channel c rotates the table by c so the channels carry different contrasts.
    """
    means = np.empty(num_labels)
    for j in range(num_labels):
        k = step * ((j + 1) // 2)
        means[j] = 1.0 + k if j % 2 == 1 else 1.0 / (1.0 + k)
    return np.stack([np.roll(means, -c) for c in range(num_channels)])


def _normalised_grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Voxel-centre coordinates in [-1, 1] per axis, broadcastable against `shape`."""
    grids = []
    for axis, n in enumerate(shape):
        u = (np.arange(n) + 0.5) / n * 2.0 - 1.0
        view = [1] * len(shape)
        view[axis] = n
        grids.append(u.reshape(view))
    return grids


def _ellipsoid(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _random_direction(rng: np.random.Generator, kind: int, ndim: int) -> np.ndarray:
    """ITK direction (x, y, z): 0 identity, 1 axis flips (RAS-like), 2 a random rotation."""
    if kind == 0:
        return np.eye(3)
    if kind == 1:
        return np.diag([-1.0, -1.0, 1.0])
    if ndim == 2:  # rotate in the image plane only; z stays the slice normal
        a = rng.uniform(-np.pi, np.pi)
        rot = np.eye(3)
        rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        return rot
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


@dataclass(frozen=True)
class _Anatomy:
    """Shape-independent anatomy of one patient in normalised coordinates (axes z, y, x)."""

    body_centre: np.ndarray
    body_radii: np.ndarray
    blob_centres: list[np.ndarray]  # label 1..K
    blob_radii: list[np.ndarray]


def _patient_anatomy(rng: np.random.Generator, num_foreground: int) -> _Anatomy:
    body_centre = rng.uniform(-0.05, 0.05, 3)
    body_radii = rng.uniform(0.82, 0.95, 3)
    organ_centre = body_centre + rng.uniform(-0.12, 0.12, 3)
    organ_radii = rng.uniform(0.35, 0.5, 3)
    organ_radii[0] = rng.uniform(0.45, 0.6)  # z: keep the organ on several slices even when they are few
    centres, radii = [organ_centre], [organ_radii]
    for j in range(2, num_foreground + 1):
        r = organ_radii * rng.uniform(0.4, 0.55)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        if j % 2 == 0:  # inside the organ ("lesion")
            c = organ_centre + d * organ_radii * 0.35
        else:  # touching the organ from outside, kept within the body
            c = organ_centre + d * (organ_radii + r * 0.8)
            c = np.clip(c, body_centre - body_radii * 0.7, body_centre + body_radii * 0.7)
        centres.append(c)
        radii.append(r)
    return _Anatomy(body_centre, body_radii, centres, radii)


def _jitter(anatomy: _Anatomy, rng: np.random.Generator, amount: float) -> _Anatomy:
    """Another scan of the same patient: the same anatomy, slightly moved and resized."""
    if amount == 0:
        return anatomy
    move = lambda c: c + rng.uniform(-amount, amount, 3)  # noqa: E731
    grow = lambda r: r * rng.uniform(1 - amount, 1 + amount, 3)  # noqa: E731
    return _Anatomy(
        move(anatomy.body_centre),
        grow(anatomy.body_radii),
        [move(c) for c in anatomy.blob_centres],
        [grow(r) for r in anatomy.blob_radii],
    )


def _segmentation(anatomy: _Anatomy, shape: tuple[int, int, int], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(body mask, label map) for one case; every label is present."""
    axes = slice(1, 3) if ndim == 2 else slice(0, 3)
    grid = _normalised_grid(shape[axes])
    sub = lambda v: np.asarray(v)[axes]  # noqa: E731
    # blobs must span at least ~1.5 voxels per axis or they vanish on coarse grids
    min_radius = 3.0 / np.asarray(shape[axes], dtype=float)
    body = _ellipsoid(grid, sub(anatomy.body_centre), sub(anatomy.body_radii))
    seg = np.zeros(body.shape, np.uint8)
    for j, (c, r) in enumerate(zip(anatomy.blob_centres, anatomy.blob_radii), start=1):
        seg[_ellipsoid(grid, sub(c), np.maximum(sub(r), min_radius)) & body] = j
    for j, c in enumerate(anatomy.blob_centres, start=1):
        if not np.any(seg == j):  # squeezed out by a later blob or the body edge: mark its centre voxel
            idx = tuple(int(np.clip(np.floor((ci + 1) / 2 * n), 0, n - 1)) for ci, n in zip(sub(c), body.shape))
            body[idx] = True
            seg[idx] = j
    if ndim == 2:
        body, seg = body[None], seg[None]
    return body, seg


def _intensities(
    seg: np.ndarray,
    body: np.ndarray,
    contrast: np.ndarray,
    rng: np.random.Generator,
    ndim: int,
    appearance: SyntheticAppearance,
) -> np.ndarray:
    num_channels = contrast.shape[0]
    grid = _normalised_grid(seg.shape)
    blur = (0.0,) + (appearance.edge_blur_voxels,) * 2 if ndim == 2 else appearance.edge_blur_voxels
    image = np.zeros((num_channels,) + seg.shape, np.float32)
    for c in range(num_channels):
        mean_map = gaussian_filter(contrast[c][seg] * body, blur)
        noisy = mean_map + rng.normal(0.0, appearance.noise_std, seg.shape)
        phases, freqs = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.5, 1.5, 3)
        axes = range(1, 3) if ndim == 2 else range(3)
        field = sum(np.cos(np.pi * freqs[a] * grid[a] + phases[a]) for a in axes) / len(axes)
        bias = 1.0 + appearance.bias_amplitude * field
        lo, hi = np.log(appearance.scale_range[0]), np.log(appearance.scale_range[1])
        scale = appearance.channel_base_scale * (c + 1) * np.exp(rng.uniform(lo, hi))
        # the body must stay strictly non-zero so that the non-zero mask is exactly the body
        values = np.maximum(noisy * bias, 0.02) * scale
        image[c] = np.where(body, values, 0.0)
    return image


def _case_geometry(
    rng: np.random.Generator, index: int, shape: tuple[int, int, int], spacing: np.ndarray, ndim: int,
    spacing_jitter: float,
) -> Geometry:
    spacing = spacing * rng.uniform(1 - spacing_jitter, 1 + spacing_jitter, 3) if spacing_jitter else spacing
    if ndim == 2:
        spacing = np.array([1.0, spacing[1], spacing[2]])
    origin = rng.uniform(-150.0, 150.0, 3)
    direction = _random_direction(rng, index % 3, ndim)
    return Geometry(
        shape=tuple(int(s) for s in shape),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.ravel()),
    )


def _validated_layout(
    ndim: int, base_shape: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) base shape and spacing; for 2D, (y, x) or (z, y, x) with z replaced by 1."""
    if ndim not in (2, 3):
        raise DpunetError(f"ndim must be 2 or 3, got {ndim}")
    allowed = (2, 3) if ndim == 2 else (3,)
    if len(base_shape) not in allowed or len(spacing) not in allowed:
        raise DpunetError(
            f"{ndim}D task needs base_shape and spacing with {' or '.join(map(str, allowed))} entries, "
            f"got {list(base_shape)} and {list(spacing)}"
        )
    shape = np.array([1] * (3 - len(base_shape)) + [int(s) for s in base_shape])
    sp = np.array([1.0] * (3 - len(spacing)) + [float(s) for s in spacing])
    if ndim == 2:
        shape[0], sp[0] = 1, 1.0
    if np.any(shape[3 - ndim:] < 4):
        raise DpunetError(f"base_shape {list(base_shape)}: every axis needs at least 4 voxels")
    if np.any(sp <= 0):
        raise DpunetError(f"spacing {list(spacing)} must be positive")
    return shape, sp


def generate_synthetic_task(
    raw_root: Path,
    task_id: int = 990,
    name: str = "Synthetic3D",
    num_cases: int = 24,
    ndim: int = 3,
    num_channels: int = 1,
    num_foreground: int = 2,
    base_shape: Sequence[int] = (24, 48, 48),
    spacing: Sequence[float] = (3.0, 1.0, 1.0),
    num_test: int = 2,
    cases_per_patient: int = 1,
    seed: int = 0,
    *,
    spacing_jitter: float = 0.0,
    appearance: Optional[SyntheticAppearance] = None,
) -> Path:
    """Write `raw_root/TaskXXX_<name>` (dataset.json, imagesTr, labelsTr, imagesTs) and return its path.

    `base_shape` and `spacing` are (z, y, x); for `ndim=2` images have Z == 1 and spacing (1, sy, sx) (a given
    z entry is ignored). `cases_per_patient > 1` groups consecutive cases into patients (similar anatomy,
    `patient_id` in dataset.json). `spacing_jitter` varies the spacing per case by up to that fraction.
    Existing files of the same names are overwritten; dataset.json is written last.
    """
    if num_cases < 1 or num_test < 0 or num_channels < 1 or num_foreground < 1 or cases_per_patient < 1:
        raise DpunetError(
            "num_cases, num_channels, num_foreground and cases_per_patient must be >= 1 and num_test >= 0"
        )
    if not 0 <= spacing_jitter < 1:
        raise DpunetError(f"spacing_jitter must be in [0, 1), got {spacing_jitter}")
    appearance = appearance or SyntheticAppearance()
    shape0, spacing0 = _validated_layout(ndim, base_shape, spacing)
    folder = Path(raw_root) / f"Task{task_id:03d}_{name}"
    prefix = name.lower()
    contrast = _contrast_table(num_foreground + 1, num_channels, appearance.contrast_step)

    def make_case(index: int, patient: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
        anatomy = _patient_anatomy(np.random.default_rng([seed, 1, patient]), num_foreground)
        rng = np.random.default_rng([seed, 2, index])
        if cases_per_patient > 1:
            anatomy = _jitter(anatomy, rng, 0.04)
        v = appearance.shape_variation
        shape = np.maximum(np.rint(shape0 * rng.uniform(1 - v, 1 + v, 3)).astype(int), 4)
        if ndim == 2:
            shape[0] = 1
        shape = tuple(int(s) for s in shape)
        body, seg = _segmentation(anatomy, shape, ndim)
        image = _intensities(seg, body, contrast, rng, ndim, appearance)
        return image, seg, _case_geometry(rng, index, shape, spacing0, ndim, spacing_jitter)

    training = []
    for i in range(num_cases):
        case_id = f"{prefix}_{i:03d}"
        image, seg, geometry = make_case(i, patient=i // cases_per_patient)
        write_image(image, geometry, folder / "imagesTr" / f"{case_id}.nii.gz")
        write_segmentation(seg, geometry, folder / "labelsTr" / f"{case_id}.nii.gz")
        entry = {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        if cases_per_patient > 1:
            entry["patient_id"] = f"patient_{i // cases_per_patient:03d}"
        training.append(entry)
    test = []
    for i in range(num_cases, num_cases + num_test):
        case_id = f"{prefix}_{i:03d}"
        # test patients are new people: patient index past every training patient
        image, _, geometry = make_case(i, patient=num_cases + i)
        write_image(image, geometry, folder / "imagesTs" / f"{case_id}.nii.gz")
        test.append(f"./imagesTs/{case_id}.nii.gz")

    dataset = {
        "name": name,
        "description": f"synthetic {ndim}D task generated by dpunet (seed {seed})",
        "reference": "dataset_conversion/generate_synthetic.py",
        "licence": "public domain (synthetic)",
        "tensorImageSize": "4D" if num_channels > 1 else "3D",
        "modality": {str(c): f"synthetic{c}" for c in range(num_channels)},
        "labels": {str(j): _label_name(j) for j in range(num_foreground + 1)},
        "numTraining": num_cases,
        "numTest": num_test,
        "training": training,
        "test": test,
        "synthetic_parameters": {
            "ndim": ndim,
            "base_shape": shape0.tolist(),
            "spacing": spacing0.tolist(),
            "cases_per_patient": cases_per_patient,
            "spacing_jitter": spacing_jitter,
            "seed": seed,
        },
    }
    write_json(dataset, folder / "dataset.json")
    return folder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate a seeded synthetic MSD task (for tests and the demo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-o", "--output-root", type=Path, default=None,
                   help="raw data root the task folder is written into (default: $DPUNET_RAW)")
    p.add_argument("--task-id", type=int, default=990)
    p.add_argument("--name", default="Synthetic3D")
    p.add_argument("--num-cases", type=int, default=24)
    p.add_argument("--ndim", type=int, choices=(2, 3), default=3)
    p.add_argument("--num-channels", type=int, default=1)
    p.add_argument("--num-foreground", type=int, default=2, help="number of foreground labels")
    p.add_argument("--base-shape", type=int, nargs="+", default=[24, 48, 48], help="(z) y x")
    p.add_argument("--spacing", type=float, nargs="+", default=[3.0, 1.0, 1.0], help="(z) y x, mm")
    p.add_argument("--num-test", type=int, default=2)
    p.add_argument("--cases-per-patient", type=int, default=1)
    p.add_argument("--spacing-jitter", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    return p


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    folder = generate_synthetic_task(
        args.output_root if args.output_root is not None else paths.raw_root(),
        task_id=args.task_id,
        name=args.name,
        num_cases=args.num_cases,
        ndim=args.ndim,
        num_channels=args.num_channels,
        num_foreground=args.num_foreground,
        base_shape=args.base_shape,
        spacing=args.spacing,
        num_test=args.num_test,
        cases_per_patient=args.cases_per_patient,
        seed=args.seed,
        spacing_jitter=args.spacing_jitter,
    )
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    main()
