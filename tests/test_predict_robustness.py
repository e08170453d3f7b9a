"""dpunet_predict against corrupt inputs, a wrong output path and kill -9 (documentation/robustness.md).

The task, plan and (untrained) fold models are those of test_inference.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dpunet.dataset.io import read_image, write_image
from dpunet.inference.case_io import INCOMPLETE_MARKER, find_input_cases
from dpunet.inference.predictor import predict_folder
from dpunet.utils.errors import DpunetError
from tests.test_inference import roots, task3d  # noqa: F401 (module fixtures)


def _env(roots: dict[str, Path]) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update({f"DPUNET_{k.upper()}": str(v) for k, v in roots.items()})
    return env


def _cli(roots: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpunet.inference.cli", "-t", "990", "-f", "0", "-np", "0", *args],
                          env=_env(roots), capture_output=True, text=True, timeout=300)


@pytest.fixture
def corrupt_inputs(task3d, tmp_path) -> tuple[Path, dict[Path, str]]:
    """A copy of the test images plus three corrupt ones: {file: word its problem must contain}."""
    folder = tmp_path / "inputs"
    shutil.copytree(task3d["folder"] / "imagesTs", folder)
    source = sorted(folder.glob("*.nii.gz"))[0]
    truncated, nan, empty = folder / "truncated.nii.gz", folder / "nan.nii.gz", folder / "empty.nii.gz"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])  # SimpleITK reads it: zeros
    image, geometry = read_image(source)
    image[0, 2, 3, 4] = np.nan  # SimpleITK reads it as 0
    write_image(image, geometry, nan)
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 0), np.float32), np.eye(4)), str(empty))  # read as one slice
    return folder, {truncated: "truncated", nan: "NaN", empty: "size 0"}


def test_corrupt_inputs_are_refused_before_anything_is_written(corrupt_inputs, roots, tmp_path):
    folder, planted = corrupt_inputs
    out = tmp_path / "out"
    with pytest.raises(DpunetError) as e:
        predict_folder(folder, out, "990", "3d_fullres", [0], 8.0, num_processes=2, progress=False)
    for path, word in planted.items():
        assert any(str(path) in line and word in line for line in str(e.value).splitlines()), (path, str(e.value))
    assert not out.exists()
    done = _cli(roots, "-i", str(folder), "-o", str(out))
    assert done.returncode == 2 and done.stderr.startswith("dpunet error:"), done.stderr
    assert all(str(path) in done.stderr for path in planted) and "Traceback" not in done.stderr
    assert not out.exists()


def test_output_that_is_a_file_is_refused_first(task3d, roots, tmp_path):
    a_file = tmp_path / "predictions"
    a_file.write_text("not a folder")
    # the output is checked before the task is even looked up
    done = _cli(roots, "-i", str(task3d["folder"] / "imagesTs"), "-o", str(a_file), "-t", "555")
    assert done.returncode == 2 and "dpunet error:" in done.stderr and "is a file" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and a_file.read_text() == "not a folder"


def test_a_finished_folder_has_the_note_and_no_marker(task3d, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "privacy_note.md").write_text("a stale note of an earlier run")
    predict_folder(task3d["folder"] / "imagesTs", out, "990", "3d_fullres", [0], 8.0, num_processes=0,
                   use_mirroring=False, progress=False)
    assert not (out / INCOMPLETE_MARKER).exists()
    assert (out / "privacy_note.json").is_file() and "stale" not in (out / "privacy_note.md").read_text()


# ----- kill -9 ---------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (a container's init may never reap it)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_leaves_a_marked_folder_and_no_worker(task3d, roots, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(task3d["folder"] / "imagesTr", inputs)
    out = tmp_path / "out"
    # a small step size makes every case slow enough to be killed in the middle of the folder
    proc = subprocess.Popen([sys.executable, "-m", "dpunet.inference.cli", "-i", str(inputs), "-o", str(out),
                             "-t", "990", "-f", "0", "-np", "2", "--step_size", "0.1"], env=_env(roots),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / INCOMPLETE_MARKER).exists():
            assert proc.poll() is None, "dpunet_predict finished without ever marking its output folder incomplete"
            assert time.time() < deadline, "dpunet_predict did not start writing"
            time.sleep(0.02)
        workers = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert workers, "the reading/writing workers should have been running"
    assert (out / INCOMPLETE_MARKER).is_file()
    assert not (out / "privacy_note.json").exists() and not (out / "privacy_note.md").exists()
    assert len(list(out.glob("*.nii.gz"))) < len(find_input_cases(inputs))
    deadline = time.time() + 30
    while [pid for pid in workers if _alive(pid)] and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # do not leave them behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their parent"


def test_evaluate_refuses_a_folder_marked_incomplete(task3d, tmp_path):
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / INCOMPLETE_MARKER).write_text("killed")
    done = subprocess.run([sys.executable, "-m", "dpunet.evaluation.cli", "-ref", str(task3d["folder"] / "labelsTr"),
                           "-pred", str(preds), "-l", "1", "--only-predicted"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and INCOMPLETE_MARKER in done.stderr and "Traceback" not in done.stderr
