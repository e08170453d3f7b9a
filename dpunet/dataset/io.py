"""NIfTI reading and writing with SimpleITK.

Conventions (as nnU-Net's SimpleITKIO): arrays are in SimpleITK's numpy order (z, y, x); `spacing` is given in
that same axis order; `origin` and `direction` stay in ITK's physical (x, y, z) order so an image written back
lands exactly where it came from. A 4D MSD image (x, y, z, c) is read as channels-first (c, z, y, x); its
3D geometry is the first three ITK axes. 2D data are stored as 3D NIfTI with a single z slice.

Caution: SimpleITK's NIfTI reader returns NaN/Inf voxels as 0 and reads a truncated .nii.gz without error
(missing voxels become 0); dpunet.dataset.verify checks the stored data independently for both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from dpunet.utils.errors import DpunetError
from dpunet.utils.files import atomic_write_with


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x), mm
    origin: tuple[float, float, float]  # ITK (x, y, z)
    direction: tuple[float, ...]  # ITK 3x3 row-major

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        return cls(
            shape=tuple(int(v) for v in d["shape"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )

    def matches(self, other: "Geometry", tol: float = 1e-4) -> list[str]:
        """Names of the fields in which the two geometries differ (empty if they agree)."""
        diffs = []
        if self.shape != other.shape:
            diffs.append(f"shape {list(self.shape)} vs {list(other.shape)}")
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            scale = np.maximum(1.0, np.abs(a))
            if a.shape != b.shape or np.any(np.abs(a - b) > tol * scale):
                diffs.append(f"{name} {np.round(a, 5).tolist()} vs {np.round(b, 5).tolist()}")
        return diffs


def _read_sitk(path: Path) -> sitk.Image:
    if not path.is_file():
        raise DpunetError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DpunetError(f"{path}: cannot read image ({first})") from None


def _geometry(img: sitk.Image, array_shape: tuple[int, ...]) -> Geometry:
    dim = img.GetDimension()
    if dim == 3:
        spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    elif dim == 4:
        d4 = np.asarray(img.GetDirection()).reshape(4, 4)
        spacing, origin, direction = img.GetSpacing()[:3], img.GetOrigin()[:3], tuple(d4[:3, :3].ravel())
    elif dim == 2:
        d2 = np.asarray(img.GetDirection()).reshape(2, 2)
        d3 = np.eye(3)
        d3[:2, :2] = d2
        spacing = tuple(img.GetSpacing()) + (1.0,)
        origin = tuple(img.GetOrigin()) + (0.0,)
        direction = tuple(d3.ravel())
    else:
        raise DpunetError(f"unsupported image dimension {dim}")
    return Geometry(
        shape=tuple(int(s) for s in array_shape[-3:]),
        spacing=tuple(float(s) for s in spacing[::-1]),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction),
    )


def read_image(path: str | Path | tuple[Path, ...]) -> tuple[np.ndarray, Geometry]:
    """Image as float32 (c, z, y, x) plus its geometry. 4D files are split into channels; a tuple of files
    (nnU-Net's `_0000`, `_0001`, ... channel files) is stacked in its order."""
    if isinstance(path, (tuple, list)):
        return _read_channel_files(tuple(Path(p) for p in path))
    path = Path(path)
    img = _read_sitk(path)
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:  # vector pixels (e.g. RGB) -> channels first
        arr = np.moveaxis(arr, -1, 0)
        if arr.ndim == 3:
            arr = arr[:, None]
    elif img.GetDimension() == 4:
        pass  # (c, z, y, x) already
    elif img.GetDimension() == 3:
        arr = arr[None]
    elif img.GetDimension() == 2:
        arr = arr[None, None]
    geometry = _natural_image_geometry(path, _geometry(img, arr.shape))
    return arr.astype(np.float32, copy=False), geometry


def _natural_image_geometry(path: Path, geometry: Geometry) -> Geometry:
    """2D natural images have no physical grid: spacing 1, as nnU-Net v2 (TIFF's resolution tags are ignored)."""
    if not path.name.lower().endswith(NATURAL_IMAGE_SUFFIXES):
        return geometry
    return Geometry(geometry.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel().tolist()))


