"""The public MNI ICBM152 2009a symmetric template (T1, grey- and white-matter maps, 1 mm), for pretraining.

The three files ship inside the nilearn wheel (BSD-3, public on PyPI). dpunet does not depend on nilearn: the
first use downloads the pinned wheel with pip (`pip download --no-deps`), extracts only the three files, checks
each against the SHA-256 below and keeps them in a cache folder. A folder of your own holding the same three
files (`DPUNET_MNI_DIR`) is checked the same way, so the pretraining source is always exactly these bytes.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpunet.utils.errors import DpunetError
from dpunet.utils.files import atomic_path, file_sha256

NILEARN_VERSION = "0.14.1"
WHEEL = f"nilearn-{NILEARN_VERSION}-py3-none-any.whl"
WHEEL_FOLDER = "nilearn/datasets/data"
# role -> (file name, SHA-256), computed once from nilearn 0.14.1's wheel
FILES: dict[str, tuple[str, str]] = {
    "t1": ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
           "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"),
    "gm": ("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
           "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed"),
    "wm": ("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
           "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"),
}
CACHE_SUBFOLDER = "mni152_2009a_sym"
LICENCE_NOTICE = (
    "MNI ICBM152 non-linear symmetric 2009a template, Copyright (C) 1993-2009 Louis Collins, McConnell Brain "
    "Imaging Centre, Montreal Neurological Institute, McGill University (Fonov et al. 2009, 2011); permission "
    "to use, copy, modify and distribute is granted provided the copyright notice appears in all copies; "
    "provided 'as is' without warranty; redistributed in the nilearn wheel (BSD-3)")


@dataclass(frozen=True)
class MniTemplate:
    """The template as float32 arrays in [0, 1] (same grid), the brain's voxels, and where it came from."""
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    # flat indices of the voxels where grey + white matter > 0.5: crop centres are drawn from them
    brain_voxels: np.ndarray
    source: str
    # voxel index -> MNI millimetres (4x4), the files' own affine: anatomical priors are placed with it
    affine: np.ndarray


def default_cache_dir() -> Path:
    """$DPUNET_PUBLIC_DATA/mni152_2009a_sym, else ~/.cache/dpunet/public/mni152_2009a_sym."""
    root = os.environ.get("DPUNET_PUBLIC_DATA")
    base = Path(root) if root else Path.home() / ".cache" / "dpunet" / "public"
    return base / CACHE_SUBFOLDER


def _check_hashes(folder: Path) -> None:
    for name, expected in FILES.values():
        path = folder / name
        if not path.is_file():
            raise DpunetError(f"MNI template: {path} is missing (the folder must hold {', '.join(_file_names())})")
        found = file_sha256(path)
        if found != expected:
            raise DpunetError(f"MNI template: {path} has SHA-256 {found}, expected {expected} (nilearn "
                              f"{NILEARN_VERSION}'s file); remove it to download it again")


def _file_names() -> list[str]:
    return [name for name, _ in FILES.values()]


def _download_into(cache: Path) -> None:
    """pip-download the pinned nilearn wheel to a temporary folder and extract the three files into `cache`."""
    with tempfile.TemporaryDirectory(prefix="dpunet_nilearn_") as tmp:
        command = [sys.executable, "-m", "pip", "download", f"nilearn=={NILEARN_VERSION}", "--no-deps",
                   "--no-cache-dir", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheel = Path(tmp) / WHEEL
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DpunetError(f"MNI template: `{' '.join(command)}` failed (exit {done.returncode}: "
                              f"{' | '.join(tail)}); put the three files ({', '.join(_file_names())}) in a folder "
                              f"and set DPUNET_MNI_DIR to it, or start from images of random processes instead "
                              f"(--init-from random_images, which needs no download)")
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for name, _ in FILES.values():
                with archive.open(f"{WHEEL_FOLDER}/{name}") as src, atomic_path(cache / name) as tmp_path, \
                        open(tmp_path, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def fetch_mni_template(cache_dir: Path | None = None) -> MniTemplate:
    """The template from `cache_dir` (default: $DPUNET_MNI_DIR when set, else default_cache_dir()),
    downloaded there first when missing; every file is checked against its SHA-256."""
    user_dir = os.environ.get("DPUNET_MNI_DIR")
    if cache_dir is None and user_dir:
        folder = Path(user_dir)
    else:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if not all((folder / name).is_file() for name in _file_names()):
            _download_into(folder)
    _check_hashes(folder)
    return _load(str(folder.resolve()), tuple(sha for _, sha in FILES.values()))


@functools.lru_cache(maxsize=2)
def _load(folder: str, hashes: tuple[str, ...]) -> MniTemplate:
    """Read the (checked) files once per process: `hashes` is part of the key, so other bytes are read anew."""
    import nibabel as nib

    images = {role: nib.load(Path(folder) / name) for role, (name, _) in FILES.items()}
    arrays = {role: np.asarray(image.dataobj, dtype=np.float32) for role, image in images.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise DpunetError(f"MNI template in {folder}: the three files must be 3D volumes on one grid "
                          f"(shapes {sorted(shapes)})")
    # the files store 0..255; scaled per file so a map is a probability
    arrays = {role: a / max(float(a.max()), 1e-6) for role, a in arrays.items()}
    brain = np.flatnonzero((arrays["gm"] + arrays["wm"]).ravel() > 0.5).astype(np.int64)
    if brain.size == 0:
        raise DpunetError(f"MNI template in {folder}: the grey- and white-matter maps hold no brain voxel")
    files = ", ".join(f"{name} (sha256 {sha})" for name, sha in FILES.values())
    source = f"{WHEEL} (PyPI): {files}; {LICENCE_NOTICE}"
    return MniTemplate(arrays["t1"], arrays["gm"], arrays["wm"], brain, source, np.asarray(images["gm"].affine))
