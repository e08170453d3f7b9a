"""Preprocessing: exact geometric invertibility, resampling, resumability, and the plan_and_preprocess command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.dataset.io import Geometry, read_image, read_label, write_segmentation
from dpunet.dataset.msd import load_task
from dpunet.preprocessing.cropping import crop_to_nonzero, paste_into_box
from dpunet.preprocessing.preprocessor import preprocess_array, restore_probabilities, restore_segmentation
from dpunet.preprocessing.resampling import resample_segmentation, separate_axis


def run_cli(module: str, *args: str, roots: dict[str, Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({f"DPUNET_{k.upper()}": str(v) for k, v in roots.items()})
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    a, b = a == label, b == label
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_crop_and_paste_are_inverse():
    data = np.zeros((2, 10, 12, 14), np.float32)
    data[:, 2:7, 3:9, 1:13] = 1.0
    cropped, _, box = crop_to_nonzero(data)
    assert cropped.shape == (2, 5, 6, 12)
    np.testing.assert_array_equal(paste_into_box(cropped, box, data.shape[1:]), data)


def test_anisotropic_axis_is_resampled_separately():
    assert separate_axis([5.0, 1.0, 1.0], [5.0, 1.0, 1.0]) == 0
    assert separate_axis([1.0, 1.0, 1.0], [1.5, 1.5, 1.5]) is None
    seg = np.zeros((6, 20, 20), np.int16)
    seg[2:4, 5:15, 5:15] = 1
    up = resample_segmentation(seg, (6, 40, 40), order=1, axis=0)
    assert set(np.unique(up)) == {0, 1} and up.shape == (6, 40, 40)
    # slices are never blended across z with order_z = 0
    assert np.array_equal(up.any(axis=(1, 2)), seg.any(axis=(1, 2)))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return generate_synthetic_task(tmp_path_factory.mktemp("raw"), num_cases=10, seed=1)


def _config(spacing, dim=3):
    return {"spacing": spacing, "dim": dim,
            "normalization_schemes": [{"name": "zscore_per_image", "use_nonzero_mask": True}],
            "resampling": {"data": {"order": 3, "order_z": 0}, "seg": {"order": 1, "order_z": 0},
                           "probabilities": {"order": 1, "order_z": 0}, "anisotropy_threshold": 3.0}}


@pytest.mark.parametrize("spacing", [[3.0, 1.0, 1.0], [2.0, 0.7, 0.7], [4.5, 1.3, 1.3]])
def test_preprocessing_is_exactly_invertible_on_geometry(task_dir, tmp_path, spacing):
    task = load_task(task_dir)
    case = task.training[3]
    image, geometry = read_image(case.image)
    label, label_geometry = read_label(case.label)
    data, seg, props = preprocess_array(image, geometry, _config(spacing), label)
    assert data.dtype == np.float32 and np.isfinite(data).all()
    # the label brought back from preprocessed space lands on the original grid
    restored = restore_segmentation(seg, props, _config(spacing))
    out = tmp_path / "restored.nii.gz"
    write_segmentation(restored, Geometry.from_dict(props["original_geometry"]), out)
    back, back_geometry = read_label(out)
    assert back.shape == label.shape
    assert back_geometry.matches(label_geometry) == []
    for lab in (1, 2):
        assert dice(back, label, lab) > (0.97 if spacing[0] == 3.0 else 0.75)
    # probabilities: softmax-like input restores to the original shape with background outside the crop
    probs = np.stack([(seg == k).astype(np.float32) for k in range(3)])
    restored_probs = restore_probabilities(probs, props, _config(spacing))
    assert restored_probs.shape == (3,) + label.shape
    assert dice(restored_probs.argmax(0), label, 1) > 0.7


def test_2d_configuration_keeps_slices(task_dir):
    task = load_task(task_dir)
    image, geometry = read_image(task.training[0].image)
    data, _, props = preprocess_array(image, geometry, _config([0.5, 0.5], dim=2))
    assert data.shape[1] == props["shape_after_crop"][0]  # z is cropped but never resampled
    assert data.shape[2] == round(props["shape_after_crop"][1] * geometry.spacing[1] / 0.5)
    assert props["target_spacing"][0] == geometry.spacing[0]


def test_plan_and_preprocess_end_to_end_resumable(task_dir, tmp_path):
    roots = {"raw": task_dir.parent, "preprocessed": tmp_path / "pre", "results": tmp_path / "res"}
    args = ["-t", "990", "-c", "3d_fullres", "2d", "-np", "2", "--steps", "50", "--patients-per-step", "4"]
    proc = run_cli("dpunet.pipeline.cli", *args, roots=roots)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = roots["preprocessed"] / task_dir.name
    for name in ("dataset_fingerprint.json", "dpunet_plans.json", "splits_final.json", "dataset.json"):
        assert (out / name).is_file()
    plans = json.loads((out / "dpunet_plans.json").read_text())
    for cfg in plans["configurations"].values():
        folder = out / cfg["data_identifier"]
        cases = sorted(p.stem for p in folder.glob("*.npz"))
        assert len(cases) == 10
        npz = np.load(folder / f"{cases[0]}.npz")
        props = json.loads((folder / f"{cases[0]}.json").read_text())
        assert npz["data"].ndim == 4 and npz["seg"].shape[1:] == npz["data"].shape[1:]
        assert list(npz["data"].shape[1:]) == props["shape_after_resampling"]
        assert set(props["class_locations"]) == {"1", "2"}
        assert not list(folder.glob(".tmp*"))
    again = run_cli("dpunet.pipeline.cli", *args, roots=roots)
    assert again.returncode == 0 and "10 already done" in again.stdout
    redo = run_cli("dpunet.pipeline.cli", *args, "--overwrite", roots=roots)
    assert redo.returncode == 0 and "10 cases preprocessed" in redo.stdout


def test_bad_dataset_fails_before_writing_plans(task_dir, tmp_path):
    import shutil

    broken = tmp_path / "raw" / task_dir.name
    shutil.copytree(task_dir, broken)
    victim = sorted((broken / "imagesTr").glob("*.nii.gz"))[2]
    victim.write_bytes(victim.read_bytes()[:200])
    roots = {"raw": broken.parent, "preprocessed": tmp_path / "pre", "results": tmp_path / "res"}
    proc = run_cli("dpunet.pipeline.cli", "-t", "990", roots=roots)
    assert proc.returncode != 0
    assert victim.name in proc.stderr
    assert not (roots["preprocessed"] / task_dir.name / "dpunet_plans.json").exists()


@pytest.mark.shared
@pytest.mark.parametrize("converter, task_id, channels", [("camvid", 101, 3), ("isbi2012", 102, 1)])
def test_plan_and_preprocess_converted_natural_image_tasks(tmp_path, converter, task_id, channels):
    from tests.conftest import shared_path

    if converter == "camvid":
        from dataset_conversion.convert_camvid import convert_camvid as convert
        source = shared_path("data", "CamVid")
    else:
        from dataset_conversion.convert_isbi2012 import convert_isbi2012 as convert
        source = shared_path("data", "ISBI2012_membrane")
    roots = {"raw": tmp_path / "raw", "preprocessed": tmp_path / "pre", "results": tmp_path / "res"}
    task_dir = convert(source, roots["raw"], task_id=task_id, limit=10)
    proc = run_cli("dpunet.pipeline.cli", "-t", str(task_id), "-np", "2", "--patients-per-step", "4",
                   roots=roots)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = roots["preprocessed"] / task_dir.name
    plans = json.loads((out / "dpunet_plans.json").read_text())
    assert list(plans["configurations"]) == ["2d"]  # one-slice images: 2D only
    config = plans["configurations"]["2d"]
    assert len(config["patch_size"]) == 2 and config["architecture"]["kwargs"]["dim"] == 2
    assert len(config["normalization_schemes"]) == channels
    if converter == "camvid":
        assert plans["ignore_label"] == 11 and plans["background_label"] is None and plans["num_classes"] == 11
    npz = np.load(sorted((out / "2d").glob("*.npz"))[0])
    assert npz["data"].shape[0] == channels and npz["data"].shape[1] == 1


def test_resume_redoes_the_cases_whose_raw_files_changed(task_dir, tmp_path):
    import shutil

    from dpunet.preprocessing.preprocessor import preprocess_cases

    copy = tmp_path / task_dir.name
    shutil.copytree(task_dir, copy)
    cases, out, config = load_task(copy).training[:3], tmp_path / "pre", _config([3.0, 1.0, 1.0])
    assert preprocess_cases(cases, config, [1, 2], out) == {"done": 3, "skipped": 0}
    assert preprocess_cases(cases, config, [1, 2], out) == {"done": 0, "skipped": 3}
    # a label file edited after preprocessing: that case is redone with its new labels
    seg, geometry = read_label(cases[1].label)
    write_segmentation(np.where(seg == 2, 1, seg), geometry, cases[1].label)
    assert preprocess_cases(cases, config, [1, 2], out) == {"done": 1, "skipped": 2}
    assert 2 not in np.unique(np.load(out / f"{cases[1].case_id}.npz")["seg"])
    # same size and modification time, other bytes (the gzip header's own timestamp): the content hash notices
    image, info = cases[2].image, cases[2].image.stat()
    data = bytearray(image.read_bytes())
    data[4] ^= 1
    image.write_bytes(bytes(data))
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert image.stat().st_size == info.st_size and image.stat().st_mtime_ns == info.st_mtime_ns
    assert preprocess_cases(cases, config, [1, 2], out) == {"done": 1, "skipped": 2}
    assert preprocess_cases(cases, config, [1, 2], out) == {"done": 0, "skipped": 3}