def _grey_label(img: sitk.Image, path: Path) -> sitk.Image:
    arr = sitk.GetArrayFromImage(img)
    if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(arr.shape[-1], 3))):
        raise DpunetError(f"{path}: a label map must have one channel (this image is in colour)")
    grey = sitk.GetImageFromArray(arr[..., 0])
    grey.CopyInformation(img)
    return grey


def _read_channel_files(paths: tuple[Path, ...]) -> tuple[np.ndarray, Geometry]:
    arrays, geometry = [], None
    for p in paths:
        arr, g = read_image(p)
        if len(paths) > 1 and arr.shape[0] != 1:
            raise DpunetError(f"{p}: a channel file (_XXXX naming) must hold one channel, it holds {arr.shape[0]}")
        if geometry is not None and geometry.matches(g):
            raise DpunetError(f"{p}: geometry differs from {paths[0].name}: " + "; ".join(geometry.matches(g)))
        geometry = geometry or g
        arrays.append(arr)
    return np.concatenate(arrays, axis=0), geometry


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Segmentation as int16 (z, y, x) plus geometry; float-stored labels must hold whole numbers."""
    path = Path(path)
    img = _read_sitk(path)
    if img.GetNumberOfComponentsPerPixel() > 1 and path.name.lower().endswith(NATURAL_IMAGE_SUFFIXES):
        img = _grey_label(img, path)  # some writers (BMP) store a grey label map as identical RGB channels
    if img.GetNumberOfComponentsPerPixel() > 1 or img.GetDimension() == 4:
        raise DpunetError(f"{path}: a label map must have one channel")
    arr = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 2:
        arr = arr[None]
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise DpunetError(f"{path}: label map contains NaN or Inf")
        rounded = np.rint(arr)
        if np.any(np.abs(arr - rounded) > 1e-3):
            raise DpunetError(f"{path}: label map holds non-integer values")
        arr = rounded
    return arr.astype(np.int16), _natural_image_geometry(path, _geometry(img, arr.shape))


def _to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in geometry.spacing[::-1]))
    img.SetOrigin(tuple(geometry.origin))
    img.SetDirection(tuple(geometry.direction))
    return img


# 2D natural-image formats (nnU-Net v2's NaturalImage2DIO): spacing 1, written as plain 2D images
NATURAL_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
SEGMENTATION_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd") + NATURAL_IMAGE_SUFFIXES


def write_segmentation(seg: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a (z, y, x) label map with the given geometry, atomically, as uint8 (or int16 for >255 labels).
    The format follows the file name: NIfTI (default), .mha, .nrrd, or a 2D .png/.tif/.bmp (z must be 1)."""
    seg, path = np.asarray(seg), Path(path)
    if tuple(seg.shape) != tuple(geometry.shape):
        raise DpunetError(f"{path}: segmentation shape {seg.shape} does not match geometry {geometry.shape}")
    dtype = np.uint8 if seg.max(initial=0) < 256 and seg.min(initial=0) >= 0 else np.int16
    if path.name.lower().endswith(NATURAL_IMAGE_SUFFIXES):
        if seg.shape[0] != 1 or dtype != np.uint8:
            raise DpunetError(f"{path}: a 2D image file holds one slice of labels 0..255, got shape {seg.shape}")
        img = sitk.GetImageFromArray(seg[0].astype(np.uint8))
        atomic_write_with(path, lambda tmp: sitk.WriteImage(img, str(tmp)))
        return
    img = _to_sitk(seg.astype(dtype), geometry)
    io = "NiftiImageIO" if path.name.endswith((".nii.gz", ".nii")) or "." not in path.name else ""
    atomic_write_with(path, lambda tmp: sitk.WriteImage(img, str(tmp), True, imageIO=io))


def write_image(image: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a (z, y, x) or (c, z, y, x) float image; several channels become one 4D MSD-style file."""
    image = np.asarray(image)
    if image.ndim not in (3, 4) or tuple(image.shape[-3:]) != tuple(geometry.shape):
        raise DpunetError(f"{path}: image shape {image.shape} does not match geometry {geometry.shape}")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3:
        img = _to_sitk(image, geometry)
    else:
        channels = [_to_sitk(c, geometry) for c in image]
        img = sitk.JoinSeries(channels)  # 4D (x, y, z, c)
    atomic_write_with(path, lambda tmp: sitk.WriteImage(img, str(tmp), True, imageIO="NiftiImageIO"))
