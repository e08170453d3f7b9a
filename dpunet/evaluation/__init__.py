"""Evaluation of segmentations (summary.json as nnU-Net v2) and the cross-validation summary."""
from dpunet.evaluation.cross_validation import format_epsilon, run_folder_name, summarize_cross_validation
from dpunet.evaluation.evaluate import aggregate_metrics, evaluate_folder, write_summary
from dpunet.evaluation.metrics import (
    METRIC_NAMES,
    class_metrics,
    dice,
    hd95,
    iou,
    normalized_surface_dice,
    surface_distances,
    surface_mask,
)

__all__ = [
    "METRIC_NAMES",
    "aggregate_metrics",
    "class_metrics",
    "dice",
    "evaluate_folder",
    "format_epsilon",
    "hd95",
    "iou",
    "normalized_surface_dice",
    "run_folder_name",
    "summarize_cross_validation",
    "surface_distances",
    "surface_mask",
    "write_summary",
]
