"""Bad inputs, bad options and faults end cleanly (documentation/robustness.md lists them with what each gets).

This file holds the cross-cutting cases: the test suite's own temporary files, file modes of atomic writes, and
option checks of the console scripts. Corrupt data in predict, evaluate, verification and preprocessing are
tested beside the code they concern (test_inference, test_evaluate, test_verify, test_preprocessing).
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpunet.dataset.io import Geometry, write_segmentation
from dpunet.privacy.accounting import MAX_EPSILON, calibrate_noise_multiplier
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import write_json, write_text
from tests.conftest import REPO


# ----- the test suite cleans up after itself --------------------------------------------------------------------
INNER_TEST = '''
import subprocess, sys, tempfile

def test_writes_temporary_files(tmp_path, tmp_path_factory):
    (tmp_path / "result.txt").write_text("x")
    (tmp_path_factory.mktemp("shared") / "data.bin").write_bytes(b"0" * 100)
    tempfile.mkdtemp(prefix="torchelastic_")  # what torchrun's agent does, here and in a child process
    subprocess.run([sys.executable, "-c", "import tempfile; tempfile.mkdtemp(prefix='torchelastic_')"], check=True)
'''


def test_a_passing_session_leaves_nothing_in_the_system_temporary_folder(tmp_path):
    """An inner pytest session with this repository's pytest.ini and conftest, its system temporary folder an empty
    folder: afterwards that folder holds no file and no folder but pytest's empty per-user root."""
    system_tmp, tests = tmp_path / "system_tmp", tmp_path / "inner"
    system_tmp.mkdir()
    tests.mkdir()
    (tests / "test_inner.py").write_text(INNER_TEST)
    env = {**os.environ, "TMPDIR": str(system_tmp)}
    env.pop("PYTEST_DEBUG_TEMPROOT", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(REPO / "pytest.ini"), "--rootdir", str(REPO),
                           "-p", "tests.conftest", "-p", "no:cacheprovider", str(tests / "test_inner.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    left = sorted(str(p.relative_to(system_tmp)) for p in system_tmp.rglob("*"))
    assert all(p.startswith("pytest-of-") and "/" not in p for p in left), left


# ----- atomic writes keep the user's normal permissions ---------------------------------------------------------
@pytest.fixture
def umask():
    """Set a umask for the test; the previous one comes back afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask):
    umask(mask)
    expected = 0o666 & ~mask
    write_json({"a": 1}, tmp_path / "a.json")
    write_text("text", tmp_path / "b.txt")
    geometry = Geometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_segmentation(np.zeros((2, 3, 4), np.uint8), geometry, tmp_path / "seg.nii.gz")  # SimpleITK writes it
    for name in ("a.json", "b.txt", "seg.nii.gz"):
        assert _mode(tmp_path / name) == expected, f"{name}: {oct(_mode(tmp_path / name))} != {oct(expected)}"
    # replacing a file gives it the same mode again
    write_json({"a": 2}, tmp_path / "a.json")
    assert _mode(tmp_path / "a.json") == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp.")]


# ----- epsilons beyond the calibrated range ----------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [1e6, 1e308, MAX_EPSILON * 1.001])
def test_epsilon_above_the_maximum_is_refused_at_once(epsilon):
    start = time.perf_counter()
    with pytest.raises(DpunetError, match=f"above {MAX_EPSILON:g}.*--eps inf"):
        calibrate_noise_multiplier(epsilon, 1e-5, 0.5, 150)
    assert time.perf_counter() - start < 1.0  # before: minutes inside the accountant



# ----- what a newcomer reads: the demo's table and the training bars -------------------------------------------
def test_demo_table_says_dice_and_names_each_run(capsys):
    from dpunet import demo

    summary = {"labels": {"1": "organ"}, "mean": {"1": {"Dice": 0.5}}, "foreground_mean": {"Dice": 0.5}}
    report = {"statement": "s", "epsilon": {"prv": 7.99, "rdp": 8.6}, "delta": 1e-5, "num_patients": 9,
              "sample_rate": 0.5, "steps_taken": 3, "patches_per_patient": 2, "noise_multiplier": 1.0,
              "clip_norm": 1.0, "public_data_and_priors": ["none"]}
    results = {run: {"validation": summary, "report": report, "output_dir": "x"} for run in demo.RUN_NAMES}
    demo._print_results(results, {}, 60.0)
    out = capsys.readouterr().out
    assert "Dice per class" in out
    assert all(out.count(name) >= 1 for name in demo.RUN_NAMES.values())


def test_training_bar_names_its_run_and_shows_epsilon_with_three_decimals(tmp_path, use_roots, capsys):
    from dpunet.training.config import merge_plan_and_options
    from dpunet.training.trainer import DPTrainer, load_training_inputs
    from tests.conftest import plan_synthetic_task

    use_roots(plan_synthetic_task(tmp_path / "task", "-c", "2d", "--width", "0.25", "--steps", "2",
                                  "--patients-per-step", "3", "--patches-per-patient", "1"))
    cfg = merge_plan_and_options(load_training_inputs("990", "2d")[2],
                                 dict(task="990", fold="0", epsilon=8.0, configuration="2d", engine="functorch",
                                      validation=False, init_from="none", eps_log_every=1))
    DPTrainer(cfg, output_dir=tmp_path / "unet__2d__eps8" / "fold_0").run()
    captured = capsys.readouterr()
    err = captured.err
    assert "unet__2d__eps8 fold 0" in err
    # from random weights the trainer's noise-norm warning shows, pointing to the one explanation
    assert "noise on each averaged gradient has norm" in captured.out and "'Will it learn?'" in captured.out
    shown = re.findall(r"eps=([^,\]]+)", err)
    assert shown and all(re.fullmatch(r"-|\d+\.\d{3}", s) for s in shown), shown


def test_demo_states_its_duration_before_working(tmp_path, capsys):
    from dpunet import demo

    with pytest.raises(SystemExit):  # a wrong --hippocampus path stops it right after the estimate
        demo.main(["--workdir", str(tmp_path), "--hippocampus", str(tmp_path / "nowhere")])
    out = capsys.readouterr().out
    assert "about 12 min idle, 25 min on a busy machine" in out


def test_the_planners_noise_warning_points_to_the_explanation():
    from dpunet.planning.dp_plan import plan_dp_block

    block = plan_dp_block(10, 1.0, patients_per_step=2, steps=500)
    assert block["warnings"] and all("'Will it learn?'" in w for w in block["warnings"])
    assert "Two warnings, two views of the same noise" in (REPO / "documentation" / "training.md").read_text()
