"""evaluate_folder on small NIfTI folders, the dpunet_evaluate CLI, and the cross-validation summary."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary

from dpunet.dataset.io import Geometry, write_segmentation
from dpunet.evaluation.cross_validation import (
    format_epsilon,
    main as cv_main,
    run_folder_name,
    summarize_cross_validation,
)
from dpunet.evaluation.evaluate import evaluate_folder, write_summary
from dpunet.privacy.accounting import epsilon_spent
from dpunet.privacy.report import build_privacy_report
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json, write_json
from tests.conftest import REPO

SPACING = (2.0, 0.8, 1.0)
GEOMETRY = Geometry(shape=(6, 12, 10), spacing=SPACING, origin=(1.0, -2.0, 3.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
LABELS = {0: "background", 1: "anterior", 2: "posterior"}


def reference_and_prediction(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two boxes (labels 1 and 2) and a prediction that shifts, grows or drops them, varying by case."""
    ref = np.zeros(GEOMETRY.shape, np.uint8)
    ref[1:5, 2:7, 2:6] = 1
    ref[2:5, 7:11, 3:8] = 2
    pred = np.zeros_like(ref)
    pred[1:5, 3 + seed % 2:8, 2:6 + seed % 3] = 1
    if seed != 2:  # case 2 misses label 2 entirely: Dice 0, HD95 undefined
        pred[2:6, 7:11, 3:8] = 2
    return ref, pred


@pytest.fixture
def folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    cases = {}
    for i in range(3):
        ref, pred = reference_and_prediction(i)
        case = f"case_{i:03d}"
        write_segmentation(ref, GEOMETRY, ref_dir / f"{case}.nii.gz")
        write_segmentation(pred, GEOMETRY, pred_dir / f"{case}.nii.gz")
        cases[case] = (ref, pred)
    return ref_dir, pred_dir, cases


def test_evaluate_folder_matches_medpy_and_shapes_summary(folders, tmp_path):
    ref_dir, pred_dir, cases = folders
    summary = evaluate_folder(ref_dir, pred_dir, LABELS, ignore_label=None, background_label=0)
    assert [c["case_id"] for c in summary["metric_per_case"]] == sorted(cases)
    for entry in summary["metric_per_case"]:
        ref, pred = cases[entry["case_id"]]
        assert Path(entry["reference_file"]).parent == ref_dir
        assert Path(entry["prediction_file"]).parent == pred_dir
        assert set(entry["metrics"]) == {"1", "2"}
        for label in (1, 2):
            m, r, p = entry["metrics"][str(label)], ref == label, pred == label
            assert m["TP"] == int((r & p).sum()) and m["FP"] == int((p & ~r).sum())
            assert m["FN"] == int((r & ~p).sum()) and m["TN"] == int((~r & ~p).sum())
            assert m["Dice"] == pytest.approx(medpy_binary.dc(p, r), abs=1e-6)
            if p.any():
                assert m["HD95"] == pytest.approx(medpy_binary.hd95(p, r, voxelspacing=SPACING), abs=1e-4)
            else:
                assert math.isnan(m["HD95"]) and m["NSD"] == 0.0
    # means: NaN-skipping over cases, undefined values counted
    hd_label2 = [c["metrics"]["2"]["HD95"] for c in summary["metric_per_case"]]
    assert sum(math.isnan(v) for v in hd_label2) == 1
    assert summary["nan_counts"]["2"]["HD95"] == 1 and summary["nan_counts"]["2"]["Dice"] == 0
    assert summary["mean"]["2"]["HD95"] == pytest.approx(np.nanmean(hd_label2))
    assert summary["empty_counts"]["2"] == {"reference_empty": 0, "prediction_empty": 1, "both_empty": 0}
    for name in ("Dice", "NSD", "TP"):
        assert summary["foreground_mean"][name] == pytest.approx(
            np.mean([summary["mean"]["1"][name], summary["mean"]["2"][name]]))
    assert summary["n_cases"] == 3
    assert summary["labels"] == {"1": "anterior", "2": "posterior"}
    assert summary["settings"]["nsd_tolerance_mm"] == 1.0 and summary["settings"]["empty_both"] == "nan"
    assert "erosion" in summary["settings"]["surface"]
    # written atomically, NaN survives the round trip
    write_summary(summary, tmp_path / "out" / "summary.json")
    back = load_json(tmp_path / "out" / "summary.json")
    assert math.isnan(back["metric_per_case"][2]["metrics"]["2"]["HD95"])
    assert back["mean"]["1"]["Dice"] == pytest.approx(summary["mean"]["1"]["Dice"])


