"""Measure largest-connected-component (LCC) post-processing on finished runs' validation predictions.

For every run folder under RESULTS_TASK_DIR whose name matches --match, keeps only the largest connected component
of each foreground class in fold_<F>/private/validation/*.nii.gz and prints the mean foreground Dice against the
raw labels before and after. A measurement, not a pipeline stage: it reads private validation labels.

    python scripts/measure_lcc_postprocessing.py $DPUNET_RESULTS/Task04_Hippocampus \
        shared/data/Task04_Hippocampus/labelsTr --match 'h7517a499|hef44ecef' --out lcc.json
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dpunet.evaluation.metrics import dice


def largest_component_per_class(seg: np.ndarray) -> np.ndarray:
    """Each foreground class reduced to its largest (face-connected) component."""
    out = np.zeros_like(seg)
    for c in np.unique(seg):
        if c == 0:
            continue
        components, n = ndimage.label(seg == c)
        if n:
            sizes = np.bincount(components.ravel())[1:]
            out[components == 1 + int(np.argmax(sizes))] = c
    return out


def mean_foreground_dice(ref: np.ndarray, pred: np.ndarray, classes: list[int]) -> float:
    return float(np.mean([dice(ref == c, pred == c, empty_both="one") for c in classes]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_task_dir", type=Path)
    ap.add_argument("labels_dir", type=Path)
    ap.add_argument("--match", default=".", help="regular expression on run folder names")
    ap.add_argument("--fold", default="0")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for run in sorted(args.results_task_dir.iterdir()):
        folder = run / f"fold_{args.fold}" / "private" / "validation"
        if not re.search(args.match, run.name) or not folder.is_dir():
            continue
        before, after = [], []
        for path in sorted(folder.glob("*.nii.gz")):
            pred = np.asarray(nib.load(path).dataobj).astype(np.int16)
            ref = np.asarray(nib.load(args.labels_dir / path.name).dataobj).astype(np.int16)
            classes = [int(c) for c in np.union1d(np.unique(ref), np.unique(pred)) if c != 0]
            before.append(mean_foreground_dice(ref, pred, classes))
            after.append(mean_foreground_dice(ref, largest_component_per_class(pred), classes))
        if before:
            rows.append({"run": run.name, "cases": len(before), "dice": float(np.mean(before)),
                         "dice_lcc": float(np.mean(after))})
            print(f"{run.name:60s} {len(before):3d} {np.mean(before):.3f} -> {np.mean(after):.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
