"""One cell of a study, run as an ordinary dpunet run: train one fold (resuming an interrupted training with the
trainer's own `--continue`), validate on the fold's held-out patients, predict and evaluate the task's labelled
test set when it has one, and write the cell's markers in the study folder:

    <study>/cells/<key>/running.json   while it runs (host, pid, start)
    <study>/cells/<key>/done.json      when every output exists (the run folder, metrics, times, memory)
    <study>/cells/<key>/error.txt      when it failed (the traceback); the study goes on with the other cells
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from dpunet.study.spec import Cell
from dpunet.utils.files import load_json, write_json, write_text

DONE, RUNNING, ERROR = "done.json", "running.json", "error.txt"


def cell_folder(study_folder: Path, cell: Cell) -> Path:
    return Path(study_folder) / "cells" / cell.key


def is_done(study_folder: Path, cell: Cell) -> bool:
    """Done = the done marker exists and the outputs it names are still there."""
    marker = cell_folder(study_folder, cell) / DONE
    if not marker.is_file():
        return False
    done = load_json(marker)
    return all(Path(p).is_file() for p in done.get("outputs", []))


def _peak_memory_mb(device: str) -> dict[str, Optional[float]]:
    import resource

    import torch

    # ru_maxrss is in KiB on Linux: the process's peak resident memory (training, validation and prediction)
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "peak_gpu_mb": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _dp_step_seconds(log_path: Path) -> Optional[float]:
    """Median seconds of one training step from the private training log (None when it has no step times)."""
    import csv
    import statistics

    if not log_path.is_file():
        return None
    with open(log_path, newline="") as f:
        values = [float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds") not in (None, "")]
    return statistics.median(values) if values else None


def _train(cell: Cell, device: str) -> tuple[Path, Any]:
    """Train (or finish, or skip) the cell's fold; returns (fold folder, trainer config)."""
    from dpunet.release import CHECKPOINT_FILE, private_folder, release_folder
    from dpunet.training.config import merge_plan_and_options
    from dpunet.training.trainer import DPTrainer, load_training_inputs, run_directory

    task_name, _, plan_config, _, _ = load_training_inputs(cell.task, cell.configuration)
    options = {**cell.train_options(), "task": task_name}
    options.setdefault("device", device)
    cfg = merge_plan_and_options(plan_config, options)
    fold_dir = run_directory(cfg)
    trained = (release_folder(fold_dir) / "model_release.pt").is_file() and (
        not cfg.validation or (private_folder(fold_dir) / "validation" / "summary.json").is_file())
    if not trained:
        # an interrupted cell continues from its checkpoint (the trainer refuses changed privacy parameters)
        resume = (private_folder(fold_dir) / CHECKPOINT_FILE).is_file()
        DPTrainer(cfg).run(resume=resume)
    return fold_dir, cfg


def _test_set(task_name: str) -> Optional[tuple[Path, Path]]:
    """(imagesTs, labelsTs) of the raw task when both exist and hold files."""
    from dpunet.paths import raw_root

    images, labels = raw_root() / task_name / "imagesTs", raw_root() / task_name / "labelsTs"
    if images.is_dir() and labels.is_dir() and any(f.is_file() for f in labels.iterdir()):
        return images, labels
    return None


def _predict_and_evaluate_test(cell: Cell, cfg: Any, fold_dir: Path, device: str) -> Optional[Path]:
    """Predictions of the labelled test set and their summary.json under fold_X/private/test/ (None: no test set)."""
    test = _test_set(cfg.task)
    if test is None:
        return None
    from dpunet.dataset.msd import load_task
    from dpunet.evaluation.evaluate import evaluate_folder, write_summary
    from dpunet.inference.predictor import predict_folder
    from dpunet.paths import raw_root
    from dpunet.release import private_folder

    out = private_folder(fold_dir) / "test"
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return summary_path
    predictions = out / "predictions"
    if predictions.exists():
        import shutil

        shutil.rmtree(predictions)  # an interrupted prediction: start it again
    identity = {"width": cfg.width, "seed": cfg.seed, "init_from": cfg.init_from, "run_tag": cfg.run_tag}
    predict_folder(test[0], predictions, cfg.task, cfg.configuration, [cfg.fold], cfg.epsilon, cfg.arch,
                   use_mirroring=False, device=device, num_processes=0, progress=False, identity=identity)
    task = load_task(raw_root() / cfg.task)
    summary = evaluate_folder(test[1], predictions, task.labels, task.ignore_label, task.background_label)
    write_summary(summary, summary_path)
    return summary_path


