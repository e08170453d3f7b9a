"""Shared pieces of the PNG -> MSD converters: reading PNGs, plain 2D geometry, resumable conversion.

Every output file is written atomically, so a file that exists is complete: a rerun after an interruption
skips it. dataset.json is written last, by the converter, once all files are in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from dpunet.dataset.io import Geometry, write_image, write_segmentation
from dpunet.utils.errors import DpunetError


def read_png(path: Path, mode: Optional[str] = None) -> np.ndarray:
    """Pixels of a PNG as a numpy array; `mode` ("RGB", "L") converts, None keeps the stored values
    (palette PNGs give their indices, which is what annotation files mean)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except FileNotFoundError:
        raise DpunetError(f"{path}: file not found") from None
    except OSError as e:
        raise DpunetError(f"{path}: cannot read PNG ({e})") from None


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) from the PNG header without decoding the pixels."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise DpunetError(f"{path}: file not found") from None
    except OSError as e:
        raise DpunetError(f"{path}: cannot read PNG ({e})") from None
    return height, width


def plain_geometry(height: int, width: int) -> Geometry:
    """A natural 2D image as one z slice: spacing 1, origin 0, identity direction."""
    return Geometry(shape=(1, height, width), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=tuple(float(v) for v in np.eye(3).ravel()))


@dataclass(frozen=True)
class PngCase:
    """One case to convert: an image PNG and, for labelled cases, its annotation PNG."""

    case_id: str
    image: Path
    label: Optional[Path] = None


def convert_png_case(
    case: PngCase,
    image_dir: Path,
    label_dir: Optional[Path],
    image_mode: str,
    label_map: Callable[[np.ndarray, Path], np.ndarray],
) -> None:
    """Write `image_dir/<id>.nii.gz` (channels from `image_mode`) and, with a label, `label_dir/<id>.nii.gz`
    (`label_map(pixels, png_path)` gives the label values and raises on bad ones). Existing outputs are kept."""
    height, width = png_size(case.image)
    geometry = plain_geometry(height, width)
    image_out = image_dir / f"{case.case_id}.nii.gz"
    if not image_out.exists():
        pixels = read_png(case.image, image_mode)
        channels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        # uint8 stays uint8 on disk (4x smaller than float); read_image returns float32 anyway
        write_image(channels[:, None], geometry, image_out)
    if case.label is None or label_dir is None:
        return
    label_out = label_dir / f"{case.case_id}.nii.gz"
    if label_out.exists():
        return
    raw = read_png(case.label)
    if raw.ndim != 2:
        raise DpunetError(f"{case.label}: an annotation PNG must have one channel, got shape {raw.shape}")
    if raw.shape != (height, width):
        raise DpunetError(
            f"{case.label}: annotation size {raw.shape} differs from image {case.image} ({height}, {width})"
        )
    write_segmentation(label_map(raw, case.label)[None], geometry, label_out)


def convert_all(
    cases: Sequence[PngCase],
    image_dir: Path,
    label_dir: Optional[Path],
    image_mode: str,
    label_map: Callable[[np.ndarray, Path], np.ndarray],
    desc: str,
) -> None:
    for case in tqdm(cases, desc=desc, unit="case", disable=None):
        convert_png_case(case, image_dir, label_dir, image_mode, label_map)


def sorted_pngs(
    folder: Path, limit: Optional[int] = None, key: Callable[[Path], object] = lambda p: p.name
) -> list[Path]:
    """PNG files of a folder in a stable order (first `limit` of them)."""
    if not folder.is_dir():
        raise DpunetError(f"{folder}: folder not found")
    files = sorted(folder.glob("*.png"), key=key)
    if not files:
        raise DpunetError(f"{folder}: no PNG files")
    if limit is not None:
        if limit < 1:
            raise DpunetError(f"limit must be >= 1, got {limit}")
        files = files[:limit]
    return files


def training_entries(cases: Sequence[PngCase]) -> list[dict[str, str]]:
    return [{"image": f"./imagesTr/{c.case_id}.nii.gz", "label": f"./labelsTr/{c.case_id}.nii.gz"} for c in cases]


def test_entries(cases: Sequence[PngCase]) -> list[str]:
    return [f"./imagesTs/{c.case_id}.nii.gz" for c in cases]
