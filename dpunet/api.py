"""dpunet's Python API: what the console commands do, callable from a notebook or a study script.

    import dpunet
    dpunet.plan_and_preprocess(4, configurations=["2d"], epsilon=8)
    run = dpunet.train(4, 0, epsilon=8, configuration="2d", steps=100)
    dpunet.predict("imagesTs", "predictions", 4, configuration="2d", folds=[0])
    summary = dpunet.evaluate("labelsTs", "predictions", task=4)

The commands (`dpunet_plan_and_preprocess`, `dpunet_train`, `dpunet_predict`, `dpunet_evaluate`) parse their
arguments and call these functions; a task is an id (4), a name (Task04_Hippocampus) or, for nnU-Net v2
datasets, Dataset004_Hippocampus. Folders come from $DPUNET_RAW, $DPUNET_PREPROCESSED and $DPUNET_RESULTS as for
the commands. Errors are `dpunet.utils.errors.DpunetError` with a message naming the option and the problem.
See documentation/api.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dpunet.utils.errors import DpunetError, warn

__all__ = ["Run", "plan_and_preprocess", "train", "predict", "evaluate"]


@dataclass
class Run:
    """One trained fold: where its files are and what it achieved. `release_folder` may be shared; the rest of
    `folder` (private/) may not (documentation/privacy_model.md)."""
    task: str
    configuration: str
    fold: str
    epsilon: float
    folder: Path  # .../fold_<f>
    release_file: Path  # release/model_release.pt, what dpunet.predict loads
    privacy_report: dict[str, Any] | None  # None on the non-zero ranks of a distributed run
    validation: dict[str, Any] | None = None  # summary on the fold's held-out patients, if validated
    options: dict[str, Any] = field(default_factory=dict)  # the run's full configuration (plan + options)

    @property
    def release_folder(self) -> Path:
        return self.release_file.parent

    @property
    def private_folder(self) -> Path:
        from dpunet.release import private_folder

        return private_folder(self.folder)

    @property
    def epsilon_spent(self) -> float | None:
        """The PRV accountant's epsilon for the steps taken (None when not private or not rank 0)."""
        if not self.privacy_report or not math.isfinite(self.epsilon):
            return None
        value = self.privacy_report["epsilon"]["prv"]
        return value if isinstance(value, (int, float)) else None


def plan_and_preprocess(task: str | int, configurations: Sequence[str] | None = None, epsilon: float = 8.0, *,
                        num_processes: int = 2, verify: bool = True, ct_statistics: str = "prior",
                        ct_epsilon: float = 0.1, preprocess: bool = True, overwrite: bool = False,
                        **plan_options: Any) -> dict[str, Any]:
    """Integrity check, fingerprint, plans (with the DP block) and preprocessed data of a raw task; returns the
    plans (dpunet_plans.json). `plan_options`: delta, patients_per_step, steps, patches_per_patient, clip_norm,
    width, num_groups, gpu_memory_gb, shape_source, max_noise_to_signal, split_scheme (as dpunet_plan's options)."""
    from dpunet.dataset.tasks import load_raw_task
    from dpunet.fingerprint.run import fingerprint_task
    from dpunet.planning.run import plan_task
    from dpunet.preprocessing.run import preprocess_task

    raw = load_raw_task(task)
    fingerprint_task(raw, num_processes, verify, ct_statistics, ct_epsilon)
    plans = plan_task(raw, configurations=list(configurations) if configurations else None, epsilon=epsilon,
                      **plan_options)
    if preprocess:
        preprocess_task(raw, list(plans["configurations"]), num_processes, overwrite)
    return plans


def train(task: str | int, fold: int | str, epsilon: float, configuration: str | None = None, *,
          resume: bool = False, **options: Any) -> Run:
    """Train one fold with patient-level DP-SGD (epsilon=float('inf'): the same code without clipping or noise).

    `configuration`: a planned configuration (default: 3d_fullres where planned, else 2d, as dpunet_train).
    `options`: any field of dpunet.training.config.TrainingConfig (arch, steps, learning_rate, seed, device,
    init_from, patients_per_step, ...); options left out, or None, take the plan's values. `resume=True`
    continues from private/checkpoint_latest.pt (dpunet_train --continue). Under torchrun every rank calls this;
    rank 0 writes the files and gets the report."""
    import torch

    from dpunet.planning.plans import default_configuration, load_training_inputs
    from dpunet.privacy.accounting import accountant_warnings_summary
    from dpunet.release import MODEL_FILE, release_folder
    from dpunet.training import distributed
    from dpunet.training.config import TrainingConfig, merge_plan_and_options
    from dpunet.training.trainer import DPTrainer

    unknown = sorted(set(options) - set(TrainingConfig.__dataclass_fields__) - {"task", "fold", "epsilon"})
    if unknown:
        raise DpunetError(f"dpunet.train: unknown option(s) {unknown} (see dpunet.training.config.TrainingConfig)")
    device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DpunetError("device cuda requested but no CUDA device is available")
    configuration = configuration or default_configuration(task)
    _, _, plan_config, _, _ = load_training_inputs(task, configuration)
    options = {**options, "task": str(task), "fold": str(fold), "epsilon": float(epsilon),
               "configuration": configuration, "device": device}
    setup = distributed.init_distributed(options["device"])  # None unless launched by torchrun
    if setup is not None:
        options["device"] = setup.device
    try:
        cfg = merge_plan_and_options(plan_config, options)
        # calibration and the ledger ask the accountants at every logged step: their warnings, once, at the end
        with accountant_warnings_summary(f"training {cfg.task} fold {cfg.fold}"):
            result = DPTrainer(cfg).run(resume=resume)
    finally:
        distributed.destroy_distributed()
    if result is None:
        raise DpunetError(f"dpunet.train: the run of {cfg.task} fold {cfg.fold} stopped before its last step")
    folder = Path(result["output_dir"]).absolute()
    return Run(task=cfg.task, configuration=cfg.configuration, fold=str(cfg.fold), epsilon=cfg.epsilon,
               folder=folder, release_file=release_folder(folder) / MODEL_FILE, privacy_report=result["report"],
               validation=result["validation"], options=cfg.to_dict())