def test_parallel_equals_serial(folders):
    ref_dir, pred_dir, _ = folders
    serial = evaluate_folder(ref_dir, pred_dir, LABELS, None, 0)
    parallel = evaluate_folder(ref_dir, pred_dir, LABELS, None, 0, num_processes=2)
    assert json.dumps(serial, sort_keys=True) == json.dumps(parallel, sort_keys=True)


def test_both_empty_class_rule(tmp_path):
    ref = np.zeros(GEOMETRY.shape, np.uint8)
    ref[1:4, 2:6, 2:6] = 1  # label 2 absent from reference and prediction
    for folder in ("ref", "pred"):
        write_segmentation(ref, GEOMETRY, tmp_path / folder / "a.nii.gz")
    default = evaluate_folder(tmp_path / "ref", tmp_path / "pred", LABELS, None, 0)
    assert math.isnan(default["metric_per_case"][0]["metrics"]["2"]["Dice"])
    assert math.isnan(default["mean"]["2"]["Dice"]) and default["nan_counts"]["2"]["Dice"] == 1
    assert default["foreground_mean"]["Dice"] == 1.0  # label 1 perfect; label 2 undefined is skipped
    one = evaluate_folder(tmp_path / "ref", tmp_path / "pred", LABELS, None, 0, empty_both="one")
    assert one["mean"]["2"]["Dice"] == 1.0 and one["mean"]["2"]["HD95"] == 0.0


def test_ignore_label_voxels_are_excluded(tmp_path):
    labels = {0: "background", 1: "road", 2: "car", 3: "void"}
    ref = np.zeros(GEOMETRY.shape, np.uint8)
    ref[:, 2:6, 2:6] = 1
    ref[:, 8:11, 1:9] = 3  # void
    pred = ref.copy()
    pred[ref == 3] = 1  # predicted road where the reference says void: must not count
    pred[:, 0, 0] = 1  # a real false positive
    write_segmentation(ref, GEOMETRY, tmp_path / "ref" / "x.nii.gz")
    write_segmentation(pred, GEOMETRY, tmp_path / "pred" / "x.nii.gz")
    summary = evaluate_folder(tmp_path / "ref", tmp_path / "pred", labels, ignore_label=3, background_label=0)
    m = summary["metric_per_case"][0]["metrics"]
    assert set(m) == {"1", "2"}
    valid = ref != 3
    r, p = ref == 1, (pred == 1) & valid
    assert m["1"]["FP"] == 6 and m["1"]["FN"] == 0
    assert m["1"]["TN"] == int(valid.sum()) - int(r.sum()) - 6
    assert m["1"]["Dice"] == pytest.approx(medpy_binary.dc(p, r))
    assert m["1"]["HD95"] == pytest.approx(medpy_binary.hd95(p, r, voxelspacing=SPACING), abs=1e-4)
    # without the ignore label the void region is a large false positive
    plain = evaluate_folder(tmp_path / "ref", tmp_path / "pred", labels, ignore_label=None, background_label=0)
    assert plain["metric_per_case"][0]["metrics"]["1"]["FP"] == 6 + int((ref == 3).sum())


def test_geometry_mismatch_names_the_file(folders):
    ref_dir, pred_dir, cases = folders
    ref, pred = cases["case_001"]
    moved = Geometry(GEOMETRY.shape, (2.0, 0.8, 1.5), GEOMETRY.origin, GEOMETRY.direction)
    write_segmentation(pred, moved, pred_dir / "case_001.nii.gz")
    with pytest.raises(DpunetError, match=r"case_001\.nii\.gz.*spacing"):
        evaluate_folder(ref_dir, pred_dir, LABELS, None, 0)


