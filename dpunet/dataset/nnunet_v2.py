"""nnU-Net v2 raw datasets, read as they are: `DatasetXXX_Name/` with

    dataset.json   {"channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": 1, "ignore": 2},
                    "numTraining": 32, "file_ending": ".nii.gz"}
    imagesTr/<case>_0000<file_ending>, <case>_0001..., labelsTr/<case><file_ending>, imagesTs/<case>_0000...

- `labels` maps names to values; a label named "ignore" is dpunet's ignore label (excluded from losses and
  metrics; v2 requires it to be the largest value, as dpunet does). Region-based definitions (a list of values
  per name, with `regions_class_order`) are refused: dpunet trains one softmax over classes.
- `file_ending`: .nii.gz, .nii, .mha, .nrrd (SimpleITK), or the 2D natural-image formats .png, .tif/.tiff,
  .bmp (spacing 1; an RGB file is three channels, so one `_0000` file serves three channel names).
- nnU-Net v2 has no patient grouping: every case is its own privacy unit unless the dataset folder holds
  PATIENTS_FILE, a JSON object {"<case id>": "<patient id>", ...} (cases sharing a patient id form one unit;
  cases it does not list stay their own). documentation/dataset_format.md describes both layouts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dpunet.utils.errors import DpunetError
from dpunet.utils.files import read_json_file

PATIENTS_FILE = "patients.json"
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
VOLUME_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
NATURAL_IMAGE_ENDINGS = (".png", ".tif", ".tiff", ".bmp")
FILE_ENDINGS = VOLUME_ENDINGS + NATURAL_IMAGE_ENDINGS
IGNORE_NAME = "ignore"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def is_v2_description(description: dict[str, Any]) -> bool:
    """An nnU-Net v2 dataset.json names its channels `channel_names` (MSD and v1: `modality`)."""
    return isinstance(description, dict) and "channel_names" in description and "modality" not in description


def parse_v2_labels(labels: Any, path: Path) -> tuple[dict[int, str], int | None]:
    """({value: name}, ignore value) from v2's {name: value}; region-based labels are refused."""
    if not isinstance(labels, dict) or not labels:
        raise DpunetError(f"{path}: 'labels' must be a non-empty object of name -> value")
    values: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DpunetError(f"{path}: label '{name}' is region-based ({list(value)}); dpunet trains one softmax "
                              f"over classes and does not support nnU-Net's region-based training: give each "
                              f"class its own integer value")
        if isinstance(value, bool) or not isinstance(value, int) and not str(value).strip().isdigit():
            raise DpunetError(f"{path}: label '{name}' must have an integer value, got {value!r}")
        if int(value) in values:
            raise DpunetError(f"{path}: labels '{values[int(value)]}' and '{name}' share the value {value}")
        values[int(value)] = str(name)
    ignore = [v for v, n in values.items() if n == IGNORE_NAME]
    return values, (ignore[0] if ignore else None)


def _case_files(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """{case id: {channel: file}} of `<case>_XXXX<ending>` files in `folder` (hidden files skipped)."""
    cases: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return cases
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending) or not path.is_file():
            continue
        m = _CHANNEL_FILE.match(path.name[: -len(ending)])
        if m is None:
            raise DpunetError(f"{path}: an nnU-Net v2 image must be named <case>_XXXX{ending} (channel XXXX)")
        cases.setdefault(m.group("case"), {})[int(m.group("channel"))] = path
    return cases


def _channel_tuple(case: str, channels: dict[int, Path], num_channels: int, ending: str, folder: Path
                   ) -> Path | tuple[Path, ...]:
    one_file_holds_all = ending in NATURAL_IMAGE_ENDINGS and sorted(channels) == [0]  # e.g. RGB in one PNG
    if sorted(channels) != list(range(num_channels)) and not one_file_holds_all:
        raise DpunetError(f"{folder}: case {case} has channel files {sorted(channels)}, dataset.json declares "
                          f"{num_channels} channel(s) (_0000 to _{num_channels - 1:04d})")
    files = tuple(channels[c] for c in sorted(channels))
    return files[0] if len(files) == 1 else files  # one file: the same Case as an MSD task's


def read_patients(folder: Path) -> dict[str, str]:
    """The optional case -> patient mapping of a v2 dataset (PATIENTS_FILE), empty when there is none."""
    path = folder / PATIENTS_FILE
    if not path.is_file():
        return {}
    mapping = read_json_file(path, PATIENTS_FILE)
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, int)) for v in mapping.values()):
        raise DpunetError(f"{path}: must be a JSON object {{\"<case id>\": \"<patient id>\", ...}}")
    return {str(k): str(v) for k, v in mapping.items()}


def load_v2_description(folder: Path, d: dict[str, Any]) -> dict[str, Any]:
    """The parts of a v2 dataset.json and folder that dpunet.dataset.msd.load_task builds its TaskInfo from:
    channels, labels, ignore label, training cases (case id, channel files, label, patient) and test cases."""
    path = folder / "dataset.json"
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise DpunetError(f"{path}: nnU-Net v2 key(s) {missing} missing")
    ending = str(d["file_ending"])
    if ending not in FILE_ENDINGS:
        raise DpunetError(f"{path}: file_ending {ending!r} is not supported (one of {', '.join(FILE_ENDINGS)})")
    if "regions_class_order" in d:
        raise DpunetError(f"{path}: region-based labels (regions_class_order) are not supported by dpunet")
    try:
        channels = {int(k): str(v) for k, v in d["channel_names"].items()}
    except (AttributeError, ValueError):
        raise DpunetError(f"{path}: 'channel_names' must map channel numbers to names") from None
    if sorted(channels) != list(range(len(channels))):
        raise DpunetError(f"{path}: channel_names keys must be 0..n-1, got {sorted(channels)}")
    labels, ignore = parse_v2_labels(d["labels"], path)
    patients = read_patients(folder)
    training = []
    for case, files in sorted(_case_files(folder / "imagesTr", ending).items()):
        label = folder / "labelsTr" / f"{case}{ending}"
        training.append({"case_id": case, "image": _channel_tuple(case, files, len(channels), ending,
                                                                   folder / "imagesTr"),
                         "label": label if label.is_file() else None, "patient_id": patients.get(case, case)})
    unknown = sorted(set(patients) - {c["case_id"] for c in training})
    if unknown:
        raise DpunetError(f"{folder / PATIENTS_FILE}: case(s) {unknown[:5]} are not in imagesTr")
    if int(d["numTraining"]) != len(training):
        raise DpunetError(f"{path}: numTraining is {d['numTraining']} but imagesTr holds {len(training)} case(s) "
                          f"named <case>_XXXX{ending}")
    test = [_channel_tuple(case, files, len(channels), ending, folder / "imagesTs")
            for case, files in sorted(_case_files(folder / "imagesTs", ending).items())]
    # dpunet's extension, as in MSD: "background_label": null for natural images without a background class
    background = d.get("background_label", 0 if 0 in labels else None)
    return {"channels": channels, "labels": labels, "ignore": ignore, "background": background,
            "training": training, "test": test, "file_ending": ending}