def execute_cell(cell: Cell, study_folder: Path, predict_test: bool = True, device: Optional[str] = None
                 ) -> dict[str, Any]:
    """Run one cell to completion (or skip it when done) and write done.json; raises on failure."""
    import torch

    from dpunet.release import private_folder, release_folder

    folder = cell_folder(study_folder, cell)
    if is_done(study_folder, cell):
        return load_json(folder / DONE)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    fold_dir, cfg = _train(cell, device)
    test_summary = _predict_and_evaluate_test(cell, cfg, fold_dir, device) if predict_test else None
    validation = private_folder(fold_dir) / "validation" / "summary.json"
    report = release_folder(fold_dir) / "privacy_report.json"
    outputs = [str(release_folder(fold_dir) / "model_release.pt"), str(report)]
    outputs += [str(p) for p in (validation, test_summary) if p is not None and p.is_file()]
    previous = load_json(folder / "timing.json") if (folder / "timing.json").is_file() else {}
    done = {
        "cell": cell.factors(), "overrides": cell.override_dict, "key": cell.key, "run_name": cell.run_name,
        "task_name": cfg.task, "fold_dir": str(fold_dir),
        "validation_summary": str(validation) if validation.is_file() else None,
        "test_summary": str(test_summary) if test_summary else None, "privacy_report": str(report),
        "run_config": str(private_folder(fold_dir) / "run_config.json"),
        # wall time of this cell over all its sessions (an interrupted cell adds up its sessions)
        "wall_seconds": previous.get("seconds", 0.0) + time.time() - start,
        "dp_step_seconds": _dp_step_seconds(private_folder(fold_dir) / "training_log.csv"),
        "device": device, "host": socket.gethostname(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "outputs": outputs, **_peak_memory_mb(device),
    }
    write_json(done, folder / DONE)
    return done


def run_cell_job(cell: Cell, study_folder: str, predict_test: bool = True, threads: Optional[int] = None,
                 environment: Optional[dict[str, str]] = None) -> str:
    """What a submitit job runs: one cell with its markers. Never raises for a failed cell (the error goes to
    error.txt and the study goes on); returns 'done' or 'failed'."""
    os.environ.update(environment or {})
    if threads:
        import torch

        torch.set_num_threads(threads)
    study_folder_path = Path(study_folder)
    folder = cell_folder(study_folder_path, cell)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    write_json({"host": socket.gethostname(), "pid": os.getpid(), "started": start,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}, folder / RUNNING)
    (folder / ERROR).unlink(missing_ok=True)
    try:
        execute_cell(cell, study_folder_path, predict_test)
        status = "done"
    except Exception as e:  # noqa: BLE001 - recorded, then the study goes on
        write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}", folder / ERROR)
        status = "failed"
    # an interruption (Ctrl-C, SystemExit) is not a failure: the cell is pending again and continues next time
    finally:
        _add_session_time(folder, time.time() - start)
        (folder / RUNNING).unlink(missing_ok=True)
    return status


def _add_session_time(folder: Path, seconds: float) -> None:
    path = folder / "timing.json"
    timing = load_json(path) if path.is_file() else {"seconds": 0.0, "sessions": 0}
    if (folder / DONE).is_file() and timing.get("closed"):
        return
    timing = {"seconds": timing["seconds"] + seconds, "sessions": timing["sessions"] + 1,
              "closed": (folder / DONE).is_file()}
    write_json(timing, path)