def test_missing_and_extra_predictions(folders):
    ref_dir, pred_dir, cases = folders
    (pred_dir / "case_000.nii.gz").unlink()
    (pred_dir / "case_002.nii.gz").unlink()
    with pytest.raises(DpunetError, match=r"2 of 3 prediction\(s\) missing: case_000, case_002"):
        evaluate_folder(ref_dir, pred_dir, LABELS, None, 0)
    # explicit case list (one fold's validation cases): fine
    summary = evaluate_folder(ref_dir, pred_dir, LABELS, None, 0, case_ids=["case_001"])
    assert [c["case_id"] for c in summary["metric_per_case"]] == ["case_001"]
    write_segmentation(cases["case_001"][1], GEOMETRY, pred_dir / "stray.nii.gz")
    with pytest.raises(DpunetError, match="no reference.*stray"):
        evaluate_folder(ref_dir, pred_dir, LABELS, None, 0, case_ids=["case_001", "stray"])


# ---------------------------------------------------------------- CLI (subprocess)

def _run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "dpunet.evaluation.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_cli_with_labels_and_with_task(folders, tmp_path):
    ref_dir, pred_dir, _ = folders
    done = _run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "1", "2")
    assert done.returncode == 0, done.stderr
    assert "foreground mean" in done.stdout and "HD95" in done.stdout
    summary = load_json(pred_dir / "summary.json")
    assert summary["n_cases"] == 3 and set(summary["mean"]) == {"1", "2"}

    raw = tmp_path / "raw"
    task_dir = raw / "Task07_Tiny"
    task_dir.mkdir(parents=True)
    write_json({"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}, "training": []},
               task_dir / "dataset.json")
    out = tmp_path / "eval" / "s.json"
    done = _run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-t", "7", "-o", str(out),
                    "--nsd-tolerance", "2", env_extra={"DPUNET_RAW": str(raw)})
    assert done.returncode == 0, done.stderr
    by_task = load_json(out)
    assert by_task["labels"] == {"1": "a", "2": "b"} and by_task["settings"]["nsd_tolerance_mm"] == 2.0
    assert by_task["mean"]["1"]["Dice"] == pytest.approx(summary["mean"]["1"]["Dice"])


def test_cli_bad_input_exits_nonzero(folders, tmp_path):
    ref_dir, pred_dir, _ = folders
    done = _run_cli("-ref", str(ref_dir), "-pred", str(tmp_path / "nowhere"), "-l", "1")
    assert done.returncode == 2 and "dpunet error" in done.stderr and "nowhere" in done.stderr
    (pred_dir / "case_001.nii.gz").unlink()
    done = _run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "1", "2")
    assert done.returncode == 2 and "case_001" in done.stderr
    assert not (pred_dir / "summary.json").exists()


# ---------------------------------------------------------------- cross-validation summary

def _fold_summary(fold: int, dice_values: dict[str, list[float]], settings: dict) -> dict:
    n = len(dice_values["1"])
    cases = []
    for i in range(n):
        metrics = {label: {"Dice": values[i], "IoU": values[i] / (2 - values[i]), "HD95": 1.0 + fold,
                           "NSD": values[i], "n_ref": 10, "n_pred": 10} for label, values in dice_values.items()}
        cases.append({"case_id": f"c{fold}_{i}", "reference_file": f"/ref/c{fold}_{i}.nii.gz",
                      "prediction_file": f"/pred/c{fold}_{i}.nii.gz", "metrics": metrics})
    return {"metric_per_case": cases, "labels": {"1": "a", "2": "b"}, "settings": settings}


