"""ISBI 2012 EM membrane segmentation -> MSD task Task102_ISBI2012.

train/image/<i>.png + train/label/<i>.png become imagesTr/ + labelsTr/; test/<i>.png becomes imagesTs/ (its
labels were never published). Grayscale -> 1 channel, spacing 1. In the label PNGs 255 is cell interior and
0 membrane; dpunet's labels are 0 background (cell interior) and 1 membrane. Each section is its own privacy
unit (no `patient_id`). Resumable and atomic like the other converters.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np

from dataset_conversion.common import PngCase, convert_all, sorted_pngs, test_entries, training_entries
from dataset_conversion.convert_dataset import add_layout_argument, finish_layout
from dpunet import paths
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import write_json


def _numeric(png: Path) -> tuple[int, str]:
    # files are 0.png .. 29.png: sort 2 before 10
    return (int(png.stem), png.name) if png.stem.isdigit() else (10**9, png.name)


def _case_name(prefix: str, png: Path) -> str:
    return f"{prefix}_{int(png.stem):03d}" if png.stem.isdigit() else f"{prefix}_{png.stem}"


def membrane_labels(membrane_threshold: int = 128):
    """Label mapping: a pixel darker than the threshold is membrane (1), the rest background (0)."""

    def to_labels(pixels: np.ndarray, png: Path) -> np.ndarray:
        if pixels.dtype.kind not in "ub":
            raise DpunetError(f"{png}: expected an 8-bit label PNG, got {pixels.dtype}")
        return (pixels < membrane_threshold).astype(np.uint8)

    return to_labels


def convert_isbi2012(
    source: Path,
    raw_root: Path,
    task_id: int = 102,
    limit: Optional[int] = None,
    membrane_threshold: int = 128,
) -> Path:
    """Convert the ISBI 2012 data at `source` into `raw_root/Task<id>_ISBI2012` and return that folder.

    `limit` converts only the first `limit` images of each split (numeric order), for tests.
    """
    source = Path(source)
    if not source.is_dir():
        raise DpunetError(f"{source}: ISBI 2012 folder not found")
    folder = Path(raw_root) / f"Task{task_id:03d}_ISBI2012"
    train = []
    for png in sorted_pngs(source / "train" / "image", limit, key=_numeric):
        label = source / "train" / "label" / png.name
        if not label.is_file():
            raise DpunetError(f"{label}: label for {png} not found")
        train.append(PngCase(_case_name("isbi2012", png), png, label))
    test_pngs = sorted_pngs(source / "test", limit, key=_numeric)
    test = [PngCase(_case_name("isbi2012_test", png), png) for png in test_pngs]
    to_labels = membrane_labels(membrane_threshold)
    convert_all(train, folder / "imagesTr", folder / "labelsTr", "L", to_labels, "ISBI2012 train")
    convert_all(test, folder / "imagesTs", None, "L", to_labels, "ISBI2012 test")
    dataset = {
        "name": "ISBI2012",
        "description": "ISBI 2012 EM segmentation challenge (Drosophila VNC, serial-section TEM): membranes",
        "reference": "Cardona et al. 2010, PLoS Biol 8(10):e1000502; Arganda-Carreras et al. 2015, "
                     "Front. Neuroanat. 9:142",
        "licence": "free for research with citation",
        "tensorImageSize": "3D",
        "modality": {"0": "EM"},
        "labels": {"0": "background", "1": "membrane"},
        "numTraining": len(train),
        "numTest": len(test),
        "training": training_entries(train),
        "test": test_entries(test),
    }
    write_json(dataset, folder / "dataset.json")
    return folder


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Convert the ISBI 2012 membrane data into an MSD task.")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="folder holding train/image, train/label and test")
    p.add_argument("-o", "--output-root", type=Path, default=None, help="raw data root (default: $DPUNET_RAW)")
    p.add_argument("--task-id", type=int, default=102)
    p.add_argument("--limit", type=int, default=None, help="convert only the first N images of each split")
    p.add_argument("--membrane-threshold", type=int, default=128,
                   help="label PNG pixels below this value are membrane")
    add_layout_argument(p)
    args = p.parse_args(argv)
    folder = convert_isbi2012(args.input, args.output_root or paths.raw_root(), args.task_id, args.limit,
                              args.membrane_threshold)
    folder = finish_layout(folder, args.layout)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    main()
