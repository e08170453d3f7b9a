"""End-of-training validation on a fold's held-out cases: predict in preprocessed space, restore to the
original grid, write NIfTI, evaluate against the raw labels (validation/summary.json)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from dpunet.dataset.io import Geometry, write_segmentation
from dpunet.dataset.msd import TaskInfo
from dpunet.evaluation.evaluate import evaluate_folder, write_summary
from dpunet.inference.sliding_window import predict_case
from dpunet.preprocessing.preprocessor import restore_probabilities
from dpunet.utils.files import load_json


def predict_preprocessed_cases(model: nn.Module, case_ids: Sequence[str], data_dir: Path, config: dict[str, Any],
                               num_classes: int, out_dir: Path, step_size: float = 0.5, mirroring: bool = False,
                               ) -> None:
    """Segmentations of preprocessed cases, written in each case's original geometry."""
    mirror_axes = config.get("mirror_axes", []) if mirroring else []
    for case_id in tqdm(case_ids, desc="validation", unit="case", leave=False):
        data = np.load(data_dir / f"{case_id}.npz")["data"]
        properties = load_json(data_dir / f"{case_id}.json")
        probs = predict_case(model, data, config["patch_size"], num_classes, step_size, mirror_axes)
        restored = restore_probabilities(probs, properties, config)
        seg = restored.argmax(0).astype(np.uint8)
        write_segmentation(seg, Geometry.from_dict(properties["original_geometry"]), out_dir / f"{case_id}.nii.gz")


def validate_fold(model: nn.Module, task: TaskInfo, case_ids: Sequence[str], data_dir: Path, config: dict[str, Any],
                  num_classes: int, out_dir: Path, step_size: float = 0.5, mirroring: bool = False) -> dict[str, Any]:
    predict_preprocessed_cases(model, case_ids, data_dir, config, num_classes, out_dir, step_size, mirroring)
    label_dirs = {c.label.parent for c in task.training if c.case_id in set(case_ids)}
    if len(label_dirs) != 1:
        raise RuntimeError(f"validation labels live in several folders: {label_dirs}")
    summary = evaluate_folder(label_dirs.pop(), out_dir, task.labels, task.ignore_label, task.background_label,
                              case_ids=list(case_ids))
    write_summary(summary, out_dir / "summary.json")
    return summary


def mean_foreground_dice(summary: dict[str, Any]) -> float:
    return float(summary["foreground_mean"]["Dice"])