def _make_run(run_dir: Path, with_privacy=(0, 1, 2, 3)) -> dict[int, dict[str, list[float]]]:
    rng = np.random.default_rng(0)
    settings = {"nsd_tolerance_mm": 1.0, "empty_both": "nan"}
    dice_by_fold = {}
    for f in range(5):
        values = {"1": list(rng.uniform(0.5, 0.9, 3 + f % 2)), "2": list(rng.uniform(0.4, 0.8, 3 + f % 2))}
        if f == 1:
            values["2"][0] = math.nan  # undefined in one case
        dice_by_fold[f] = values
        write_json(_fold_summary(f, values, settings), run_dir / f"fold_{f}" / "private" / "validation" / "summary.json")
        if f in with_privacy:
            report = build_privacy_report(num_patients=160, sample_rate=0.2, noise_multiplier=1.0 + 0.01 * f,
                                          clip_norm=1.0, delta=1e-5, target_epsilon=8.0, steps_planned=50,
                                          patches_per_patient=2, steps_taken=50)
            if f == 3:
                del report["clip_norm"]
            write_json(report, run_dir / f"fold_{f}" / "release" / "privacy_report.json")
    return dice_by_fold


def test_cross_validation_summary(tmp_path):
    run_dir = tmp_path / "Task04_Hippocampus" / "unet__3d_fullres__eps8"
    dice_by_fold = _make_run(run_dir)
    cv = summarize_cross_validation(run_dir, [0, 1, 2, 3, 4])
    all_1 = [v for f in range(5) for v in dice_by_fold[f]["1"]]
    all_2 = [v for f in range(5) for v in dice_by_fold[f]["2"]]
    assert cv["n_cases"] == len(all_1) == 17
    assert {c["fold"] for c in cv["metric_per_case"]} == set(range(5))
    assert cv["mean"]["1"]["Dice"] == pytest.approx(np.mean(all_1))
    assert cv["mean"]["2"]["Dice"] == pytest.approx(np.nanmean(all_2))
    assert cv["nan_counts"]["2"]["Dice"] == 1
    row = cv["table"]["1"]["Dice"]
    assert row["sd_over_cases"] == pytest.approx(np.std(all_1, ddof=1))
    fold_means = [np.mean(dice_by_fold[f]["1"]) for f in range(5)]
    assert row["mean_over_folds"] == pytest.approx(np.mean(fold_means))
    assert row["sd_over_folds"] == pytest.approx(np.std(fold_means, ddof=1))
    assert cv["table"]["2"]["Dice"]["n_cases_defined"] == 16
    hd_folds = cv["table"]["foreground"]["HD95"]
    assert hd_folds["mean_over_folds"] == pytest.approx(3.0) and hd_folds["sd_over_folds"] == pytest.approx(
        np.std([1, 2, 3, 4, 5], ddof=1))
    assert cv["privacy"]["0"]["epsilon_prv"] == pytest.approx(epsilon_spent(1.0, 0.2, 50, 1e-5, "prv"), rel=1e-6)
    assert cv["privacy"]["1"]["noise_multiplier"] == pytest.approx(1.01)
    assert cv["privacy"]["2"]["steps"] == 50
    assert cv["privacy"]["3"]["clip_norm"] is None and cv["privacy"]["4"] is None
    notes = " ".join(cv["notes"])
    assert "fold 4: privacy_report.json not found" in notes and "fold 3" in notes and "clip_norm" in notes
    assert "4 of the 5 fold models" in notes
    on_disk = load_json(run_dir / "cv_summary.json")
    assert on_disk["mean"]["1"]["Dice"] == pytest.approx(cv["mean"]["1"]["Dice"])
    md = (run_dir / "cv_summary.md").read_text()
    assert "| 1 a | Dice |" in md and "not reported" in md and "4 of the 5" in md


def test_cross_validation_errors(tmp_path):
    run_dir = tmp_path / "run"
    _make_run(run_dir)
    with pytest.raises(DpunetError, match="fold_5"):
        summarize_cross_validation(run_dir, [0, 5])
    dup = load_json(run_dir / "fold_0" / "private" / "validation" / "summary.json")
    write_json(dup, run_dir / "fold_1" / "private" / "validation" / "summary.json")
    with pytest.raises(DpunetError, match="c0_0.*fold 0"):
        summarize_cross_validation(run_dir, [0, 1])
    other = load_json(run_dir / "fold_2" / "private" / "validation" / "summary.json")
    other["settings"]["nsd_tolerance_mm"] = 2.0
    write_json(other, run_dir / "fold_2" / "private" / "validation" / "summary.json")
    with pytest.raises(DpunetError, match="settings differ"):
        summarize_cross_validation(run_dir, [3, 2])


