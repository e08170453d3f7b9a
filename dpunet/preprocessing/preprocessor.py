"""Preprocess cases for one plan configuration and undo it for predictions.

Forward (per case): crop to non-zero -> normalise -> resample to the configuration's spacing (2d: in-plane
only). Everything needed to go back is stored in the case's properties: original geometry, crop box, shape
after crop. `restore_probabilities` / `restore_segmentation` are the exact inverse on geometry.

Resuming: a preprocessed case is reused only when the plan entries (`config_fingerprint`) and its raw files
(size, modification time and SHA-256 of the image and the label, `raw_files_stamp`) are what it was made from;
a raw file that changed since is preprocessed again.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from dpunet.dataset.io import Geometry, read_image, read_label
from dpunet.dataset.msd import Case
from dpunet.preprocessing.cropping import crop_to_box, bounding_box, nonzero_mask, paste_into_box
from dpunet.preprocessing.normalization import normalise
from dpunet.preprocessing.resampling import (new_shape_for_spacing, resample_data, resample_segmentation,
                                             separate_axis)
from dpunet.utils.files import file_sha256, load_json, save_npz, write_json

MAX_LOCATIONS_PER_CLASS = 1000


def target_spacing_for(config: dict[str, Any], spacing: Sequence[float]) -> list[float]:
    """The grid a case is resampled to; the 2d configuration keeps each case's own slice spacing."""
    target = list(config["spacing"])
    if config["dim"] == 2 and len(target) == 2:
        target = [spacing[0]] + target
    if config["dim"] == 2:
        target[0] = spacing[0]
    return [float(t) for t in target]


def config_fingerprint(config: dict[str, Any]) -> str:
    """Hash of the plan entries that change preprocessed data (resumability check)."""
    keys = ("spacing", "dim", "normalization_schemes", "resampling")
    blob = json.dumps({k: config[k] for k in keys}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _class_locations(seg: np.ndarray, labels: Sequence[int], seed: int) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    out = {}
    for label in labels:
        coords = np.argwhere(seg == label)
        if len(coords) > MAX_LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), MAX_LOCATIONS_PER_CLASS, replace=False)]
        out[str(label)] = coords.astype(int).tolist()
    return out


