"""Integrity check of a raw task (MSD or nnU-Net v2 layout) before anything is computed from it.

`find_problems` returns every problem it finds, one line each, naming the file; `verify_task` raises a
DpunetError listing them. Checked:
- dataset.json: present, valid JSON, required keys, consistent counts, at least one training case;
- dpunet's label rules: label values 0..L-1 without gaps, an `ignore_label` (if any) that is the largest;
- every listed image and label file: present and readable;
- images: number of channels equal to the `modality` entries, finite intensities, complete (not truncated)
  data, no dimension of size 0 (read independently with nibabel: SimpleITK hides truncation and NaN in NIfTI
  and reads a zero-size dimension as size 1);
- labels: same shape and geometry (spacing, origin, direction within a tolerance) as their image, only
  values declared in `labels`;
- test images: present, readable, right number of channels, finite.
Warnings (printed by `verify_task`, not refused): a label declared in dataset.json that no label file holds.
Cases are read in parallel (a process pool) when num_processes > 1. `check_test_image` is also what
dpunet_predict runs on every input.
"""
from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from dpunet.dataset.io import Geometry, read_image, read_label
from dpunet.dataset.msd import TaskInfo, load_task
from dpunet.dataset.nnunet_v2 import is_v2_description
from dpunet.utils.errors import DpunetError, warn

REQUIRED_KEYS = ("modality", "labels", "training")
DEFAULT_GEOMETRY_TOLERANCE = 1e-4  # relative (absolute below 1): NIfTI stores geometry as float32


def _non_finite_problem(path: Path, data: np.ndarray) -> list[str]:
    if data.dtype.kind != "f" or np.isfinite(data).all():
        return []
    n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
    return [f"{path}: contains non-finite values ({n_nan} NaN, {n_inf} Inf)"]


def stored_data_problems(path: Path) -> tuple[bool, list[str]]:
    """(checked, problems) from an independent read of the stored NIfTI voxels with nibabel.

    Needed because SimpleITK reads a truncated .nii.gz without complaint (missing voxels become 0) and
    turns NaN/Inf stored in NIfTI into 0, so neither is visible through dpunet.dataset.io. Other formats are
    not checked here (checked=False).
    """
    if not path.name.endswith((".nii", ".nii.gz")):
        return False, []
    try:
        stored = nib.load(str(path))
        if 0 in stored.shape:  # SimpleITK would read that dimension as size 1 (all zeros)
            return True, [f"{path}: image has a dimension of size 0 (stored shape {list(stored.shape)})"]
        data = np.asanyarray(stored.dataobj)
    except Exception as e:  # nibabel signals corruption with many types (EOFError, zlib.error, ImageFileError...)
        return True, [f"{path}: cannot read image data, file corrupt or truncated ({type(e).__name__}: {e})"]
    return True, _non_finite_problem(path, data)


def _read_image_problems(path: Path | tuple[Path, ...], num_channels: int) -> tuple[Optional[Geometry], list[str]]:
    """`path`: one image file, or nnU-Net v2 channel files (checked one by one, stacked as channels)."""
    try:
        image, geometry = read_image(path)
    except DpunetError as e:
        return None, [str(e)]
    files = path if isinstance(path, tuple) else (path,)
    problems = []
    for file in files:
        checked, found = stored_data_problems(file)
        problems += found if checked else _non_finite_problem(file, read_image(file)[0] if len(files) > 1 else image)
    path = files[0]  # messages name the (first) file
    if image.shape[0] != num_channels:
        problems.append(
            f"{path}: image has {image.shape[0]} channel(s) but dataset.json 'modality' declares {num_channels}"
        )
    return geometry, problems


def check_training_case(
    image: Path, label: Optional[Path], num_channels: int, label_values: list[int], tolerance: float
) -> list[str]:
    """Problems of one training case (image + label)."""
    return _training_case_check(image, label, num_channels, label_values, tolerance)[0]


def _training_case_check(
    image: Path, label: Optional[Path], num_channels: int, label_values: list[int], tolerance: float
) -> tuple[list[str], set[int]]:
    """(problems, label values present in the label file) of one training case."""
    geometry, problems = _read_image_problems(image, num_channels)
    image = image[0] if isinstance(image, tuple) else image  # messages name the first channel file
    if label is None:
        return problems + [f"{image}: training case has no label file (none in dataset.json; nnU-Net v2: none in "
                           f"labelsTr)"], set()
    try:
        seg, label_geometry = read_label(label)
    except DpunetError as e:
        return problems + [str(e)], set()
    problems += stored_data_problems(label)[1]
    present = {int(v) for v in np.unique(seg)}
    undeclared = sorted(present - set(label_values))
    if undeclared:
        problems.append(
            f"{label}: label values {undeclared} are not declared in dataset.json 'labels' {label_values}"
        )
    if geometry is not None:
        if geometry.shape != label_geometry.shape:
            problems.append(
                f"{label}: shape {list(label_geometry.shape)} differs from image {image.name} "
                f"{list(geometry.shape)} (z, y, x)"
            )
        diffs = [d for d in label_geometry.matches(geometry, tolerance) if not d.startswith("shape")]
        if diffs:
            problems.append(f"{label}: geometry differs from image {image.name}: " + "; ".join(diffs))
    return problems, present


def check_test_image(image: Path, num_channels: int) -> list[str]:
    """Problems of an image without label: readable, complete, finite, no empty dimension, `num_channels`."""
    return _read_image_problems(image, num_channels)[1]


def _run_check(job: tuple) -> tuple[list[str], set[int]]:
    kind, args = job
    return _training_case_check(*args) if kind == "train" else (check_test_image(*args), set())


