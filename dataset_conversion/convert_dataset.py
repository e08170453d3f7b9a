"""dpunet_convert_dataset -i SOURCE_FOLDER -o OUTPUT_ROOT [--to v2|msd] [--id N] [--name NAME]

Converts a raw dataset between the MSD layout (TaskXX_Name: dataset.json with `modality` and a `training` list,
one file per case, several channels in one 4D NIfTI) and the nnU-Net v2 layout (DatasetXXX_Name: dataset.json
with `channel_names`, `labels` as name -> value, `file_ending`; one file per channel, `<case>_0000.nii.gz`).
--to defaults to the other layout. Single-channel NIfTI images and NIfTI label maps are copied byte for byte
(so both layouts plan identically); multi-channel images are split or joined. The patient grouping travels:
MSD `patient_id` entries <-> the v2 folder's patients.json (documentation/dataset_format.md). An MSD
`ignore_label` becomes v2's label named "ignore", and back. dataset.json is written last.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from dpunet.dataset.io import read_image, read_label, write_image, write_segmentation
from dpunet.dataset.msd import TaskInfo, case_id_from_path, load_task
from dpunet.dataset.nnunet_v2 import IGNORE_NAME, PATIENTS_FILE
from dpunet.paths import task_name_from_folder
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import atomic_write_with, check_output_folder, write_json

NIFTI = ".nii.gz"


def _copy(src: Path, dst: Path) -> None:
    atomic_write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def _write_channels(image: Path | tuple[Path, ...], folder: Path, case_id: str) -> None:
    """nnU-Net v2 channel files `<case>_XXXX.nii.gz`; one NIfTI channel is copied as it is."""
    files = image if isinstance(image, tuple) else (image,)
    if len(files) == 1 and files[0].name.endswith(NIFTI):
        data, _ = read_image(files[0])
        if data.shape[0] == 1:
            _copy(files[0], folder / f"{case_id}_0000{NIFTI}")
            return
    data, geometry = read_image(image)
    for c in range(data.shape[0]):
        write_image(data[c], geometry, folder / f"{case_id}_{c:04d}{NIFTI}")


def _write_msd_image(image: Path | tuple[Path, ...], path: Path) -> None:
    """One MSD file per case: a single NIfTI is copied, anything else is read and written as (4D) NIfTI."""
    if not isinstance(image, tuple) and image.name.endswith(NIFTI):
        _copy(image, path)
        return
    data, geometry = read_image(image)
    write_image(data, geometry, path)


def _write_label(label: Path, path: Path) -> None:
    if label.name.endswith(NIFTI):
        _copy(label, path)
    else:
        seg, geometry = read_label(label)
        write_segmentation(seg, geometry, path)


def _common_fields(task: TaskInfo) -> dict[str, Any]:
    return {k: task.raw[k] for k in ("name", "description", "reference", "licence", "release", "tensorImageSize")
            if k in task.raw}


def _test_case_id(task: TaskInfo, image: Path | tuple[Path, ...]) -> str:
    name = case_id_from_path(image[0] if isinstance(image, tuple) else image)
    return name[: -len("_0000")] if task.layout == "nnunet_v2" else name  # v2: drop the channel number


def to_v2(task: TaskInfo, out_root: Path, dataset_id: int, name: str) -> Path:
    folder = out_root / f"Dataset{dataset_id:03d}_{name}"
    labels = {(IGNORE_NAME if v == task.ignore_label else n): v for v, n in sorted(task.labels.items())}
    if len(labels) != len(task.labels):
        raise DpunetError(f"{task.folder}: a label other than the ignore label is named '{IGNORE_NAME}'")
    for case in task.training:
        _write_channels(case.image, folder / "imagesTr", case.case_id)
        if case.label is not None:
            _write_label(case.label, folder / "labelsTr" / f"{case.case_id}{NIFTI}")
    for image in task.test:
        _write_channels(image, folder / "imagesTs", _test_case_id(task, image))
    patients = {c.case_id: c.patient_id for c in task.training if c.patient_id != c.case_id}
    if patients:
        write_json(patients, folder / PATIENTS_FILE)
    description = {**_common_fields(task), "channel_names": {str(k): v for k, v in task.channel_names.items()},
                   "labels": labels, "numTraining": len(task.training), "file_ending": NIFTI}
    if task.background_label != (0 if 0 in task.labels else None):
        description["background_label"] = task.background_label  # dpunet's extension (e.g. natural images)
    write_json(description, folder / "dataset.json")
    return folder


def to_msd(task: TaskInfo, out_root: Path, task_id: int, name: str) -> Path:
    folder = out_root / f"Task{task_id:02d}_{name}"
    training = []
    for case in task.training:
        entry = {"image": f"./imagesTr/{case.case_id}{NIFTI}"}
        _write_msd_image(case.image, folder / entry["image"])
        if case.label is not None:
            entry["label"] = f"./labelsTr/{case.case_id}{NIFTI}"
            _write_label(case.label, folder / entry["label"])
        if case.patient_id != case.case_id:
            entry["patient_id"] = case.patient_id
        training.append(entry)
    test = []
    for image in task.test:
        rel = f"./imagesTs/{_test_case_id(task, image)}{NIFTI}"
        _write_msd_image(image, folder / rel)
        test.append(rel)
    description = {**_common_fields(task), "modality": {str(k): v for k, v in task.channel_names.items()},
                   "labels": {str(v): n for v, n in sorted(task.labels.items())},
                   "numTraining": len(training), "numTest": len(test), "training": training, "test": test}
    if task.ignore_label is not None:
        description["ignore_label"] = task.ignore_label
    if task.background_label != (0 if 0 in task.labels else None):
        description["background_label"] = task.background_label
    write_json(description, folder / "dataset.json")
    return folder


def convert_dataset(source: str | Path, out_root: str | Path, to: str | None = None, dataset_id: int | None = None,
                    name: str | None = None) -> Path:
    """Convert the dataset folder `source` into `out_root` (layout `to`: "v2" or "msd", default the other one);
    returns the new dataset folder."""
    source, out_root = Path(source), Path(out_root)
    task = load_task(source)
    to = to or ("msd" if task.layout == "nnunet_v2" else "v2")
    if to not in ("v2", "msd"):
        raise DpunetError(f"--to must be v2 or msd, got {to!r}")
    try:
        number, folder_name = task_name_from_folder(source.name)
    except DpunetError:
        number, folder_name = None, source.name
    dataset_id = number if dataset_id is None else dataset_id
    if dataset_id is None:
        raise DpunetError(f"{source}: the folder name carries no id (TaskXX_Name / DatasetXXX_Name): give --id")
    name = name or folder_name
    target = out_root / (f"Dataset{dataset_id:03d}_{name}" if to == "v2" else f"Task{dataset_id:02d}_{name}")
    if target.resolve() == source.resolve():
        raise DpunetError(f"{target}: the output would overwrite the source dataset")
    check_output_folder(out_root)
    return (to_v2 if to == "v2" else to_msd)(task, out_root, dataset_id, name)


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """--layout for the converters that write MSD first (CamVid, ISBI 2012)."""
    parser.add_argument("--layout", choices=["msd", "v2"], default="msd",
                        help="write the MSD layout (TaskXXX_Name, default) or nnU-Net v2's (DatasetXXX_Name)")


def finish_layout(msd_folder: Path, layout: str) -> Path:
    """The converter's MSD folder, or (layout v2) its nnU-Net v2 conversion beside it, the MSD copy removed so
    that the id names one dataset."""
    if layout == "msd":
        return msd_folder
    folder = convert_dataset(msd_folder, msd_folder.parent, "v2")
    shutil.rmtree(msd_folder)
    return folder


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dpunet_convert_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, type=Path, help="dataset folder (TaskXX_Name or DatasetXXX_Name)")
    p.add_argument("-o", "--output", required=True, type=Path, help="root folder for the converted dataset")
    p.add_argument("--to", choices=["v2", "msd"], default=None, help="target layout (default: the other one)")
    p.add_argument("--id", type=int, default=None, help="dataset id of the output (default: the source's)")
    p.add_argument("--name", default=None, help="name part of the output folder (default: the source's)")
    args = p.parse_args(argv)
    folder = convert_dataset(args.input, args.output, args.to, args.id, args.name)
    print(f"converted {args.input} -> {folder}")
    return 0


if __name__ == "__main__":
    main()

