"""dpunet.dataset.verify: every planted defect is found and named; the CLI fails on them; real data passes."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.dataset.io import read_image, read_label, write_image, write_segmentation
from dpunet.dataset.verify import check_task, find_problems, verify_task
from dpunet.utils.errors import DpunetError
from tests.conftest import REPO, shared_path

NUM_CASES = 10


@pytest.fixture
def task(tmp_path) -> Path:
    return generate_synthetic_task(
        tmp_path / "raw", task_id=7, name="Tiny", num_cases=NUM_CASES, base_shape=(8, 16, 16), num_test=2, seed=3
    )


def _case(task: Path, i: int, sub: str = "imagesTr") -> Path:
    return task / sub / f"tiny_{i:03d}.nii.gz"


def _edit_json(task: Path, edit) -> Path:
    path = task / "dataset.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    return path


def _plant_case_errors(task: Path) -> dict[Path, str]:
    """Plant one defect per case; returns {file that must be named: word the problem must contain}."""
    planted = {}
    # 0: corrupt image (truncated gzip stream)
    img = _case(task, 0)
    img.write_bytes(img.read_bytes()[:200])
    planted[img] = "cannot read"
    # 1: label file deleted
    lab = _case(task, 1, "labelsTr")
    lab.unlink()
    planted[lab] = "not found"
    # 2: label shifted by 5 mm
    lab = _case(task, 2, "labelsTr")
    seg, g = read_label(lab)
    write_segmentation(seg, dataclasses.replace(g, origin=tuple(o + 5.0 for o in g.origin)), lab)
    planted[lab] = "origin"
    # 3: undeclared label value 7
    lab = _case(task, 3, "labelsTr")
    seg, g = read_label(lab)
    seg[0, 0, 0] = 7
    write_segmentation(seg, g, lab)
    planted[lab] = "[7]"
    # 4: NaN intensities
    img = _case(task, 4)
    image, g = read_image(img)
    image[0, 1, 2, 3] = np.nan
    write_image(image, g, img)
    planted[img] = "NaN"
    # 5: 2-channel image in a 1-channel task
    img = _case(task, 5)
    image, g = read_image(img)
    write_image(np.concatenate([image, image * 2]), g, img)
    planted[img] = "2 channel"
    # 6: label of the wrong shape
    lab = _case(task, 6, "labelsTr")
    seg, g = read_label(lab)
    write_segmentation(seg[:, :-2], dataclasses.replace(g, shape=seg[:, :-2].shape), lab)
    planted[lab] = "shape"
    # 7: label that lost only its last bytes (SimpleITK still reads it, as zeros)
    lab = _case(task, 7, "labelsTr")
    lab.write_bytes(lab.read_bytes()[:-30])
    planted[lab] = "truncated"
    # a test image with 2 channels
    img = _case(task, NUM_CASES, "imagesTs")
    image, g = read_image(img)
    write_image(np.concatenate([image, image]), g, img)
    planted[img] = "2 channel"
    return planted


def test_clean_synthetic_task_has_no_problems(task):
    assert find_problems(task) == []
    verify_task(task)


def test_every_planted_case_error_is_named(task):
    planted = _plant_case_errors(task)
    problems = find_problems(task)
    for path, word in planted.items():
        hits = [p for p in problems if str(path) in p]
        assert hits, f"no problem names {path}: {problems}"
        assert any(word in p for p in hits), f"{path}: expected '{word}' in {hits}"
    assert len(problems) == len(planted), problems
    for clean in (8, 9):  # untouched cases are not blamed
        assert not any(f"tiny_{clean:03d}" in p for p in problems)
    # a process pool finds the same, in the same order
    assert find_problems(task, num_processes=2) == problems
    with pytest.raises(DpunetError) as e:
        verify_task(task)
    assert len(str(e.value).splitlines()) == 1 + len(planted)


def test_small_geometry_noise_is_tolerated_but_a_rotation_is_not(task):
    lab = _case(task, 0, "labelsTr")
    seg, g = read_label(lab)
    write_segmentation(seg, dataclasses.replace(g, origin=tuple(o + 1e-6 for o in g.origin)), lab)
    assert find_problems(task) == []
    flipped = tuple(-d for d in g.direction)
    write_segmentation(seg, dataclasses.replace(g, direction=flipped), lab)
    (problem,) = find_problems(task)
    assert str(lab) in problem and "direction" in problem


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.update(training=[], numTraining=0), ["no training cases"]),
        (lambda d: d.pop("labels"), ["'labels'", "missing"]),
        (lambda d: d.pop("modality"), ["'modality'", "missing"]),
        (lambda d: d.update(labels={"0": "background", "1": "a", "3": "b"}), ["contiguous", "0..2"]),
        (lambda d: d.update(ignore_label=1), ["ignore_label 1", "largest"]),
        (lambda d: d.update(ignore_label=9), ["ignore_label 9"]),
        (lambda d: d.update(numTraining=99), ["numTraining"]),
        (lambda d: d.update(background_label=5), ["background_label 5"]),
        (lambda d: d["training"].append(dict(d["training"][0])), ["duplicate"]),
    ],
)
def test_dataset_json_problems(task, edit, words):
    path = _edit_json(task, edit)
    problems = find_problems(task)
    assert any(str(path) in p and all(w in p for w in words) for p in problems), problems


def test_missing_or_invalid_dataset_json(task):
    path = task / "dataset.json"
    path.write_text('{"labels": {"0": "bg"},')
    (problem,) = find_problems(task)
    assert str(path) in problem and "not valid JSON" in problem
    path.unlink()
    (problem,) = find_problems(task)
    assert str(path) in problem and "not found" in problem


def test_channel_count_checked_against_modality(task):
    # declaring two channels makes every 1-channel image (training and test) a problem
    _edit_json(task, lambda d: d.update(modality={"0": "a", "1": "b"}))
    problems = find_problems(task)
    assert len(problems) == NUM_CASES + 2
    assert all("1 channel(s)" in p and "declares 2" in p for p in problems)


def _cli(task_arg: str, raw_root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DPUNET_RAW=str(raw_root), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "dpunet.dataset.cli", "-t", task_arg, *extra],
        capture_output=True, text=True, env=env, cwd=raw_root, timeout=120,
    )


def test_cli_ok_and_failure(task):
    ok = _cli("7", task.parent)
    assert ok.returncode == 0, ok.stderr
    assert f"OK: {NUM_CASES} cases" in ok.stdout
    planted = _plant_case_errors(task)
    bad = _cli("Task007_Tiny", task.parent, "-np", "2")
    assert bad.returncode != 0
    for path in planted:
        assert str(path) in bad.stderr
    missing = _cli("8", task.parent)
    assert missing.returncode != 0 and "Task08" in missing.stderr


@pytest.mark.shared
def test_hippocampus_passes():
    folder = shared_path("data", "Task04_Hippocampus")
    result = _cli(str(folder), folder.parent, "-np", "2")
    assert result.returncode == 0, result.stderr
    assert "OK: 200 cases" in result.stdout


def test_non_integer_ignore_label_is_a_problem(task):
    path = _edit_json(task, lambda d: d.update(ignore_label="void"))
    (problem,) = find_problems(task)
    assert str(path) in problem and "ignore_label" in problem


def _zero_size_image(path: Path) -> None:
    """A NIfTI whose last axis has size 0 (SimpleITK reads it as one slice of zeros)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 0), np.float32), np.eye(4)), str(path))


def test_zero_size_dimension_is_a_problem(task):
    img, test_img = _case(task, 0), _case(task, NUM_CASES, "imagesTs")
    _zero_size_image(img)
    _zero_size_image(test_img)
    problems = find_problems(task)
    for path in (img, test_img):
        assert any(str(path) in p and "size 0" in p for p in problems), problems


def test_declared_label_in_no_label_file_is_a_warning(task):
    _edit_json(task, lambda d: d["labels"].update({"3": "tumour"}))
    assert find_problems(task) == []
    result = check_task(task)
    (warning,) = result.warnings
    assert "3 (tumour)" in warning and "no label file" in warning
    cli = _cli("7", task.parent)
    assert cli.returncode == 0 and "dpunet warning:" in cli.stderr and "3 (tumour)" in cli.stderr
    assert check_task(task.parent / task.name).warnings == [warning]
    _edit_json(task, lambda d: d["labels"].pop("3"))
    assert check_task(task).warnings == []