def _dataset_json_problems(folder: Path) -> tuple[Optional[TaskInfo], list[str]]:
    """Parse dataset.json; return the task (None if it cannot be used) and the problems found in it."""
    path = folder / "dataset.json"
    if not folder.is_dir():
        return None, [f"{folder}: task folder not found"]
    if not path.is_file():
        return None, [f"{path}: dataset.json not found"]
    try:
        with open(path) as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        return None, [f"{path}: not valid JSON ({e})"]
    if not isinstance(raw, dict):
        return None, [f"{path}: must hold a JSON object"]
    if is_v2_description(raw):
        return _label_rule_problems(folder, raw)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        return None, [f"{path}: required key(s) {missing} missing"]
    for key in ("modality", "labels"):
        if not isinstance(raw[key], dict) or not raw[key]:
            return None, [f"{path}: '{key}' must be a non-empty object"]
    if not isinstance(raw["training"], list) or not all(isinstance(e, dict) for e in raw["training"]):
        return None, [f"{path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} objects"]
    test = raw.get("test", [])
    if not isinstance(test, list) or not all(
        isinstance(t, str) or (isinstance(t, dict) and "image" in t) for t in test
    ):
        return None, [f"{path}: 'test' must be a list of image paths"]
    task, problems = _label_rule_problems(folder, raw)
    if task is None:
        return task, problems
    if "numTraining" in raw and raw["numTraining"] != len(task.training):
        problems.append(f"{path}: numTraining is {raw['numTraining']} but 'training' lists {len(task.training)}")
    if "numTest" in raw and raw["numTest"] != len(task.test):
        problems.append(f"{path}: numTest is {raw['numTest']} but 'test' lists {len(task.test)}")
    return task, problems


def _label_rule_problems(folder: Path, raw: dict) -> tuple[Optional[TaskInfo], list[str]]:
    """Load the task (either layout) and check dpunet's rules on cases and label values."""
    path = folder / "dataset.json"
    try:
        task = load_task(folder)
    except DpunetError as e:
        return None, [str(e)]
    except (ValueError, TypeError) as e:  # e.g. a non-numeric ignore_label
        return None, [f"{path}: invalid value ({e})"]
    problems = []
    if not task.training:
        problems.append(f"{path}: no training cases (the 'training' list is empty)" if task.layout == "msd"
                        else f"{path}: no training cases (imagesTr holds no <case>_0000{raw['file_ending']})")
    values = task.label_values
    if values != list(range(len(values))):
        problems.append(
            f"{path}: label values {values} are not contiguous 0..{len(values) - 1}; dpunet requires labels "
            f"0..L-1 without gaps (renumber them)"
        )
    if task.ignore_label is not None and task.ignore_label != max(values):
        problems.append(
            f"{path}: ignore_label {task.ignore_label} is not the largest label ({max(values)}); dpunet requires "
            f"the ignore label to be the largest label value"
        )
    bg = task.background_label
    if bg is not None and bg not in task.labels:
        problems.append(f"{path}: background_label {bg} is not one of the labels {values}")
    return task, problems


@dataclass
class TaskCheck:
    """What the integrity check found: problems (the task is refused) and warnings (it is not)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _unused_label_warnings(task: TaskInfo, present: set[int]) -> list[str]:
    unused = [v for v in task.label_values if v not in present]
    if not unused:
        return []
    names = ", ".join(f"{v} ({task.labels[v]})" for v in unused)
    return [f"{task.folder / 'dataset.json'}: label(s) {names} declared in 'labels' occur in no label file: the "
            f"network will learn nothing for them (a wrong dataset.json or missing annotations?)"]


def check_task(
    task_folder: Path, num_processes: int = 1, geometry_tolerance: float = DEFAULT_GEOMETRY_TOLERANCE
) -> TaskCheck:
    """Every problem and warning found in the raw task at `task_folder`."""
    folder = Path(task_folder)
    task, problems = _dataset_json_problems(folder)
    if task is None:
        return TaskCheck(problems)
    label_values = task.label_values
    jobs = [
        ("train", (c.image, c.label, task.num_channels, label_values, geometry_tolerance)) for c in task.training
    ]
    jobs += [("test", (p, task.num_channels)) for p in task.test]
    if num_processes > 1 and len(jobs) > 1:
        # spawn: workers must not inherit threads (ITK, torch) of the parent
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(num_processes, len(jobs))) as pool:
            results = pool.map(_run_check, jobs, chunksize=max(1, len(jobs) // (4 * num_processes)))
    else:
        results = [_run_check(job) for job in jobs]
    present: set[int] = set()
    for case_problems, case_labels in results:
        problems.extend(case_problems)
        present |= case_labels
    return TaskCheck(problems, _unused_label_warnings(task, present))


def find_problems(
    task_folder: Path, num_processes: int = 1, geometry_tolerance: float = DEFAULT_GEOMETRY_TOLERANCE
) -> list[str]:
    """Every problem found in the raw task at `task_folder` (empty list: the task is fine)."""
    return check_task(task_folder, num_processes, geometry_tolerance).problems


def verify_task(
    task_folder: Path, num_processes: int = 1, geometry_tolerance: float = DEFAULT_GEOMETRY_TOLERANCE
) -> list[str]:
    """Raise a DpunetError listing every problem of the task, one per line; otherwise print the warnings
    (to stderr) and return them."""
    result = check_task(task_folder, num_processes, geometry_tolerance)
    if result.problems:
        raise DpunetError(
            f"{len(result.problems)} problem(s) in {task_folder}:\n" + "\n".join(f"  {p}" for p in result.problems)
        )
    for warning in result.warnings:
        warn(warning)
    return result.warnings
