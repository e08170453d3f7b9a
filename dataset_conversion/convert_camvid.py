"""CamVid (SegNet's 11-class version) -> MSD task Task101_CamVid.

train/ + trainannot/ become imagesTr/ + labelsTr/; val/ + valannot/ become imagesTs/ and, so that the
validation images can be evaluated, labelsTs/ (same file names). Images are RGB -> 3 channels (a 4D NIfTI
with one z slice), spacing 1. Labels keep their values 0..11; 11 (void) is the `ignore_label` and no class is
background (`"background_label": null`). Each image is its own privacy unit (no `patient_id`): CamVid has only
a handful of video sequences, and grouping by sequence would leave too few units for DP-SGD.

Conversion is resumable (existing outputs are skipped) and every file is written atomically.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import numpy as np

from dataset_conversion.common import PngCase, convert_all, sorted_pngs, test_entries, training_entries
from dpunet import paths
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import write_json

# SegNet's class list; used when the source has no SOURCE.txt describing the labels
DEFAULT_CLASS_NAMES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
    "Bicyclist", "Unlabelled",
)
VOID_LABEL = 11


def class_names(source: Path) -> dict[int, str]:
    """Label names from `source/SOURCE.txt` ("Label values 0..11: 0 Sky, 1 Building, ..."), else SegNet's."""
    text_file = source / "SOURCE.txt"
    if text_file.is_file():
        text = text_file.read_text()
        start = text.find("Label values")
        if start >= 0:
            section = text[start:].split("\n\n", 1)[0]
            section = section.split(":", 1)[1] if ":" in section else section
            names = {}
            for part in section.replace("\n", " ").split(","):
                m = re.match(r"\s*(\d+)\s+([A-Za-z][\w-]*)", part)
                if m:
                    names[int(m.group(1))] = m.group(2)
            if sorted(names) == list(range(len(DEFAULT_CLASS_NAMES))):
                return names
    return dict(enumerate(DEFAULT_CLASS_NAMES))


def _check_labels(pixels: np.ndarray, png: Path) -> np.ndarray:
    if pixels.max(initial=0) > VOID_LABEL:
        bad = sorted(int(v) for v in np.unique(pixels[pixels > VOID_LABEL]))[:5]
        raise DpunetError(f"{png}: label values {bad} outside CamVid's 0..{VOID_LABEL}")
    return pixels.astype(np.uint8)


def _split(source: Path, images: str, labels: Optional[str], limit: Optional[int]) -> list[PngCase]:
    cases = []
    for png in sorted_pngs(source / images, limit):
        label = source / labels / png.name if labels else None
        if label is not None and not label.is_file():
            raise DpunetError(f"{label}: annotation for {png} not found")
        cases.append(PngCase(f"camvid_{png.stem}", png, label))
    return cases


def convert_camvid(source: Path, raw_root: Path, task_id: int = 101, limit: Optional[int] = None) -> Path:
    """Convert CamVid at `source` into `raw_root/Task<id>_CamVid` and return that folder.

    `limit` converts only the first `limit` images of each split (sorted by name), for tests.
    """
    source = Path(source)
    if not source.is_dir():
        raise DpunetError(f"{source}: CamVid folder not found")
    folder = Path(raw_root) / f"Task{task_id:03d}_CamVid"
    train = _split(source, "train", "trainannot", limit)
    val = _split(source, "val", "valannot", limit)
    convert_all(train, folder / "imagesTr", folder / "labelsTr", "RGB", _check_labels, "CamVid train")
    convert_all(val, folder / "imagesTs", folder / "labelsTs", "RGB", _check_labels, "CamVid val")
    names = class_names(source)
    dataset = {
        "name": "CamVid",
        "description": "CamVid street scenes, SegNet's 11 classes + void; val split as test set with labelsTs/",
        "reference": "Brostow et al., Pattern Recognition Letters 30(2), 2009; 11-class relabelling by SegNet",
        "licence": "research use only, non-commercial; do not redistribute",
        "tensorImageSize": "4D",
        "modality": {"0": "R", "1": "G", "2": "B"},
        "labels": {str(k): v for k, v in sorted(names.items())},
        "ignore_label": VOID_LABEL,
        "background_label": None,
        "numTraining": len(train),
        "numTest": len(val),
        "training": training_entries(train),
        "test": test_entries(val),
    }
    write_json(dataset, folder / "dataset.json")
    return folder


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Convert CamVid (SegNet 11-class layout) into an MSD task.")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="CamVid folder holding train/, trainannot/, val/, valannot/")
    p.add_argument("-o", "--output-root", type=Path, default=None, help="raw data root (default: $DPUNET_RAW)")
    p.add_argument("--task-id", type=int, default=101)
    p.add_argument("--limit", type=int, default=None, help="convert only the first N images of each split")
    args = p.parse_args(argv)
    folder = convert_camvid(args.input, args.output_root or paths.raw_root(), args.task_id, args.limit)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    main()
