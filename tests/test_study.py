"""dpunet_study: run identity, spec validation, executors (local, Slurm parameters without a cluster), the
acceptance study (killed in the middle, resumed, report checked against an independent Dice), status, commands."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dpunet.evaluation.cross_validation import run_folder_name
from dpunet.study.spec import load_spec, parse_spec
from dpunet.utils.errors import DpunetError
from tests.conftest import plan_synthetic_task

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHS = ("unet", "unet_ws")
EPSILONS = ("8", "inf")


# --------------------------------------------------------------------------------------------- identity
def test_run_identity_keeps_old_names_and_appends_only_non_default_factors():
    assert run_folder_name("unet", "2d", 8.0) == "unet__2d__eps8"
    assert run_folder_name("unet", "2d", 8.0, width=1.0, seed=0, init_from="random_images", run_tag="") == \
        "unet__2d__eps8"
    assert run_folder_name("unet", "2d", 8.0, width=0.25, seed=1, init_from="none") == \
        "unet__2d__eps8__w0.25__seed1__init-none"
    assert run_folder_name("segresnet", "3d_fullres", math.inf, run_tag="h1a2b3c4d") == \
        "segresnet__3d_fullres__epsinf__h1a2b3c4d"
    # two checkpoints with one file name stay apart, and no '/' enters the name
    a = run_folder_name("unet", "2d", 8, init_from="/a/model.pt")
    b = run_folder_name("unet", "2d", 8, init_from="/b/model.pt")
    assert a != b and "/" not in a and a.startswith("unet__2d__eps8__init-model-")
    names = {run_folder_name("unet", "2d", e, width=w, seed=s) for e in (1, 8, math.inf) for w in (0.5, 1)
             for s in (0, 1)}
    assert len(names) == 12
    with pytest.raises(DpunetError, match="run tag"):
        run_folder_name("unet", "2d", 8, run_tag="a/b")


def test_trainer_and_predictor_name_a_run_alike(tmp_path, monkeypatch):
    from dpunet.inference.predictor import run_directory as predictor_run_directory
    from dpunet.training.config import TrainingConfig
    from dpunet.training.trainer import run_directory

    monkeypatch.setenv("DPUNET_RESULTS", str(tmp_path))
    cfg = TrainingConfig(task="Task990_X", configuration="2d", fold="0", width=0.5, seed=2, init_from="none",
                         run_tag="hdeadbeef", epsilon=8.0)
    fold_dir = run_directory(cfg)
    assert fold_dir == tmp_path / "Task990_X" / "unet__2d__eps8__w0.5__seed2__init-none__hdeadbeef" / "fold_0"
    fold_dir.mkdir(parents=True)
    identity = {"width": 0.5, "seed": 2, "init_from": "none", "run_tag": "hdeadbeef"}
    assert predictor_run_directory("Task990_X", "2d", 8.0, "unet", identity) == fold_dir.parent
    with pytest.raises(DpunetError, match="--width 0.5 --seed 3 --init-from none --run-tag hdeadbeef"):
        predictor_run_directory("Task990_X", "2d", 8.0, "unet", {**identity, "seed": 3})


# ------------------------------------------------------------------------------------------------- spec
BASE = {"name": "s", "tasks": [{"task": 4, "configuration": "2d", "overrides": {"steps": 5}}],
        "architectures": ["unet", "unet_ws"], "epsilons": [1, 8, "inf"]}


def test_cells_are_the_cross_product_with_subgrids_exclusions_and_overrides(tmp_path):
    raw = {**BASE, "tasks": BASE["tasks"] + [{"task": 4, "configuration": "2d", "overrides": {"steps": 5},
                                              "epsilons": [8], "seeds": [1]}],
           "exclude": [{"arch": "unet_ws", "epsilon": 1}], "arch_overrides": {"unet_ws": {"learning_rate": 0.001}},
           "widths": [0.25]}
    spec = parse_spec(raw, tmp_path / "s.yaml")
    got = {(c.arch, c.epsilon, c.seed) for c in spec.cells}
    assert got == {("unet", 1, 0), ("unet", 8, 0), ("unet", math.inf, 0), ("unet_ws", 8, 0),
                   ("unet_ws", math.inf, 0), ("unet", 8, 1), ("unet_ws", 8, 1)}
    assert len({c.key for c in spec.cells}) == len(spec.cells) == 7
    ws = next(c for c in spec.cells if c.arch == "unet_ws")
    assert ws.override_dict == {"steps": 5, "learning_rate": 0.001} and ws.width == 0.25
    unet = next(c for c in spec.cells if c.arch == "unet")
    assert unet.run_tag != ws.run_tag and unet.run_name.startswith("unet__2d__eps")
    # the issue's form: width among the overrides is the width factor
    spec = parse_spec({**BASE, "tasks": [{"task": 4, "configuration": "2d", "overrides": {"width": 0.5}}]},
                      tmp_path / "s.yaml")
    assert {c.width for c in spec.cells} == {0.5} and all(not c.overrides for c in spec.cells)


@pytest.mark.parametrize("change,text", [
    ({"epsilons": [0]}, "epsilons: epsilon must be positive"),
    ({"epsilons": ["eight"]}, "epsilons: epsilon 'eight' is not a number"),
    ({"architectures": []}, "architectures: an empty list"),
    ({"colour": 1}, "colour: unknown key"),
    ({"tasks": [{"task": 4}]}, r"tasks\[0\].configuration: missing"),
    ({"tasks": [{"task": 4, "configuration": "2d", "overrides": {"stepz": 3}}]}, "overrides.stepz: unknown training"),
    ({"tasks": [{"task": 4, "configuration": "2d", "overrides": {"seed": 3}}]}, "overrides.seed: is a factor"),
    ({"exclude": [{"arch": "unet"}, {"arch": "unet_ws"}]}, "every cell is excluded"),
    ({"executor": {"kind": "kubernetes"}}, "executor.kind"),
    ({"executor": {"kind": "slurm"}}, "executor.partition: a Slurm executor needs a partition"),
    ({"executor": {"kind": "local", "parallel": 0}}, "executor.parallel: expected an integer >= 1"),
    ({"executor": {"kind": "local", "partition": "gpu"}}, "executor.partition: unknown key"),
])
def test_spec_errors_name_the_file_and_key(tmp_path, change, text):
    with pytest.raises(DpunetError, match=text) as e:
        parse_spec({**BASE, **change}, tmp_path / "bad.yaml")
    assert str(tmp_path / "bad.yaml") in str(e.value)


def test_malformed_or_missing_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "x.yaml").write_text("name: [unclosed\n")
    with pytest.raises(DpunetError, match="not valid YAML"):
        load_spec(tmp_path / "x.yaml")
    with pytest.raises(DpunetError, match="study spec not found"):
        load_spec(tmp_path / "none.yaml")


def test_slurm_executor_is_configured_without_a_cluster(tmp_path):
    from dpunet.study.runner import slurm_parameters, slurm_sbatch_preview

    raw = {**BASE, "executor": {"kind": "slurm", "partition": "gpu", "gpus_per_node": 1, "timeout_min": 240,
                                "cpus_per_task": 8, "mem_gb": 64, "array_parallelism": 16, "account": "dp"}}
    spec = parse_spec(raw, tmp_path / "s.yaml")
    spec.folder = tmp_path / "study"
    params = slurm_parameters(spec.executor, spec.name)
    assert (params["partition"], params["gpus_per_node"], params["time"], params["cpus_per_task"]) == \
        ("gpu", 1, 240, 8)
    assert params["mem"] == "64GB" and params["array_parallelism"] == 16 and params["account"] == "dp"
    # submitit's own sbatch text for these parameters (what a cluster would receive for each cell)
    text = slurm_sbatch_preview(spec)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=240",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --account=dp",
                 "#SBATCH --job-name=dpunet_study_s"):
        assert line in text, line
    with pytest.raises(DpunetError, match="executor.mem_gb"):
        parse_spec({**raw, "executor": {**raw["executor"], "mem_gb": "lots"}}, tmp_path / "s.yaml")


def test_holm_and_bootstrap_against_hand_computed_values():
    from dpunet.study.report import bootstrap_ci, holm

    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1, made monotone
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06) and math.isnan(adjusted["d"])
    lo, hi = bootstrap_ci([0.5] * 10)
    assert lo == hi == 0.5
    values = np.random.default_rng(1).normal(0.6, 0.1, 200)
    lo, hi = bootstrap_ci(values)
    sem = values.std(ddof=1) / math.sqrt(values.size)
    assert lo == pytest.approx(values.mean() - 1.96 * sem, abs=0.01)
    assert hi == pytest.approx(values.mean() + 1.96 * sem, abs=0.01)


# ------------------------------------------------------------------------------------- acceptance study
def _write_spec(path: Path, executor: str = "{kind: local, parallel: 1, threads: 1}") -> Path:
    path.write_text(
        "name: tiny\n"
        "tasks:\n"
        "  - {task: 990, configuration: 2d, overrides: {steps: 3, engine: functorch, augmentation: false,"
        " patients_per_micro_batch: 3}}\n"
        f"architectures: [{', '.join(ARCHS)}]\n"
        f"epsilons: [{', '.join(EPSILONS)}]\n"
        "folds: [0]\n"
        "init: [none]\n"
        f"executor: {executor}\n")
    return path


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    return plan_synthetic_task(tmp_path_factory.mktemp("study_task"), "-c", "2d", "--width", "0.25", "--steps", "3",
                               "--patients-per-step", "3", "--patches-per-patient", "2")


def _env(roots: dict[str, Path]) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.update({f"DPUNET_{k.upper()}": str(v) for k, v in roots.items()})
    return env


def _study(roots: dict[str, Path], *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpunet.study.cli", *args], env=_env(roots),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _dice_from_files(pred_dir: Path, label_dir: Path, labels: list[int]) -> float:
    """Mean over labels of the mean over cases of numpy Dice (cases where both masks are empty left out)."""
    per_label = {lab: [] for lab in labels}
    for pred_file in sorted(pred_dir.glob("*.nii.gz")):
        pred = np.asarray(nib.load(pred_file).dataobj)
        ref = np.asarray(nib.load(label_dir / pred_file.name).dataobj)
        for lab in labels:
            p, r = pred == lab, ref == lab
            if p.sum() + r.sum():
                per_label[lab].append(2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return float(np.mean([np.mean(v) for v in per_label.values() if v]))


def test_tiny_study_resumes_and_reports_in_process(tiny_task, tmp_path, use_roots):
    """The fast variant (submitit's DebugExecutor, in this process): a first session stops after one cell, the
    second runs the rest only; the slow test below kills a local-executor study for real."""
    from dpunet.study.report import write_report
    from dpunet.study.runner import run_study

    use_roots(tiny_task)
    spec = load_spec(_write_spec(tmp_path / "tiny.yaml", "{kind: debug}"), tmp_path / "study")
    first = spec.cells[0]
    assert run_study(spec, only=[first.key], say=lambda s: None)["done"] == 1
    marker = spec.folder / "cells" / first.key / "done.json"
    before = (marker.stat().st_mtime_ns, marker.read_text())
    started = []
    counts = run_study(spec, say=started.append)
    assert counts == {"done": 3, "failed": 0, "submitted": 3}
    assert f"start {first.key}" not in started and (marker.stat().st_mtime_ns, marker.read_text()) == before
    assert run_study(spec, say=lambda s: None) == {"done": 0, "failed": 0, "submitted": 0}
    write_report(spec)
    _check_results(tiny_task, spec.folder)
    if importlib.util.find_spec("mlflow"):  # the optional MLflow log, through the command (test extra installs it)
        from dpunet.study.cli import main as study_main

        with pytest.raises(SystemExit) as done:
            study_main(["report", str(spec.path), "--folder", str(spec.folder), "--mlflow"])
        assert done.value.code == 0 and (spec.folder / "mlruns").is_dir()


@pytest.mark.slow
def test_study_killed_in_the_middle_resumes_without_rerunning_finished_cells(tiny_task, tmp_path):
    from dpunet.study.report import write_report

    roots = tiny_task
    spec_path = _write_spec(tmp_path / "tiny.yaml")
    folder = roots["results"] / "studies" / "tiny"
    proc = _study(roots, "run", str(spec_path), start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(folder.glob("cells/*/done.json")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no cell finished in 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study command and its submitit workers
    proc.wait()
    proc.stdout.close()
    finished = {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in folder.glob("cells/*/done.json")}
    assert 1 <= len(finished) < len(ARCHS) * len(EPSILONS)

    status = _study(roots, "status", str(spec_path))
    out = status.communicate(timeout=120)[0]
    assert f"done {len(finished)} " in out and f"{len(finished)}/{len(ARCHS) * len(EPSILONS)}" in out, out
    commands = _study(roots, "commands", str(spec_path)).communicate(timeout=120)[0].strip().splitlines()
    assert len(commands) == len(ARCHS) * len(EPSILONS) - len(finished)
    assert all("dpunet_study run-cell" in line and str(spec_path.resolve()) in line for line in commands)

    rerun = _study(roots, "run", str(spec_path))
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out[-3000:]
    for key, (mtime, text) in finished.items():  # not rerun: the marker is untouched
        marker = folder / "cells" / key / "done.json"
        assert marker.stat().st_mtime_ns == mtime and marker.read_text() == text
        assert f"start {key}" not in out

    with pytest.MonkeyPatch.context() as mp:
        for k, v in roots.items():
            mp.setenv(f"DPUNET_{k.upper()}", str(v))
        spec = load_spec(spec_path)
        write_report(spec)
    _check_results(roots, folder)


def _check_results(roots: dict[str, Path], folder: Path) -> None:
    """results.csv has one row per cell, privacy figures per epsilon, and a Dice equal to numpy's on the files."""
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["arch"], r["epsilon"]) for r in rows) == sorted((a, e) for a in ARCHS for e in EPSILONS)
    assert all(r["status"] == "done" and r["fold"] == "0" for r in rows)
    assert {r["epsilon_prv"] for r in rows if r["epsilon"] == "inf"} == {"inf"}
    assert all(0 < float(r["epsilon_prv"]) <= 8.0 for r in rows if r["epsilon"] == "8")
    row = next(r for r in rows if (r["arch"], r["epsilon"]) == ("unet", "8"))
    fold_dir = roots["results"] / "Task990_Synthetic3D" / row["run_name"] / "fold_0"
    expected = _dice_from_files(fold_dir / "private" / "validation", roots["raw"] / "Task990_Synthetic3D" / "labelsTr",
                                [1, 2])
    assert float(row["dice_mean"]) == pytest.approx(expected, abs=1e-5)
    report = (folder / "report.md").read_text()
    assert "epsilon 8" in report and "Budget of every cell" in report
    assert all((folder / name).stat().st_size > 0 for name in ("score_vs_epsilon.png", "dp_gap.png"))


