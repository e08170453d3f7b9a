"""nnU-Net v2 raw datasets read as they are (DatasetXXX_Name, channel files, labels name -> value, file_ending),
the converter between the MSD and v2 layouts, and a 2D PNG dataset from planning to PNG predictions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dpunet
from dataset_conversion.convert_dataset import convert_dataset
from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.dataset.io import read_image
from dpunet.dataset.msd import load_task
from dpunet.utils.errors import DpunetError
from tests.conftest import shared_path

pytestmark = pytest.mark.usefixtures("single_thread")


def _roots(base: Path, monkeypatch) -> dict[str, Path]:
    roots = {k: base / k for k in ("raw", "preprocessed", "results")}
    for k, v in roots.items():
        monkeypatch.setenv(f"DPUNET_{k.upper()}", str(v))
    return roots


def _without_name(plans: dict) -> dict:
    return {k: v for k, v in plans.items() if k != "dataset_name"}


def _plans_of_both_layouts(msd_root: Path, task_id: int, base: Path, monkeypatch
                           ) -> tuple[dict, dict, Path, list, list]:
    """(MSD plans, v2 plans, v2 folder, MSD splits, v2 splits): the MSD task under msd_root and its v2 conversion
    (in a raw root of its own, as an nnUNet_raw folder would be), each planned by id with -t / -d."""
    from dpunet.pipeline import cli

    msd_folder = next(msd_root.glob(f"Task{task_id:02d}_*"))
    v2_raw = base / "v2" / "raw"
    v2_folder = convert_dataset(msd_folder, v2_raw)
    assert v2_folder.name == f"Dataset{task_id:03d}_{msd_folder.name.split('_', 1)[1]}"
    plans = []
    for raw, flag in ((msd_root, "-t"), (v2_raw, "-d")):
        roots = _roots(raw.parent, monkeypatch)
        with pytest.raises(SystemExit) as done:
            cli.main([flag, str(task_id), "-np", "1", "--no-preprocess", "--width", "0.25"])
        assert done.value.code == 0
        name = (msd_folder if flag == "-t" else v2_folder).name
        plans.append(json.loads((roots["preprocessed"] / name / "dpunet_plans.json").read_text()))
        plans.append(json.loads((roots["preprocessed"] / name / "splits_final.json").read_text()))
    return plans[0], plans[2], v2_folder, plans[1], plans[3]


def test_synthetic_task_converted_to_v2_plans_exactly_as_from_msd(tmp_path, monkeypatch):
    generate_synthetic_task(tmp_path / "msd" / "raw", num_cases=12, cases_per_patient=2, base_shape=(8, 24, 24),
                            spacing=(2.0, 1.0, 1.0), num_test=1, seed=3)
    msd_plans, v2_plans, v2_folder, msd_splits, v2_splits = _plans_of_both_layouts(
        tmp_path / "msd" / "raw", 990, tmp_path, monkeypatch)
    assert msd_plans["dataset_name"] == "Task990_Synthetic3D" and v2_plans["dataset_name"] == v2_folder.name
    assert _without_name(msd_plans) == _without_name(v2_plans)
    assert msd_splits == v2_splits  # the patients travelled through patients.json
    assert json.loads((v2_folder / "patients.json").read_text())["synthetic3d_001"] == "patient_000"
    # the v2 folder as nnU-Net v2 lays it out
    description = json.loads((v2_folder / "dataset.json").read_text())
    assert description["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert description["channel_names"] == {"0": "synthetic0"} and description["file_ending"] == ".nii.gz"
    assert (v2_folder / "imagesTr" / "synthetic3d_000_0000.nii.gz").is_file()
    assert (v2_folder / "imagesTs" / "synthetic3d_012_0000.nii.gz").is_file()


@pytest.mark.shared
def test_hippocampus_cases_converted_to_v2_plan_exactly_as_from_msd(tmp_path, monkeypatch):
    source = shared_path("data", "Task04_Hippocampus")
    raw = tmp_path / "msd" / "raw" / "Task04_Hippocampus"
    description = json.loads((source / "dataset.json").read_text())
    training = description["training"][:8]
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    for entry in training:
        for key in ("image", "label"):
            shutil.copyfile(source / entry[key], raw / entry[key])
    description.update(training=training, numTraining=len(training), test=[], numTest=0)
    (raw / "dataset.json").write_text(json.dumps(description))
    msd_plans, v2_plans, v2_folder, msd_splits, v2_splits = _plans_of_both_layouts(
        tmp_path / "msd" / "raw", 4, tmp_path, monkeypatch)
    assert v2_folder.name == "Dataset004_Hippocampus"
    assert set(msd_plans["configurations"]) >= {"2d", "3d_fullres"}
    assert _without_name(msd_plans) == _without_name(v2_plans) and msd_splits == v2_splits


def test_multichannel_v2_channel_files_are_stacked_and_convert_back(tmp_path):
    msd = generate_synthetic_task(tmp_path / "msd", num_cases=3, num_channels=2, base_shape=(6, 16, 16),
                                  spacing=(2.0, 1.0, 1.0), num_test=1, seed=1)
    v2 = convert_dataset(msd, tmp_path / "v2")
    assert sorted(p.name for p in (v2 / "imagesTr").iterdir())[:2] == ["synthetic3d_000_0000.nii.gz",
                                                                      "synthetic3d_000_0001.nii.gz"]
    task = load_task(v2)
    assert task.layout == "nnunet_v2" and task.num_channels == 2
    case = task.training[0]
    assert isinstance(case.image, tuple) and len(case.image) == 2
    stacked, geometry = read_image(case.image)
    original, original_geometry = read_image(msd / "imagesTr" / "synthetic3d_000.nii.gz")
    np.testing.assert_array_equal(stacked, original)
    assert geometry.matches(original_geometry) == []
    back = convert_dataset(v2, tmp_path / "back")
    assert back.name == "Task990_Synthetic3D"
    again, _ = read_image(back / "imagesTr" / "synthetic3d_000.nii.gz")
    np.testing.assert_array_equal(again, original)
    before, after = (json.loads((f / "dataset.json").read_text()) for f in (msd, back))
    assert after["modality"] == before["modality"] and after["labels"] == before["labels"]
    assert [e["image"] for e in after["training"]] == [e["image"] for e in before["training"]]
    assert after["test"] == before["test"]


def _write_v2(folder: Path, description: dict, cases: dict[str, int] | None = None, ending: str = ".nii.gz") -> Path:
    """A v2 dataset of tiny 3D NIfTI cases: {case id: number of channel files}."""
    from dpunet.dataset.io import Geometry, write_image, write_segmentation

    geometry = Geometry((2, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    for case, channels in (cases or {"a": 1, "b": 1}).items():
        for c in range(channels):
            write_image(np.ones((2, 4, 4), np.float32), geometry, folder / "imagesTr" / f"{case}_{c:04d}{ending}")
        write_segmentation(np.zeros((2, 4, 4), np.uint8), geometry, folder / "labelsTr" / f"{case}{ending}")
    (folder / "dataset.json").write_text(json.dumps(description))
    return folder


V2 = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
      "file_ending": ".nii.gz"}


@pytest.mark.parametrize("change, message", [
    ({"labels": {"background": 0, "whole": [1, 2], "core": 2}}, r"label 'whole' is region-based"),
    ({"regions_class_order": [1, 2]}, r"region-based labels \(regions_class_order\) are not supported"),
    ({"file_ending": ".jpg"}, r"file_ending '.jpg' is not supported"),
    ({"numTraining": 3}, r"numTraining is 3 but imagesTr holds 2 case\(s\)"),
    ({"channel_names": {"0": "T1", "1": "T2"}}, r"case a has channel files \[0\], dataset.json declares 2"),
    ({"labels": {"background": 0, "organ": "one"}}, r"label 'organ' must have an integer value"),
])
def test_v2_descriptions_dpunet_cannot_use_are_refused_with_the_reason(tmp_path, change, message):
    folder = _write_v2(tmp_path / "Dataset007_Bad", {**V2, **change})
    with pytest.raises(DpunetError, match=message):
        load_task(folder)


def test_v2_ignore_label_and_patients_file(tmp_path):
    folder = _write_v2(tmp_path / "Dataset008_Ok", {**V2, "labels": {"background": 0, "organ": 1, "ignore": 2},
                                                    "numTraining": 3}, {"a": 1, "b": 1, "c": 1})
    (folder / "patients.json").write_text(json.dumps({"a": "p1", "b": "p1"}))
    task = load_task(folder)
    assert task.ignore_label == 2 and task.num_classes == 2 and task.foreground_labels == [1]
    assert task.patients == {"p1": ["a", "b"], "c": ["c"]}  # c, not listed, is its own patient
    (folder / "patients.json").write_text(json.dumps({"zz": "p1"}))
    with pytest.raises(DpunetError, match=r"patients.json: case\(s\) \['zz'\] are not in imagesTr"):
        load_task(folder)


def test_dataset_ids_resolve_for_both_layouts_and_clash_loudly(tmp_path):
    from dpunet.paths import resolve_task

    (tmp_path / "Dataset004_Hippocampus").mkdir()
    assert resolve_task("4", tmp_path) == resolve_task(4, tmp_path) == "Dataset004_Hippocampus"
    assert resolve_task("Dataset004_Hippocampus", tmp_path) == "Dataset004_Hippocampus"
    (tmp_path / "Task04_Hippocampus").mkdir()
    with pytest.raises(DpunetError, match="ambiguous"):
        resolve_task("4", tmp_path)


def _png_dataset(raw: Path, train: int = 12, test: int = 2) -> Path:
    folder = raw / "Dataset991_Discs"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :48]
    for i in range(train + test):
        cy, cx, r = rng.integers(12, 28), rng.integers(12, 36), rng.integers(5, 10)
        seg = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        rgb = rng.integers(0, 60, (40, 48, 3))
        rgb[seg == 1] += np.array([150, 40, 90])
        sub = "imagesTr" if i < train else "imagesTs"
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(folder / sub / f"disc_{i:03d}_0000.png")
        if i < train:
            Image.fromarray(seg).save(folder / "labelsTr" / f"disc_{i:03d}.png")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "disc": 1},
        "numTraining": train, "file_ending": ".png"}))
    return folder


def test_png_dataset_plans_trains_and_predicts_pngs(tmp_path, monkeypatch):
    roots = _roots(tmp_path, monkeypatch)
    folder = _png_dataset(roots["raw"])
    task = load_task(folder)
    assert task.num_channels == 3 and len(task.training) == 12  # RGB: one _0000 file, three channels
    plans = dpunet.plan_and_preprocess(991, epsilon=8, width=0.25, steps=20, num_processes=1)
    assert list(plans["configurations"]) == ["2d"]
    assert plans["configurations"]["2d"]["spacing"][-2:] == [1.0, 1.0]
    run = dpunet.train("Dataset991_Discs", 0, epsilon=8, steps=2, pretraining_steps=2)
    assert run.configuration == "2d" and run.release_file.is_file()
    result = dpunet.predict(folder / "imagesTs", tmp_path / "predictions", 991, folds=[0], num_processes=0,
                            use_mirroring=False, progress=False)
    written = sorted(p.name for p in (tmp_path / "predictions").iterdir() if p.suffix == ".png")
    assert written == ["disc_012.png", "disc_013.png"] and result.case_ids == ["disc_012", "disc_013"]
    for name in written:
        seg = np.asarray(Image.open(tmp_path / "predictions" / name))
        assert seg.shape == (40, 48) and set(np.unique(seg)) <= {0, 1}
    # PNG segmentations evaluate as references and predictions (here the predictions against themselves)
    shutil.copytree(tmp_path / "predictions", tmp_path / "reference",
                    ignore=shutil.ignore_patterns("privacy_note.*"))
    summary = dpunet.evaluate(tmp_path / "reference", tmp_path / "predictions", task=991)
    assert summary["n_cases"] == 2


def test_camvid_converter_writes_the_v2_layout(tmp_path):
    from dataset_conversion import convert_camvid
    from tests.test_conversion import _fake_camvid

    source = _fake_camvid(tmp_path / "camvid", 11)
    msd = convert_camvid.convert_camvid(source, tmp_path / "msd", task_id=7)
    with pytest.raises(SystemExit) as done:
        convert_camvid.main(["-i", str(source), "-o", str(tmp_path / "raw"), "--task-id", "7", "--layout", "v2"])
    assert done.value.code == 0
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [f"Dataset007_{msd.name.split('_', 1)[1]}"]
    v2, before = load_task(next((tmp_path / "raw").iterdir())), load_task(msd)
    assert v2.layout == "nnunet_v2" and v2.labels[11] == "ignore" and v2.ignore_label == 11
    assert v2.background_label is None and v2.num_channels == before.num_channels == 3
    np.testing.assert_array_equal(read_image(v2.training[0].image)[0], read_image(before.training[0].image)[0])
