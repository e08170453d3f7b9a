"""Predict a folder of images with the trained fold models of one run (`dpunet_predict`, `predict_folder`).

Per case: read (MSD or nnU-Net channel naming) -> preprocess exactly as in training (the plan configuration
stored in the checkpoint) -> sliding window per fold model (Gaussian tiles, mirroring TTA over the plan's
mirror axes) -> softmax averaged over the folds -> preprocessing undone on the probabilities -> argmax ->
`<case>.nii.gz` in the input's geometry. Worker processes read/preprocess and restore/write; the networks run
in the main process, and the workers end when it dies. Every file in the output folder is written atomically,
and every input is checked (the verification's integrity checks) before anything is written. The output
folder receives the ensemble's privacy note last; until then it holds the PREDICTION_INCOMPLETE.txt marker.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dpunet.architectures import configuration_for_arch
from dpunet.evaluation.cross_validation import DEFAULT_INIT, format_epsilon, run_folder_name, with_planned_start
from dpunet.inference.case_io import (InputCase, check_input_channels, export_prediction, find_input_cases,
                                      input_case_problems, mark_complete, mark_incomplete, preprocess_input_case)
from dpunet.inference.ensemble_privacy import (PATIENT_HASH_SOURCE, case_to_patient_map, ensemble_privacy_note,
                                               patient_hash_membership, read_model_privacy, training_membership,
                                               write_privacy_note)
from dpunet.inference.sliding_window import predict_case
from dpunet.paths import preprocessed_root, raw_root, resolve_task, results_root
from dpunet.planning.plans import plans_file
from dpunet.preprocessing.preprocessor import config_fingerprint
from dpunet.release import (CHECKPOINT_FILE, MODEL_FILE, load_release, network_from_release, private_folder,
                            release_folder)
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import check_output_folder, load_json
from dpunet.utils.processes import exit_with_parent

DEFAULT_FOLDS = ("0", "1", "2", "3", "4")
DEFAULT_NUM_FOLDS = 5  # when splits_final.json is not at hand


@dataclass
class FoldModel:
    """One trained fold network, ready for inference, and what it was trained with."""

    fold: str
    network: nn.Module
    model_path: Path
    plan_configuration: dict[str, Any]
    num_classes: int
    num_channels: int
    weights_used: str  # "ema" or "final"

    @property
    def run_dir(self) -> Path:
        return self.model_path.parent


@dataclass
class PredictionSettings:
    step_size: float = 0.5
    use_mirroring: bool = True
    tile_batch_size: int = 4
    use_gaussian: bool = True


@dataclass
class PredictionResult:
    output_folder: Path
    case_ids: list[str]
    written: list[Path] = field(default_factory=list)
    privacy_note: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- locating runs
def normalise_folds(folds: Sequence[int | str] | int | str | None, num_folds: int = DEFAULT_NUM_FOLDS) -> list[str]:
    """Fold names ('0'..'n-1' or 'all'), checked, duplicates removed, order kept."""
    if folds is None:
        folds = list(DEFAULT_FOLDS[:num_folds])
    if isinstance(folds, (int, str)):
        folds = [folds]
    names: list[str] = []
    for fold in folds:
        text = str(fold).strip()
        if text != "all" and not (text.isdigit() and int(text) < num_folds):
            raise DpunetError(f"fold {fold!r} does not exist: choose from 0..{num_folds - 1} or 'all'")
        text = text if text == "all" else str(int(text))
        if text not in names:
            names.append(text)
    if not names:
        raise DpunetError("no folds given")
    return names


def _resolve_task_name(task: str | int) -> str:
    return resolve_task(task, results_root(), preprocessed_root(), raw_root())


def _planned_configurations(task_name: str) -> list[str] | None:
    plans = plans_file(task_name)
    return list(load_json(plans)["configurations"]) if plans.is_file() else None


def default_configuration(task_name: str, arch: str, epsilon: float) -> str:
    """3d_fullres when planned (as dpunet_train), else the first planned one, else the only trained one."""
    planned = _planned_configurations(task_name)
    if planned:
        return "3d_fullres" if "3d_fullres" in planned else planned[0]
    prefix, suffix = f"{arch}__", f"__eps{format_epsilon(epsilon)}"
    task_dir = results_root() / task_name
    found = sorted(d.name[len(prefix):-len(suffix)] for d in task_dir.glob(f"{prefix}*{suffix}") if d.is_dir()) \
        if task_dir.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise DpunetError(f"choose a configuration with -c: {task_dir} holds {found or 'no'} trained configurations "
                      f"for arch {arch} and eps {format_epsilon(epsilon)}")


def run_directory(task_name: str, configuration: str, epsilon: float, arch: str,
                  identity: dict[str, Any] | None = None) -> Path:
    """results_root()/<Task>/<run identity>, with a clear error when it does not exist. `identity`: width, seed,
    init_from, run_tag as the run was trained with (run_folder_name's keywords; defaults when None)."""
    identity = with_planned_start(task_name, configuration, identity)
    run_dir = results_root() / task_name / run_folder_name(arch, configuration, epsilon, **identity)
    if run_dir.is_dir():
        return run_dir
    planned = _planned_configurations(task_name)
    if planned is not None and configuration not in planned:
        raise DpunetError(f"configuration '{configuration}' is not planned for {task_name} "
                          f"(planned: {', '.join(planned)})")
    task_dir = results_root() / task_name
    runs = sorted(d.name for d in task_dir.iterdir() if d.is_dir()) if task_dir.is_dir() else []
    raise DpunetError(f"{run_dir} not found: no trained models for {task_name}, configuration {configuration}, "
                      f"arch {arch}, eps {format_epsilon(epsilon)} (runs there: {', '.join(runs) or 'none'}); "
                      f"train them with {_train_command(task_name, 'FOLD', configuration, epsilon, arch, identity)}")


def _identity_options(identity: dict[str, Any] | None) -> str:
    """The dpunet_train options that give a run its non-default identity factors."""
    flags = {"width": ("--width", 1.0), "seed": ("--seed", 0), "init_from": ("--init-from", DEFAULT_INIT),
             "run_tag": ("--run-tag", "")}
    return "".join(f" {flag} {identity[key]}" for key, (flag, default) in flags.items()
                   if identity and identity.get(key, default) not in (default, None))


def _train_command(task_name: str, fold: str, configuration: str, epsilon: float, arch: str,
                   identity: dict[str, Any] | None = None) -> str:
    return (f"dpunet_train {task_name} {fold} --eps {format_epsilon(epsilon)} -c {configuration} --arch {arch}"
            + _identity_options(identity))


def load_fold_model(model_path: str | Path, fold: str = "", device: str | torch.device = "cpu") -> FoldModel:
    """One release model file (fold_X/release/model_release.pt) as a FoldModel on `device`."""
    released = load_release(model_path)
    which = released.metadata.get("inference_weights", "final")
    return FoldModel(fold=str(fold or released.metadata.get("fold", "")),
                     network=network_from_release(released).to(device), model_path=released.path,
                     plan_configuration=configuration_for_arch(released.plan_configuration, released.architecture),
                     num_classes=released.num_classes,
                     num_channels=released.num_channels, weights_used=which)


def load_fold_models(task: str | int, configuration: str | None, folds: Sequence[int | str] | int | str | None,
                     epsilon: float, arch: str = "unet", device: str | torch.device = "cpu",
                     identity: dict[str, Any] | None = None) -> tuple[str, str, list[FoldModel]]:
    """(task name, configuration, fold models) for a run; every problem is a DpunetError naming the path."""
    task_name = _resolve_task_name(task)
    configuration = configuration or default_configuration(task_name, arch, epsilon)
    splits_path = preprocessed_root() / task_name / "splits_final.json"
    num_folds = len(load_json(splits_path)) if splits_path.is_file() else DEFAULT_NUM_FOLDS
    fold_names = normalise_folds(folds, num_folds)
    run_dir = run_directory(task_name, configuration, epsilon, arch, identity)
    models = []
    for fold in fold_names:
        path = release_folder(run_dir / f"fold_{fold}") / MODEL_FILE
        if not path.is_file():
            command = _train_command(task_name, fold, configuration, epsilon, arch, identity)
            if (private_folder(run_dir / f"fold_{fold}") / CHECKPOINT_FILE).is_file():
                raise DpunetError(f"{path} not found: the training of fold {fold} is unfinished; finish it with "
                                  f"{command} --continue")
            raise DpunetError(f"{path} not found: train fold {fold} with {command}")
        models.append(load_fold_model(path, fold, device))
    first = models[0]
    for m in models[1:]:
        if (m.num_classes, m.num_channels) != (first.num_classes, first.num_channels):
            raise DpunetError(f"{m.model_path}: {m.num_channels} channels / {m.num_classes} classes, but "
                              f"{first.model_path} has {first.num_channels} / {first.num_classes}")
        if config_fingerprint(m.plan_configuration) != config_fingerprint(first.plan_configuration):
            raise DpunetError(f"{m.model_path}: preprocessed differently from {first.model_path}; the "
                              f"folds of an ensemble must share their plan configuration")
    return task_name, configuration, models


# --------------------------------------------------------------------------------------------- ensemble
class EnsemblePredictor:
    """Softmax of a preprocessed case, averaged over the fold models."""

    def __init__(self, models: Sequence[FoldModel], settings: PredictionSettings | None = None) -> None:
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = list(models)
        self.settings = settings or PredictionSettings()

    @property
    def num_classes(self) -> int:
        return self.models[0].num_classes

    def predict(self, data: np.ndarray) -> np.ndarray:
        s = self.settings
        total = None
        for m in self.models:
            config = m.plan_configuration
            mirror_axes = config.get("mirror_axes", []) if s.use_mirroring else []
            probs = predict_case(m.network, data, config["patch_size"], m.num_classes, s.step_size, mirror_axes,
                                 s.tile_batch_size, s.use_gaussian)
            total = probs if total is None else total + probs
        return total / len(self.models)


# --------------------------------------------------------------------------------------- worker plumbing
class _InlineExecutor:
    """The ProcessPoolExecutor interface, run in the calling process (-np 0 or 1)."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to .result() like a worker's exception
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _make_executor(num_processes: int) -> Any:
    if num_processes <= 1:
        return _InlineExecutor()
    # spawn: the parent holds torch (threads, maybe CUDA), which forked children must not inherit
    return ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


def check_inputs(cases: Sequence[InputCase], num_channels: int, executor: Any) -> None:
    """Refuse the whole folder, listing every problem, if any input fails the integrity check."""
    futures = [executor.submit(input_case_problems, case, num_channels) for case in cases]
    problems = [p for f in futures for p in f.result()]
    if problems:
        raise DpunetError(f"{len(problems)} problem(s) in the input images (nothing was written):\n"
                          + "\n".join(f"  {p}" for p in problems))


# ------------------------------------------------------------------------------------------ privacy note
def _membership(task_name: str, folds: Sequence[str]) -> tuple[dict[str, frozenset[str]] | None, str]:
    """(patient -> chosen folds that trained on them, where that came from); (None, ...) when unknown."""
    pre = preprocessed_root() / task_name
    splits_path = pre / "splits_final.json"
    if not splits_path.is_file():
        return None, "splits not available"
    splits = load_json(splits_path)
    plans_path = pre / "dpunet_plans.json"
    if plans_path.is_file() and load_json(plans_path).get("split_scheme") == "patient_hash":
        return patient_hash_membership(folds, len(splits)), PATIENT_HASH_SOURCE
    mapping: dict[str, str] = {}
    for folder in (pre, raw_root() / task_name):
        if (folder / "dataset.json").is_file():
            mapping = case_to_patient_map(folder)
            break
    return training_membership(splits, folds, mapping), "splits_final.json"


def build_privacy_note(task_name: str, configuration: str, arch: str, epsilon: float,
                       models: Sequence[FoldModel]) -> dict[str, Any]:
    privacy = [read_model_privacy(m.fold, m.run_dir / "privacy_report.json") for m in models]
    context = {"task": task_name, "configuration": configuration, "arch": arch,
               "epsilon_target": format_epsilon(epsilon)}
    membership, source = _membership(task_name, [m.fold for m in models])
    return ensemble_privacy_note(privacy, membership, context, source)


# ------------------------------------------------------------------------------------------------ API
def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpunetError("--device cuda requested but no CUDA device is available")
    return device


def predict_folder(input_folder: str | Path, output_folder: str | Path, task: str | int,
                   configuration: str | None = None, folds: Sequence[int | str] | int | str | None = DEFAULT_FOLDS,
                   epsilon: float = 8.0, arch: str = "unet", step_size: float = 0.5, use_mirroring: bool = True,
                   device: str | torch.device | None = None, num_processes: int = 2,
                   save_probabilities: bool = False, tile_batch_size: int = 4, progress: bool = True,
                   identity: dict[str, Any] | None = None) -> PredictionResult:
    """Segment every case in `input_folder` into `output_folder` with the ensemble of the chosen folds of
    run <arch>__<configuration>__eps<epsilon> (plus `identity`: width, seed, init_from, run_tag as trained, see
    run_folder_name); also writes privacy_note.json/.md there, last."""
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if not 0 < step_size <= 1:
        raise DpunetError(f"step size must be in (0, 1], got {step_size}")
    check_output_folder(output_folder)
    if output_folder.resolve() == input_folder.resolve():
        raise DpunetError(f"{output_folder}: the output folder must differ from the input folder")
    torch_device = _pick_device(device)
    cases = find_input_cases(input_folder)
    task_name, configuration, models = load_fold_models(task, configuration, folds, epsilon, arch, torch_device,
                                                        identity)
    num_channels = models[0].num_channels
    check_input_channels(cases, num_channels)
    note = build_privacy_note(task_name, configuration, arch, epsilon, models)
    ensemble = EnsemblePredictor(models, PredictionSettings(step_size, use_mirroring, tile_batch_size))
    plan_configuration = models[0].plan_configuration
    metadata = {"task": task_name, "configuration": configuration, "arch": arch,
                "epsilon_target": format_epsilon(epsilon), "folds": [m.fold for m in models]}
    result = PredictionResult(output_folder, [c.case_id for c in cases], privacy_note=note)
    executor = _make_executor(num_processes)
    try:
        check_inputs(cases, num_channels, executor)
        output_folder.mkdir(parents=True, exist_ok=True)
        # a kill from here on leaves the marker and no privacy note (an earlier run's note is removed first)
        mark_incomplete(output_folder)
        for stale in ("privacy_note.json", "privacy_note.md"):
            (output_folder / stale).unlink(missing_ok=True)
        _run_pipeline(cases, ensemble, plan_configuration, num_channels, output_folder, save_probabilities,
                      metadata, num_processes, progress, result, executor)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    write_privacy_note(note, output_folder)
    mark_complete(output_folder)
    return result


def _run_pipeline(cases: Sequence[InputCase], ensemble: EnsemblePredictor, plan_configuration: dict[str, Any],
                  num_channels: int, output_folder: Path, save_probabilities: bool, metadata: dict[str, Any],
                  num_processes: int, progress: bool, result: PredictionResult, executor: Any) -> None:
    """Preprocess ahead in workers, predict in order here, export in workers; bounded queues keep at most
    a few cases in memory."""
    look_ahead = max(1, num_processes)
    pending: deque[tuple[InputCase, Future]] = deque()
    exports: deque[Future] = deque()
    upcoming = iter(cases)

    def queue_next() -> None:
        case = next(upcoming, None)
        if case is not None:
            pending.append((case, executor.submit(preprocess_input_case, case, plan_configuration, num_channels)))

    for _ in range(look_ahead + 1):
        queue_next()
    for _ in tqdm(range(len(cases)), desc="predict", unit="case", disable=not progress):
        case, future = pending.popleft()
        data, properties = future.result()
        queue_next()
        probabilities = ensemble.predict(data)
        exports.append(executor.submit(export_prediction, probabilities, properties, plan_configuration,
                                       output_folder, save_probabilities, metadata))
        while len(exports) > look_ahead or (exports and exports[0].done()):
            result.written += exports.popleft().result()
    while exports:
        result.written += exports.popleft().result()