def test_a_failed_cell_is_recorded_and_the_study_goes_on(tiny_task, tmp_path, use_roots, capsys):
    from dpunet.study.runner import run_study
    from dpunet.study.status import format_status

    use_roots(tiny_task)
    spec = load_spec(_write_spec(tmp_path / "fail.yaml", "{kind: debug}"), tmp_path / "study")
    spec.cells = spec.cells[:2]
    broken = spec.cells[0].__class__(**{**spec.cells[0].__dict__, "configuration": "3d_lowres"})
    spec.cells[0] = broken  # not planned: the trainer refuses it
    counts = run_study(spec, say=lambda s: None)
    assert counts == {"done": 1, "failed": 1, "submitted": 2}
    error = (spec.folder / "cells" / broken.key / "error.txt").read_text()
    assert "3d_lowres" in error and "not planned" in error
    assert f"failed {broken.key}" in format_status(spec)


# ----------------------------------------------------------------------------------- CamVid resolution
def _tiny_camvid(folder: Path, size: tuple[int, int] = (8, 12)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    for images, labels in (("train", "trainannot"), ("val", "valannot")):
        (folder / images).mkdir(parents=True)
        (folder / labels).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / images / f"f{i}.png")
            Image.fromarray(rng.integers(0, 12, size, dtype=np.uint8)).save(folder / labels / f"f{i}.png")
    return folder


