"""Input cases of a prediction folder, their preprocessing, and the export of predictions.

Formats: NIfTI (.nii.gz, .nii), .mha, .nrrd, and 2D .png/.tif/.bmp (an RGB file is three channels); the
segmentation of a case is written in its input's format. Naming (both accepted, one per folder):
- MSD: one file per case, `<case>.nii.gz`; several channels are one 4D file (split by `read_image`);
- nnU-Net: one file per channel, `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... (stacked in that order).
A folder is read as nnU-Net style when every image name ends in `_XXXX` and each case's channel numbers run
0, 1, ... without gaps; otherwise every file is one MSD case. Hidden files (such as macOS `._*` copies in
the MSD archives) are skipped.

The functions here run in worker processes (no torch import): everything they return is picklable.

Every input file passes the integrity check of dpunet_verify_dataset (`check_test_image`: readable, complete,
finite, no dimension of size 0) before anything is written. While dpunet_predict writes an output folder, the
folder holds INCOMPLETE_MARKER; the privacy note is written last and the marker then removed, so a folder
with the marker (or without a privacy note) is not a finished prediction.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from dpunet.dataset.io import SEGMENTATION_SUFFIXES, Geometry, read_image, write_segmentation
from dpunet.dataset.verify import check_test_image
from dpunet.preprocessing.preprocessor import preprocess_array, restore_probabilities
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import save_npz, write_json, write_text

IMAGE_SUFFIXES = SEGMENTATION_SUFFIXES  # NIfTI, .mha, .nrrd and 2D .png/.tif/.bmp (an RGB file is 3 channels)
INCOMPLETE_MARKER = "PREDICTION_INCOMPLETE.txt"
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    case_id: str
    files: tuple[Path, ...]  # one MSD file, or the nnU-Net channel files in channel order


def _image_stem(path: Path) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def find_input_cases(folder: str | Path) -> list[InputCase]:
    """The cases of a prediction input folder, sorted by case id (see the module docstring for naming)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DpunetError(f"{folder}: input folder not found")
    images = {}
    for path in sorted(folder.iterdir()):
        stem = _image_stem(path)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        if stem in images:
            raise DpunetError(f"{folder}: {images[stem].name} and {path.name} are the same case")
        images[stem] = path
    if not images:
        raise DpunetError(f"{folder}: no images ({' or '.join(IMAGE_SUFFIXES)}) found")

    matches = {stem: _CHANNEL_RE.match(stem) for stem in images}
    if all(matches.values()):
        groups: dict[str, dict[int, Path]] = {}
        for stem, m in matches.items():
            groups.setdefault(m.group("case"), {})[int(m.group("channel"))] = images[stem]
        if all(sorted(g) == list(range(len(g))) for g in groups.values()):
            return [InputCase(case, tuple(g[c] for c in range(len(g)))) for case, g in sorted(groups.items())]
    return [InputCase(stem, (path,)) for stem, path in sorted(images.items())]


def channels_in_file(path: Path) -> int:
    """Number of channels `read_image` will return for a file, from its header alone."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DpunetError(f"{path}: cannot read image header ({last})") from None
    if reader.GetNumberOfComponents() > 1:
        return int(reader.GetNumberOfComponents())
    if reader.GetDimension() == 4:
        return int(reader.GetSize()[3])
    return 1


def check_input_channels(cases: Sequence[InputCase], num_channels: int) -> None:
    """Fail before predicting anything if a case has the wrong number of channels (the file is named)."""
    for case in cases:
        if len(case.files) > 1:
            if len(case.files) != num_channels:
                raise DpunetError(f"{case.files[0].parent}: case {case.case_id} has {len(case.files)} channel "
                                  f"files ({', '.join(f.name for f in case.files)}), the model expects "
                                  f"{num_channels}")
            for f in case.files:
                if channels_in_file(f) != 1:
                    raise DpunetError(f"{f}: a channel file (_XXXX naming) must hold one channel, it holds "
                                      f"{channels_in_file(f)}")
        else:
            found = channels_in_file(case.files[0])
            if found != num_channels:
                raise DpunetError(f"{case.files[0]}: image has {found} channel(s), the model expects {num_channels}")


def input_case_problems(case: InputCase, num_channels: int) -> list[str]:
    """The verification's problems of every file of a case (an nnU-Net channel file holds one channel)."""
    per_file = num_channels if len(case.files) == 1 else 1
    return [p for path in case.files for p in check_test_image(path, per_file)]


