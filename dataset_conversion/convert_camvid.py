"""CamVid (SegNet's 11-class version) -> MSD task Task101_CamVid.

train/ + trainannot/ become imagesTr/ + labelsTr/; val/ + valannot/ become imagesTs/ and, so that the
validation images can be evaluated, labelsTs/ (same file names). Images are RGB -> 3 channels (a 4D NIfTI
with one z slice), spacing 1. Labels keep their values 0..11; 11 (void) is the `ignore_label` and no class is
background (`"background_label": null`). Each image is its own privacy unit (no `patient_id`): CamVid has only
a handful of video sequences, and grouping by sequence would leave too few units for DP-SGD.

`--downsample 2|4` averages each f x f block of pixels (images) and takes the most frequent label of the block
(labels; void wins only where it is the majority), so that CamVid fits a CPU study (360 x 480 -> 90 x 120 at 4);
the spacing becomes f and dataset.json records the factor. Convert each resolution into its own task id.

Conversion is resumable (existing outputs are skipped) and every file is written atomically.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import numpy as np

from dataset_conversion.common import (PngCase, convert_all, png_size, read_png, sorted_pngs, test_entries,
                                       training_entries)
from dataset_conversion.convert_dataset import add_layout_argument, finish_layout
from dpunet import paths
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import write_json

# SegNet's class list; used when the source has no SOURCE.txt describing the labels
DEFAULT_CLASS_NAMES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
    "Bicyclist", "Unlabelled",
)
VOID_LABEL = 11
DOWNSAMPLE_FACTORS = (1, 2, 4)


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


def downsample_image(pixels: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, C) or (H, W) pixels -> the mean of each factor x factor block (rounded, same dtype); H and W are
    cropped to multiples of the factor."""
    h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:h, :w].reshape(h // factor, factor, w // factor, factor, *pixels.shape[2:])
    return np.rint(blocks.astype(np.float64).mean(axis=(1, 3))).astype(pixels.dtype)


def downsample_labels(labels: np.ndarray, factor: int, num_values: int = VOID_LABEL + 1) -> np.ndarray:
    """(H, W) labels -> the most frequent value of each factor x factor block (ties: the smaller value)."""
    h, w = (labels.shape[0] // factor) * factor, (labels.shape[1] // factor) * factor
    blocks = labels[:h, :w].reshape(h // factor, factor, w // factor, factor)
    counts = np.stack([(blocks == v).sum(axis=(1, 3)) for v in range(num_values)])
    return counts.argmax(axis=0).astype(np.uint8)


def _convert_downsampled(cases: list[PngCase], image_dir: Path, label_dir: Path, factor: int) -> None:
    from dpunet.dataset.io import Geometry, write_image, write_segmentation

    for case in cases:
        height, width = png_size(case.image)
        geometry = Geometry(shape=(1, height // factor, width // factor), spacing=(1.0, float(factor), float(factor)),
                            origin=(0.0, 0.0, 0.0), direction=tuple(float(v) for v in np.eye(3).ravel()))
        image_out = image_dir / f"{case.case_id}.nii.gz"
        if not image_out.exists():
            pixels = downsample_image(read_png(case.image, "RGB"), factor)
            write_image(np.moveaxis(pixels, -1, 0)[:, None], geometry, image_out)
        label_out = label_dir / f"{case.case_id}.nii.gz"
        if case.label is not None and not label_out.exists():
            raw = read_png(case.label)
            if raw.shape != (height, width):
                raise DpunetError(f"{case.label}: annotation size {raw.shape} differs from image {case.image} "
                                  f"({height}, {width})")
            write_segmentation(downsample_labels(_check_labels(raw, case.label), factor)[None], geometry, label_out)


def _check_resolution(folder: Path, downsample: int) -> None:
    """Refuse to mix resolutions in one task folder (conversion is resumable and skips existing files)."""
    dataset_file = folder / "dataset.json"
    if dataset_file.is_file():
        import json

        previous = json.loads(dataset_file.read_text()).get("downsample", 1)
        if previous != downsample:
            raise DpunetError(f"{folder} holds CamVid at --downsample {previous}; convert --downsample {downsample} "
                              f"into another task id (--task-id)")


def convert_camvid(source: Path, raw_root: Path, task_id: int = 101, limit: Optional[int] = None,
                   downsample: int = 1) -> Path:
    """Convert CamVid at `source` into `raw_root/Task<id>_CamVid` and return that folder.

    `limit` converts only the first `limit` images of each split (sorted by name), for tests. `downsample`
    (1, 2 or 4): block-mean images and block-majority labels at that factor, spacing `downsample`.
    """
    source = Path(source)
    if not source.is_dir():
        raise DpunetError(f"{source}: CamVid folder not found")
    if downsample not in DOWNSAMPLE_FACTORS:
        raise DpunetError(f"--downsample must be one of {DOWNSAMPLE_FACTORS}, got {downsample}")
    folder = Path(raw_root) / f"Task{task_id:03d}_CamVid"
    _check_resolution(folder, downsample)
    train = _split(source, "train", "trainannot", limit)
    val = _split(source, "val", "valannot", limit)
    if downsample == 1:
        convert_all(train, folder / "imagesTr", folder / "labelsTr", "RGB", _check_labels, "CamVid train")
        convert_all(val, folder / "imagesTs", folder / "labelsTs", "RGB", _check_labels, "CamVid val")
    else:
        _convert_downsampled(train, folder / "imagesTr", folder / "labelsTr", downsample)
        _convert_downsampled(val, folder / "imagesTs", folder / "labelsTs", downsample)
    names = class_names(source)
    resolution = "full resolution" if downsample == 1 else f"downsampled {downsample}x (block mean / block majority)"
    dataset = {
        "name": "CamVid",
        "description": "CamVid street scenes, SegNet's 11 classes + void; val split as test set with labelsTs/; "
                       f"{resolution}",
        "downsample": downsample,
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
    p.add_argument("--downsample", type=int, default=1, choices=DOWNSAMPLE_FACTORS,
                   help="resolution factor: 2 or 4 average each 2x2 or 4x4 block (labels: the block's most frequent "
                        "value), for CPU studies; recorded in dataset.json (default 1: full resolution)")
    add_layout_argument(p)
    args = p.parse_args(argv)
    folder = convert_camvid(args.input, args.output_root or paths.raw_root(), args.task_id, args.limit,
                            args.downsample)
    folder = finish_layout(folder, args.layout)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    main()