def predict(input_folder: str | Path, output_folder: str | Path, task: str | int | None = None,
            configuration: str | None = None, folds: Sequence[int | str] | int | str | None = None,
            epsilon: float = 8.0, arch: str = "unet", *, run: Run | None = None, **options: Any):
    """Segment every image of `input_folder` into `output_folder` (in each input's geometry and file format) with
    the ensemble of the chosen folds (default 0-4) of run <arch>__<configuration>__eps<epsilon>; writes
    privacy_note.json/.md there. `run=` a Run from `train` instead: its task, configuration, epsilon, arch and
    run identity (width, seed, initialisation, tag), and its fold unless `folds` is given. `options`:
    step_size, use_mirroring, device, num_processes, save_probabilities, tile_batch_size, progress, identity
    (see dpunet.inference.predictor.predict_folder). Returns a PredictionResult (output_folder, case_ids,
    written, privacy_note)."""
    from dpunet.inference.predictor import DEFAULT_FOLDS, predict_folder

    if run is not None:
        task, configuration, epsilon = run.task, run.configuration, run.epsilon
        arch = run.options.get("arch", arch)
        folds = [run.fold] if folds is None else folds
        options.setdefault("identity", {k: run.options[k] for k in ("width", "seed", "init_from", "run_tag")
                                        if k in run.options})
    if task is None:
        raise DpunetError("dpunet.predict: give the task (or run=, a Run from dpunet.train)")
    return predict_folder(input_folder, output_folder, task, configuration,
                          DEFAULT_FOLDS if folds is None else folds, epsilon, arch, **options)


def evaluate(reference_folder: str | Path, prediction_folder: str | Path, task: str | int | None = None, *,
             labels: Sequence[int] | None = None, ignore_label: int | None = None, output: str | Path | None = None,
             num_processes: int = 1, nsd_tolerance: float = 1.0, empty_both: str = "nan",
             only_predicted: bool = False) -> dict[str, Any]:
    """Dice, IoU, HD95, NSD per case and label of `prediction_folder` against `reference_folder` (matched by file
    name); writes summary.json (default: prediction_folder/summary.json) and returns it. Labels come from the
    task's dataset.json (`task`), or are listed (`labels`, with an optional `ignore_label`)."""
    from dpunet.dataset.tasks import load_raw_task
    from dpunet.evaluation.evaluate import evaluate_folder, list_segmentations, write_summary
    from dpunet.inference.case_io import INCOMPLETE_MARKER
    from dpunet.utils.files import check_output_file

    reference_folder, prediction_folder = Path(reference_folder), Path(prediction_folder)
    output = check_output_file(Path(output) if output is not None else prediction_folder / "summary.json")
    if (prediction_folder / INCOMPLETE_MARKER).exists():
        raise DpunetError(f"{prediction_folder}: holds {INCOMPLETE_MARKER}: dpunet_predict did not finish this "
                          f"folder (killed or failed); rerun the prediction first")
    if (task is None) == (labels is None):
        raise DpunetError("give either a task (-t) or the label values to evaluate (-l), not both or neither")
    declared = None
    if task is not None:
        if ignore_label is not None:
            raise DpunetError("--ignore-label goes with -l; with -t the ignore label comes from dataset.json")
        raw = load_raw_task(task)
        label_names, ignore, background = raw.labels, raw.ignore_label, raw.background_label
        declared = raw.label_values  # -l lists the labels to score, not every value a file may hold
    else:
        label_names = {int(v): str(v) for v in labels}
        if ignore_label is not None:
            label_names[int(ignore_label)] = "ignore"
        ignore, background = ignore_label, None
    case_ids = sorted(list_segmentations(prediction_folder)) if only_predicted else None
    summary = evaluate_folder(reference_folder, prediction_folder, label_names, ignore_label=ignore,
                              background_label=background, nsd_tolerance_mm=nsd_tolerance,
                              num_processes=num_processes, empty_both=empty_both, case_ids=case_ids,
                              declared_labels=declared)
    for warning in summary.get("warnings", []):
        warn(warning)
    write_summary(summary, output)
    summary["summary_file"] = str(output)
    return summary