def test_camvid_downsample_averages_images_takes_block_majority_labels_and_is_recorded(tmp_path):
    from PIL import Image

    from dataset_conversion.convert_camvid import convert_camvid

    source = _tiny_camvid(tmp_path / "camvid")
    folder = convert_camvid(source, tmp_path / "raw", task_id=102, downsample=2)
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["downsample"] == 2 and "downsampled 2x" in dataset["description"]
    from dpunet.dataset.io import read_label

    image_nii = nib.load(folder / "imagesTr" / "camvid_f0.nii.gz")
    label, geometry = read_label(folder / "labelsTr" / "camvid_f0.nii.gz")
    assert label.shape == (1, 4, 6) and tuple(geometry.spacing) == (1.0, 2.0, 2.0)
    rgb = np.asarray(Image.open(source / "train" / "f0.png").convert("RGB")).astype(float)
    raw_label = np.asarray(Image.open(source / "trainannot" / "f0.png"))
    # independent oracle: loops over the 2x2 blocks
    for y in range(4):
        for x in range(6):
            block = raw_label[2 * y:2 * y + 2, 2 * x:2 * x + 2].ravel()
            values, counts = np.unique(block, return_counts=True)
            assert label[0, y, x] == values[counts == counts.max()].min()
    image = np.asarray(image_nii.dataobj).squeeze()
    assert image.size == 4 * 6 * 3 and np.isclose(image.astype(float).mean(), rgb.mean(), atol=0.5)
    assert sorted(float(z) for z in image_nii.header.get_zooms()[:2]) == [2.0, 2.0]
    with pytest.raises(DpunetError, match="--downsample 2; convert --downsample 4 into another task id"):
        convert_camvid(source, tmp_path / "raw", task_id=102, downsample=4)
    with pytest.raises(DpunetError, match="--downsample must be one of"):
        convert_camvid(source, tmp_path / "raw", task_id=103, downsample=3)


