"""The task description (dataset.json): channels, labels, training cases and patients.

nnU-Net v2 datasets (DatasetXXX_Name, `channel_names`) are read by dpunet.dataset.nnunet_v2 into the same TaskInfo.

dpunet reads the MSD schema and a few optional extensions, all documented in documentation/dataset_format.md:
- `"ignore_label": k` marks a label value excluded from losses and metrics (e.g. CamVid's void);
- `"background_label": null` says no label is background (natural images), default 0;
- a training entry may carry `"patient_id"`: cases sharing it form one privacy unit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpunet.dataset.nnunet_v2 import is_v2_description, load_v2_description
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import read_json_file


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path | tuple[Path, ...]  # one file (MSD: channels in a 4D file), or nnU-Net v2's channel files
    label: Optional[Path]
    patient_id: str

    @property
    def image_files(self) -> tuple[Path, ...]:
        return self.image if isinstance(self.image, tuple) else (self.image,)


@dataclass
class TaskInfo:
    name: str
    folder: Path
    channel_names: dict[int, str]
    labels: dict[int, str]
    ignore_label: Optional[int]
    background_label: Optional[int]
    training: list[Case] = field(default_factory=list)
    test: list[Path | tuple[Path, ...]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    layout: str = "msd"  # or "nnunet_v2"

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels)

    @property
    def num_classes(self) -> int:
        """Output channels of a network: every label value but the ignore label."""
        return len([v for v in self.labels if v != self.ignore_label])

    @property
    def foreground_labels(self) -> list[int]:
        """Labels that are evaluated and oversampled: all but background and ignore."""
        return [v for v in self.label_values if v not in (self.background_label, self.ignore_label)]

    @property
    def patients(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for c in self.training:
            groups.setdefault(c.patient_id, []).append(c.case_id)
        return groups


def case_id_from_path(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _resolve(folder: Path, rel: str) -> Path:
    return (folder / rel).resolve() if not Path(rel).is_absolute() else Path(rel)


def load_task(folder: str | Path) -> TaskInfo:
    """Parse `folder/dataset.json` (MSD layout, or nnU-Net v2: dpunet.dataset.nnunet_v2); paths are resolved,
    label keys become ints."""
    folder = Path(folder)
    path = folder / "dataset.json"
    d = read_json_file(path, "dataset.json")
    if is_v2_description(d):
        return _load_v2_task(folder, d)
    for key in ("modality", "labels", "training"):
        if key not in d:
            raise DpunetError(f"{path}: required key '{key}' is missing")
    try:
        labels = {int(k): str(v) for k, v in d["labels"].items()}
        channels = {int(k): str(v) for k, v in d["modality"].items()}
    except ValueError:
        raise DpunetError(f"{path}: keys of 'labels' and 'modality' must be integers") from None
    if sorted(channels) != list(range(len(channels))):
        raise DpunetError(f"{path}: modality keys must be 0..n-1, got {sorted(channels)}")
    ignore = d.get("ignore_label")
    for key in ("ignore_label", "background_label"):
        value = d.get(key)
        if value is not None and (isinstance(value, (bool, float)) or not str(value).strip().isdigit()):
            raise DpunetError(f"{path}: '{key}' must be an integer label value or null, got {value!r}")
    if ignore is not None and int(ignore) not in labels:
        raise DpunetError(f"{path}: ignore_label {ignore} is not one of the labels {sorted(labels)}")
    background = d.get("background_label", 0 if 0 in labels else None)
    training = []
    for i, entry in enumerate(d["training"]):
        if "image" not in entry:
            raise DpunetError(f"{path}: training entry {i} has no 'image'")
        image = _resolve(folder, entry["image"])
        case_id = case_id_from_path(image)
        label = _resolve(folder, entry["label"]) if entry.get("label") else None
        training.append(Case(case_id, image, label, str(entry.get("patient_id", case_id))))
    ids = [c.case_id for c in training]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DpunetError(f"{path}: duplicate training case ids {dup[:5]}")
    test = [_resolve(folder, t if isinstance(t, str) else t["image"]) for t in d.get("test", [])]
    return TaskInfo(
        name=folder.name,
        folder=folder,
        channel_names=channels,
        labels=labels,
        ignore_label=None if ignore is None else int(ignore),
        background_label=None if background is None else int(background),
        training=training,
        test=test,
        raw=d,
    )


def _load_v2_task(folder: Path, d: dict[str, Any]) -> TaskInfo:
    v2 = load_v2_description(folder, d)
    training = [Case(c["case_id"], c["image"], c["label"], str(c["patient_id"])) for c in v2["training"]]
    return TaskInfo(name=folder.name, folder=folder, channel_names=v2["channels"], labels=v2["labels"],
                    ignore_label=v2["ignore"], background_label=v2["background"], training=training,
                    test=v2["test"], raw=d, layout="nnunet_v2")