def mark_incomplete(output_folder: Path) -> Path:
    """Write the marker that says this folder is being written (removed by `mark_complete`)."""
    marker = output_folder / INCOMPLETE_MARKER
    write_text(f"dpunet_predict started writing this folder at {time.strftime('%Y-%m-%d %H:%M:%S')} (process "
               f"{os.getpid()}) and has not finished: the segmentations here may be fewer than the inputs and the "
               f"privacy note is missing. Rerun dpunet_predict into this folder; it removes this file when done.\n",
               marker)
    return marker


def mark_complete(output_folder: Path) -> None:
    (output_folder / INCOMPLETE_MARKER).unlink(missing_ok=True)


def load_input_case(case: InputCase) -> tuple[np.ndarray, Geometry]:
    """(c, z, y, x) float32 image and its geometry; channel files must share one geometry."""
    data, geometry = read_image(case.files[0])
    if len(case.files) == 1:
        return data, geometry
    channels = [data]
    for path in case.files[1:]:
        more, other = read_image(path)
        diffs = geometry.matches(other)
        if diffs:
            raise DpunetError(f"{path}: geometry differs from {case.files[0].name} ({'; '.join(diffs)})")
        channels.append(more)
    return np.concatenate(channels, 0), geometry


def preprocess_input_case(case: InputCase, plan_configuration: dict[str, Any], num_channels: int
                          ) -> tuple[np.ndarray, dict[str, Any]]:
    """Read and preprocess one case exactly as the training data were (`preprocess_array`)."""
    data, geometry = load_input_case(case)
    if data.shape[0] != num_channels:
        raise DpunetError(f"{case.files[0]}: image has {data.shape[0]} channel(s), the model expects {num_channels}")
    data, _, properties = preprocess_array(data, geometry, plan_configuration)
    properties["case_id"] = case.case_id
    properties["input_files"] = [str(f) for f in case.files]
    # the segmentation is written in the input's format (<case>.png for PNG inputs, as nnU-Net v2 does)
    properties["output_suffix"] = next((x for x in IMAGE_SUFFIXES if case.files[0].name.endswith(x)), ".nii.gz")
    return data.astype(np.float32, copy=False), properties


def export_prediction(probabilities: np.ndarray, properties: dict[str, Any], plan_configuration: dict[str, Any],
                      output_folder: str | Path, save_probabilities: bool = False,
                      metadata: dict[str, Any] | None = None) -> list[Path]:
    """Undo the preprocessing on the softmax, take the argmax (class index = label value) and write
    `<case>.nii.gz` in the input's geometry; optionally `<case>.npz` (float16 "probabilities", classes first,
    original grid) and `<case>.json`. Every file is written atomically; the segmentation last."""
    output_folder = Path(output_folder)
    case_id = properties["case_id"]
    geometry = Geometry.from_dict(properties["original_geometry"])
    restored = restore_probabilities(probabilities, properties, plan_configuration)
    segmentation = restored.argmax(0)
    written = []
    if save_probabilities:
        npz, info = output_folder / f"{case_id}.npz", output_folder / f"{case_id}.json"
        save_npz(npz, probabilities=restored.astype(np.float16))
        write_json({
            "case_id": case_id,
            "array": "probabilities (classes, z, y, x), SimpleITK numpy axis order, float16",
            "class_to_label": {str(c): c for c in range(restored.shape[0])},
            "geometry": geometry.to_dict(),
            "input_files": properties.get("input_files", []),
            **(metadata or {}),
        }, info)
        written += [npz, info]
    seg_path = output_folder / f"{case_id}{properties.get('output_suffix', '.nii.gz')}"
    write_segmentation(segmentation, geometry, seg_path)
    written.append(seg_path)
    return written