def test_committed_study_specs_parse_and_cover_the_issue_grid(monkeypatch, tmp_path):
    from tests.conftest import REPO

    monkeypatch.setenv("DPUNET_RESULTS", str(tmp_path))
    quick = load_spec(REPO / "studies" / "quick_cpu.yaml")
    cells = quick.cells
    hippo_2d = [c for c in cells if (c.task, c.configuration) == ("4", "2d")]
    archs_2d = {c.arch for c in hippo_2d}
    assert len(archs_2d) >= 10
    for arch in archs_2d:
        assert {(c.epsilon, c.seed) for c in hippo_2d if c.arch == arch} == {(1, 0), (8, 0), (math.inf, 0), (8, 1)}
    assert len({c.arch for c in cells if c.configuration == "3d_fullres"}) >= 5
    assert len({c.arch for c in cells if c.task == "102"}) >= 6
    assert {c.epsilon for c in cells if c.configuration == "3d_fullres" or c.task == "102"} == {8, math.inf}
    # a fair comparison: one budget per task and configuration, every architecture at one common width, and the
    # width effect measured on the baseline only
    for key in {(c.task, c.configuration) for c in cells}:
        assert len({c.overrides for c in cells if (c.task, c.configuration) == key}) == 1
        assert {c.arch for c in cells if (c.task, c.configuration) == key and c.width != 0.25} <= {"unet"}
    assert {c.width for c in hippo_2d if c.arch == "unet"} == {0.125, 0.25, 0.5}
    full = load_spec(REPO / "studies" / "full_gpu.yaml")
    assert {c.fold for c in full.cells} == {"0", "1", "2", "3", "4"} and {c.seed for c in full.cells} == {0, 1, 2}
    assert {c.epsilon for c in full.cells} == {1, 2, 4, 8, math.inf} and len(full.cells) == 5700