def test_cv_summary_cli(dpunet_env, capsys):
    run_dir = dpunet_env["results"] / "Task04_Hippocampus" / run_folder_name("unet", "3d_fullres", 8.0)
    _make_run(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        cv_main(["-t", "4", "-c", "3d_fullres", "--eps", "8", "-f", "0", "1", "2"])
    assert exit_info.value.code == 0
    assert load_json(run_dir / "cv_summary.json")["folds"] == [0, 1, 2]
    assert "only folds [0, 1, 2]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cv_main(["-t", "4", "-c", "3d_fullres", "--eps", "inf"])
    assert exit_info.value.code == 2
    assert "eps" in capsys.readouterr().err


def test_format_epsilon():
    assert format_epsilon(8.0) == "8" and format_epsilon(8) == "8"
    assert format_epsilon(float("inf")) == "inf"
    assert format_epsilon(0.5) == "0.5" and format_epsilon(2.25) == "2.25"
    assert run_folder_name("unet", "2d", 1.0) == "unet__2d__eps1"
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DpunetError):
            format_epsilon(bad)


# ---------------------------------------------------------------- corrupt inputs and bad options

def _truncate(path: Path, keep_fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.mark.parametrize("which", ["pred", "ref"])
def test_truncated_file_is_refused_not_scored(folders, which):
    ref_dir, pred_dir, _ = folders
    broken = (pred_dir if which == "pred" else ref_dir) / "case_001.nii.gz"
    _truncate(broken)
    with pytest.raises(DpunetError, match="truncated") as e:
        evaluate_folder(ref_dir, pred_dir, LABELS, None, 0)
    assert str(broken) in str(e.value)
    done = _run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "1", "2")
    assert done.returncode == 2 and done.stderr.startswith("dpunet error:") and str(broken) in done.stderr
    assert "Traceback" not in done.stderr and not (pred_dir / "summary.json").exists()


def _task_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    write_json({"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}, "training": []},
               raw / "Task07_Tiny" / "dataset.json")
    return raw


def test_undeclared_label_values_are_warned_about(folders, tmp_path):
    ref_dir, pred_dir, cases = folders
    ref, pred = cases["case_002"]
    pred = pred.copy()
    pred[0, 0, :3] = 7
    write_segmentation(pred, GEOMETRY, pred_dir / "case_002.nii.gz")
    summary = evaluate_folder(ref_dir, pred_dir, LABELS, None, 0, declared_labels=[0, 1, 2])
    (warning,) = summary["warnings"]
    assert "[7]" in warning and "case_002" in warning and "prediction" in warning
    assert "undeclared" not in summary["metric_per_case"][0]
    done = _run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-t", "7",
                    env_extra={"DPUNET_RAW": str(_task_raw(tmp_path))})
    assert done.returncode == 0, done.stderr
    assert "dpunet warning:" in done.stderr and "[7]" in done.stderr and "case_002" in done.stderr


def test_output_is_checked_before_any_work(folders, tmp_path):
    ref_dir, pred_dir, _ = folders
    _truncate(pred_dir / "case_000.nii.gz")  # evaluating would fail on this file: the -o check comes first
    folder = tmp_path / "a_folder"
    folder.mkdir()
    done = _run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "1", "-o", str(folder))
    assert done.returncode == 2 and "dpunet error:" in done.stderr and "is a folder" in done.stderr
    assert "Traceback" not in done.stderr and list(folder.iterdir()) == []
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    done = _run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "1", "-o", str(a_file / "s.json"))
    assert done.returncode == 2 and "is a file" in done.stderr and "Traceback" not in done.stderr