def preprocess_array(data: np.ndarray, geometry: Geometry, config: dict[str, Any], seg: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(c, z, y, x) image (+ optional (z, y, x) seg) -> preprocessed arrays and the properties to undo it."""
    mask = nonzero_mask(data)
    box = bounding_box(mask)
    data = crop_to_box(data, box)
    mask = crop_to_box(mask, box)
    seg = None if seg is None else crop_to_box(seg, box)
    data = normalise(data, config["normalization_schemes"], mask)
    spacing = list(geometry.spacing)
    target = target_spacing_for(config, spacing)
    shape_after_crop = list(data.shape[1:])
    new_shape = new_shape_for_spacing(shape_after_crop, spacing, target)
    if config["dim"] == 2:
        new_shape[0] = shape_after_crop[0]
    res = config["resampling"]
    axis = separate_axis(spacing, target, res["anisotropy_threshold"])
    if config["dim"] == 2:
        axis = 0  # slices are resampled in-plane only
    data = resample_data(data, new_shape, res["data"]["order"], axis, res["data"]["order_z"])
    if seg is not None:
        seg = resample_segmentation(seg, new_shape, res["seg"]["order"], axis, res["seg"]["order_z"])
    properties = {
        "original_geometry": geometry.to_dict(),
        "crop_box": box,
        "shape_after_crop": shape_after_crop,
        "spacing_after_crop": spacing,
        "target_spacing": target,
        "shape_after_resampling": list(data.shape[1:]),
        "separate_axis": axis,
    }
    return data, seg, properties


def restore_probabilities(probabilities: np.ndarray, properties: dict[str, Any], config: dict[str, Any]) -> np.ndarray:
    """(classes, *preprocessed shape) softmax -> (classes, *original shape): resample back to the crop, then
    pad the crop back in (outside the crop: background probability 1)."""
    order = config["resampling"]["probabilities"]
    restored = resample_data(probabilities.astype(np.float32), properties["shape_after_crop"], order["order"],
                             properties["separate_axis"], order["order_z"])
    full_shape = tuple(properties["original_geometry"]["shape"])
    out = paste_into_box(restored, properties["crop_box"], full_shape, fill=0.0)
    outside = np.ones(full_shape, dtype=bool)
    outside[tuple(slice(a, b) for a, b in properties["crop_box"])] = False
    out[0][outside] = 1.0
    return out


def restore_segmentation(seg: np.ndarray, properties: dict[str, Any], config: dict[str, Any]) -> np.ndarray:
    """A preprocessed-space (z, y, x) label map back to the original grid (labels resampled per class)."""
    res = config["resampling"]["seg"]
    cropped = resample_segmentation(seg, properties["shape_after_crop"], res["order"], properties["separate_axis"],
                                    res["order_z"])
    return paste_into_box(cropped, properties["crop_box"], tuple(properties["original_geometry"]["shape"]), fill=0)


def raw_files_stamp(case: Case) -> list[dict[str, Any]]:
    """What identifies the raw files of a case for resuming: path, size, mtime and content hash of each."""
    stamp = []
    for path in (*case.image_files, case.label):
        if path is None:
            continue
        info = Path(path).stat()
        stamp.append({"file": str(path), "size": info.st_size, "mtime_ns": info.st_mtime_ns,
                      "sha256": file_sha256(path)})
    return stamp


def _is_done(props_path: Path, config_stamp: str, raw_stamp: list[dict[str, Any]]) -> bool:
    try:
        props = load_json(props_path)
    except ValueError:
        return False  # a damaged properties file: redo the case
    return props.get("config_fingerprint") == config_stamp and props.get("raw_files") == raw_stamp


def _stable_seed(text: str) -> int:
    return zlib.crc32(text.encode())


def preprocess_case(case: Case, config: dict[str, Any], foreground_labels: Sequence[int], out_dir: Path,
                    overwrite: bool = False) -> str:
    """Preprocess one training case into out_dir/<case>.npz + .json; returns 'done' or 'skipped'."""
    npz, props_path = out_dir / f"{case.case_id}.npz", out_dir / f"{case.case_id}.json"
    stamp = config_fingerprint(config)
    raw_stamp = raw_files_stamp(case)  # taken before reading: a file changed meanwhile is redone next time
    if not overwrite and npz.is_file() and props_path.is_file() and _is_done(props_path, stamp, raw_stamp):
        return "skipped"
    data, geometry = read_image(case.image)
    seg, _ = read_label(case.label)
    data, seg, properties = preprocess_array(data, geometry, config, seg)
    properties.update({
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "config_fingerprint": stamp,
        "raw_files": raw_stamp,
        "class_locations": _class_locations(seg, foreground_labels, _stable_seed(case.case_id)),
    })
    save_npz(npz, data=data.astype(np.float32), seg=seg[None].astype(np.int16))
    write_json(properties, props_path)  # written last: its presence marks the case complete
    return "done"


def preprocess_cases(cases: Sequence[Case], config: dict[str, Any], foreground_labels: Sequence[int], out_dir: Path,
                     num_processes: int = 1, overwrite: bool = False, desc: str = "preprocess") -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [(c, config, list(foreground_labels), out_dir, overwrite) for c in cases]
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            futures = [pool.submit(preprocess_case, *a) for a in args]
            results = [f.result() for f in tqdm(futures, desc=desc, unit="case")]
    else:
        results = [preprocess_case(*a) for a in tqdm(args, desc=desc, unit="case")]
    return {k: results.count(k) for k in ("done", "skipped")}