def test_an_interrupted_cell_continues_from_its_checkpoint(tiny_task, tmp_path, use_roots):
    from dpunet.study.cells import execute_cell
    from dpunet.study.runner import pending_cells
    from dpunet.study.status import cell_states
    from dpunet.training.config import merge_plan_and_options
    from dpunet.training.trainer import DPTrainer, load_training_inputs

    use_roots(tiny_task)
    spec_path = _write_spec(tmp_path / "resume.yaml", "{kind: debug}")
    spec_path.write_text(spec_path.read_text() + "seeds: [7]\n")
    spec = load_spec(spec_path, tmp_path / "study")
    cell = spec.cells[0]
    # a session that ended after one of the three steps (checkpoint written, as at a kill after a checkpoint),
    # with its running marker left behind by a process that no longer exists
    task_name, _, plan_config, _, _ = load_training_inputs(cell.task, cell.configuration)
    cfg = merge_plan_and_options(plan_config, {**cell.train_options(), "task": task_name, "device": "cpu"})
    assert DPTrainer(cfg).run(stop_after_steps=1) is None
    marker = spec.folder / "cells" / cell.key / "running.json"
    marker.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid, "started": 0}))
    assert cell_states(spec)[cell.key] == "interrupted" and cell in pending_cells(spec)
    done = execute_cell(cell, spec.folder)
    report = json.loads(Path(done["privacy_report"]).read_text())
    assert report["steps_taken"] == 3
    log = (Path(done["fold_dir"]) / "private" / "training_log.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3"]  # step 1 kept, 2 and 3 added by the resume


def test_pooled_miou_sums_counts_over_cases_and_its_bootstrap_brackets_it():
    from dpunet.study.report import _pooled_miou, bootstrap_pooled_miou_ci, case_counts, pooled_iou

    summary = {"metric_per_case": [
        {"case_id": "a", "metrics": {"1": {"TP": 10, "FP": 0, "FN": 10}, "2": {"TP": 0, "FP": 5, "FN": 0}}},
        {"case_id": "b", "metrics": {"1": {"TP": 30, "FP": 10, "FN": 0}, "2": {"TP": 5, "FP": 0, "FN": 5}}},
        {"case_id": "c", "metrics": {"1": {"TP": 0, "FP": 0, "FN": 0}, "2": {"TP": 5, "FP": 5, "FN": 0}}}]}
    # by hand: label 1 TP 40 / (40 + 10 + 10) = 2/3; label 2 TP 10 / (10 + 10 + 5) = 0.4
    assert pooled_iou(summary) == pytest.approx({"1": 2 / 3, "2": 0.4})
    counts = np.stack(list(case_counts(summary).values()))
    assert float(_pooled_miou(counts)) == pytest.approx((2 / 3 + 0.4) / 2)
    lo, hi = bootstrap_pooled_miou_ci(counts)
    assert lo <= (2 / 3 + 0.4) / 2 <= hi
    assert bootstrap_pooled_miou_ci(np.stack([counts[1]] * 5)) == pytest.approx((0.625, 0.625))  # (0.75 + 0.5) / 2


def test_cv_summary_finds_a_run_by_the_same_identity_options(tmp_path, use_roots, capsys):
    from dpunet.evaluation import cross_validation

    roots = use_roots({"raw": tmp_path / "raw", "preprocessed": tmp_path / "pre", "results": tmp_path / "res"})
    (roots["results"] / "Task990_X").mkdir(parents=True)
    with pytest.raises(SystemExit) as done:
        cross_validation.main(["-t", "Task990_X", "-c", "2d", "--eps", "8", "--width", "0.5", "--seed", "1",
                               "--run-tag", "habc", "-f", "0"])
    assert done.value.code == 2
    assert "unet__2d__eps8__w0.5__seed1__habc: run folder not found" in capsys.readouterr().err


def test_width_plot_appears_when_a_study_varies_the_width(tmp_path):
    from dpunet.study.report import make_plots

    rows, table = [], []
    for width, score in ((0.25, 0.3), (0.5, 0.4)):
        rows.append({"status": "done", "task_name": "T", "configuration": "2d", "arch": "unet", "epsilon": "8",
                     "width": width, "score": score})
        table.append({"task": "T", "configuration": "2d", "epsilon": "8", "arch": "unet", "mean": score,
                      "dp_gap": math.nan, "parameters": 1000 * width, "score_metric": "foreground Dice"})
    written = make_plots(table, rows, tmp_path, "s")
    assert [p.name for p in written] == ["score_vs_epsilon.png", "dp_gap.png", "score_vs_parameters.png",
                                         "score_vs_width.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert len(make_plots(table, rows[:1], tmp_path / "one", "s")) == 3


def test_report_ranks_a_width_study_apart_from_the_common_width():
    """Cells of the baseline at other widths are their own rows (never pooled into the common width's mean), with
    their own DP gap and a paired test against the baseline at the common width."""
    from dpunet.study.report import arch_labels, arch_table, summary_tables

    rows, scores = [], {}
    cells = [("unet", 0.25, "8", 0.3), ("unet", 0.25, "inf", 0.6), ("unet_ws", 0.25, "8", 0.35),
             ("unet_ws", 0.25, "inf", 0.7), ("unet", 0.5, "8", 0.2), ("unet", 0.5, "inf", 0.8)]
    for i, (arch, width, eps, score) in enumerate(cells):
        key = f"c{i}"
        rows.append({"key": key, "status": "done", "task": "4", "task_name": "T", "configuration": "2d",
                     "arch": arch, "epsilon": eps, "width": width, "score": score, "score_metric": "Dice",
                     "trained_parameters": int(1000 * width)})
        scores[key] = {f"case{j}": score + 0.01 * j for j in range(6)}
    labels = arch_labels(rows)
    assert [labels[f"c{i}"] for i in range(6)] == ["unet", "unet", "unet_ws", "unet_ws", "unet (width 0.5)",
                                                  "unet (width 0.5)"]
    table = {(r["epsilon"], r["arch"]): r for r in arch_table(rows, scores)}
    assert len(table) == 6 and table[("8", "unet")]["mean"] == pytest.approx(0.3)
    assert table[("8", "unet (width 0.5)")]["mean"] == pytest.approx(0.2)
    assert table[("8", "unet (width 0.5)")]["dp_gap"] == pytest.approx(0.2 / 0.8)
    assert table[("8", "unet (width 0.5)")]["n_pairs"] == 6 and math.isnan(table[("8", "unet")]["p_raw"])
    # the summary: one row per ranked name, ranked by the private score, with each DP gap
    summary = summary_tables(list(table.values()))
    rows_md = [line for line in summary if line.startswith("| unet")]
    assert rows_md == ["| unet_ws | 0.350 | 0.700 | 0.50 | 250 |", "| unet | 0.300 | 0.600 | 0.50 | 250 |",
                       "| unet (width 0.5) | 0.200 | 0.800 | 0.25 | 500 |"]


def test_parallel_cells_start_with_one_cell_per_pretraining_group(tmp_path, monkeypatch):
    from dpunet.study.runner import pretraining_first_order

    monkeypatch.setenv("DPUNET_RESULTS", str(tmp_path))
    spec = parse_spec({**BASE, "seeds": [0, 1]}, tmp_path / "s.yaml")  # 2 archs x 2 seeds = 4 groups of 3 epsilons
    ordered = pretraining_first_order(spec.cells)
    assert sorted(c.key for c in ordered) == sorted(c.key for c in spec.cells)
    first = [(c.arch, c.seed) for c in ordered[:4]]
    assert len(set(first)) == 4  # the 4 pretrainings are made before any cell could wait on or repeat one


# ------------------------------------------------------------------------------------- MLflow (optional)
def _rows() -> list[dict]:
    done = {"key": "990__unet__2d__eps8__fold0", "status": "done", "task": "990", "configuration": "2d",
            "arch": "unet", "width": 0.25, "epsilon": "8", "fold": "0", "seed": 0, "init": "none", "overrides": "{}",
            "run_name": "unet__2d__eps8", "score_metric": "foreground Dice", "epsilon_prv": 7.99,
            "dice_mean": 0.41, "hd95_1": float("nan"), "wall_seconds": 12.5, "parameters": 1234}
    pending = {"key": "990__unet__2d__epsinf__fold0", "status": "pending", "task": "990", "arch": "unet"}
    return [done, pending]


def test_spec_mlflow_entry_is_validated(tmp_path):
    spec_path = _write_spec(tmp_path / "tiny.yaml")
    text = spec_path.read_text()
    assert load_spec(spec_path).mlflow is None
    spec_path.write_text(text + "mlflow: true\n")
    assert load_spec(spec_path).mlflow == {"experiment": None, "tracking_uri": None}
    spec_path.write_text(text + "mlflow: {tracking_uri: 'http://tracking:5000', experiment: grid}\n")
    assert load_spec(spec_path).mlflow == {"experiment": "grid", "tracking_uri": "http://tracking:5000"}
    spec_path.write_text(text + "mlflow: {uri: x}\n")
    with pytest.raises(DpunetError, match="mlflow: expected true or a mapping"):
        load_spec(spec_path)


def test_without_mlflow_installed_the_message_says_what_to_install(tmp_path, monkeypatch):
    from dpunet.study.tracking import log_cells

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(DpunetError, match="pip install mlflow-skinny"):
        log_cells(_rows(), "tiny", tmp_path, {"tracking_uri": None, "experiment": None})


def test_finished_cells_are_logged_once_and_updated(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the optional MLflow logging needs mlflow-skinny")
    from dpunet.study.tracking import CELL_TAG, default_tracking_uri, log_cells

    rows = _rows()
    setting = {"tracking_uri": None, "experiment": None}
    where = {"tracking_uri": default_tracking_uri(tmp_path), "experiment": "tiny"}
    assert log_cells(rows, "tiny", tmp_path, setting) == {"created": 1, "updated": 0, **where}
    rows[0]["dice_mean"] = 0.43
    assert log_cells(rows, "tiny", tmp_path, setting) == {"created": 0, "updated": 1, **where}
    client = mlflow.tracking.MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[CELL_TAG] == rows[0]["key"]
    assert runs[0].data.params["arch"] == "unet" and runs[0].data.params["epsilon"] == "8"
    metrics = runs[0].data.metrics
    assert metrics["dice_mean"] == pytest.approx(0.43) and metrics["epsilon_prv"] == pytest.approx(7.99)
    assert metrics["parameters"] == 1234 and "hd95_1" not in metrics  # NaN is left out, not logged
    assert (tmp_path / "mlruns").is_dir()


def test_report_mlflow_option_and_spec_entry_combine(tmp_path, monkeypatch):
    """--mlflow URI replaces the spec's store, a bare --mlflow keeps it; without either nothing is logged."""
    from dpunet.study import report, tracking
    from dpunet.study.cli import main as study_main

    monkeypatch.setattr(report, "write_report", lambda spec, folder=None: {"rows": _rows(), "files": []})
    seen = []
    monkeypatch.setattr(tracking, "log_cells", lambda rows, name, folder, setting: seen.append(dict(setting)) or {
        "created": 1, "updated": 0, "tracking_uri": setting["tracking_uri"], "experiment": name})
    spec_path = _write_spec(tmp_path / "tiny.yaml")
    plain = spec_path.read_text()
    with_store = tmp_path / "store.yaml"
    with_store.write_text(plain + "mlflow: {tracking_uri: 'http://tracking:5000', experiment: grid}\n")
    for spec, options, expected in ((spec_path, [], None),
                                    (spec_path, ["--mlflow"], {"tracking_uri": None, "experiment": None}),
                                    (with_store, ["--mlflow"], {"tracking_uri": "http://tracking:5000",
                                                                "experiment": "grid"}),
                                    (with_store, ["--mlflow", "sqlite:///x.db"], {"tracking_uri": "sqlite:///x.db",
                                                                                  "experiment": "grid"})):
        seen.clear()
        with pytest.raises(SystemExit) as done:
            study_main(["report", str(spec), "--folder", str(tmp_path / "study"), *options])
        assert done.value.code == 0 and seen == ([] if expected is None else [expected])
