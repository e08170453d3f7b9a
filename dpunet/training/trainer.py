"""Patient-level DP-SGD training of a planned U-Net (and, with epsilon = inf, the same loop non-privately).

One logical step: Poisson-sample patients (rate q) -> for each physical micro-batch of whole patients, K
augmented patches each -> the engine adds clipped per-patient gradients -> noise once -> divide by q*N ->
optimiser step -> EMA -> privacy ledger. The run stops exactly at its planned number of steps T, for which
sigma was calibrated, so the budget cannot be exceeded; `--continue` restores the weights, optimiser, EMA and
ledger from the private checkpoint.

Sampling and noise come from `PrivateRandomness` (a key from OS entropy, per-step seeds by keyed hash), never
from `--seed`; a resumed run draws a new key, so it never reuses noise. Files: `release/` (model_release.pt,
privacy report) is what may be shared; `private/` (resumption checkpoint, run configuration, training log,
progress plot, validation on held-out patients) is for the data owner only (documentation/privacy_model.md).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

import dpunet
from dpunet.architectures.memory_estimate import MicroBatchEstimate, estimate_micro_batch
from dpunet.architectures import (arch_for_configuration, build_network, select_trainable, supervision_levels,
                                  validate_for_dp)
from dpunet.evaluation.cross_validation import run_folder_name
from dpunet.paths import preprocessed_root, results_root
# importable from here as well: many callers read the plans through the trainer's module
from dpunet.planning import memory
from dpunet.planning.plans import load_plans, load_training_inputs  # noqa: F401
from dpunet.planning.dp_plan import hyperparameter_statement
from dpunet.planning.public_tuning import public_tuning_statement
from dpunet.planning.splits import fold_cases, split_statement
from dpunet.privacy.accounting import PrivacyLedger, calibrate_noise_multiplier, check_delta
from dpunet.privacy.public_subspace import PublicGradientSubspace
from dpunet.privacy.dp_step import assign_gradients, noise_norm_on_mean_gradient, noisy_average_gradient
from dpunet.privacy.engines.base import PatientBatch
from dpunet.privacy.engines.registry import benchmark_engines, make_engine
from dpunet.privacy.randomness import PrivateRandomness
from dpunet.privacy.report import build_privacy_report, render_privacy_report_markdown
from dpunet.privacy.sampling import PoissonPatientSampler
from dpunet.release import CHECKPOINT_FILE, private_folder, release_folder, write_release
from dpunet.pretraining.sources import RANDOM_IMAGES, is_public_source, public_source
from dpunet.pretraining.pretrain import pretrain_on_public_data, pretrained_checkpoint_path
from dpunet.learning.checkpoint import load_checkpoint, save_checkpoint
from dpunet.training.config import TrainingConfig, pretraining_config
from dpunet.training import distributed
from dpunet.training.dataloading import PatientPatchSampler, PreprocessedCaseStore, iterate_micro_batches
from dpunet.training.loader_workers import BackgroundPatientLoader
from dpunet.training.ema import WeightEMA
from dpunet.training.initialisation import load_initial_weights
from dpunet.learning.loss import (SegmentationLoss, deep_supervision_weights, downsample_seg_for_deep_supervision,
                                  loss_on_labelled_images)
from dpunet.training.progress import TrainingLog, plot_progress
from dpunet.training.runtime_estimate import (RunTimeEstimate, best_seconds, cpu_advice, describe_estimate,
                                              new_micro_batch_sizes, new_size_seconds, time_micro_batch)
from dpunet.learning.schedule import lr_factor, make_optimizer
from dpunet.utils.errors import DpunetError, warn
from dpunet.utils.files import write_json, write_text


def run_directory(cfg: TrainingConfig) -> Path:
    """results_root()/<Task>/<run identity>/fold_<f>: width, seed, initialisation and run tag enter the name when
    they differ from the defaults (run_folder_name), so such runs never share a folder."""
    name = run_folder_name(cfg.arch, cfg.configuration, cfg.epsilon, width=cfg.width, seed=cfg.seed,
                           init_from=cfg.init_from, run_tag=cfg.run_tag)
    return results_root() / cfg.task / name / f"fold_{cfg.fold}"


# in units of C; De et al.'s CIFAR-10 recipe (sigma 3, batch 4096, 2.7M parameters) runs at about 1.2. Above it,
# runs from a random initialisation did not learn on hippocampus; fine-tuning pretrained weights did (results.md)
NOISE_NORM_WARNING = 2.0
# the memory budget of plans made before the plan recorded one (dpunet_plan's --gpu-memory-gb default)
DEFAULT_MEMORY_GB = 16.0
# options that shape the weights or the optimiser state a checkpoint holds
RESUME_FIXED_OPTIONS = ("arch", "width", "dp_norm", "norm_groups", "output_stride", "encoder_depth", "trainable",
                        "init_from", "pretraining_steps", "deep_supervision", "optimizer", "public_subspace",
                        "public_subspace_batch", "public_subspace_source", "probe_steps", "probe_trainable",
                        # the report's hyperparameter statement names the tuning file the learning rate came from
                        "public_tuning")


class DPTrainer:
    """Owns one run: model, engine, optimiser, EMA, sampler, ledger, logs. Public: run()."""

    def __init__(self, cfg: TrainingConfig, output_dir: Path | None = None, canaries: Any = None) -> None:
        """`canaries`: dpunet.audit.DiracCanaries, for `dpunet_audit` only: extra patients of the Poisson sampler
        whose clipped gradients are added to the step's sum (they count in N like any patient)."""
        self.cfg = cfg
        self.canaries = canaries
        self.task_name, self.plans, self.plan_config, splits, self.task = load_training_inputs(cfg.task,
                                                                                                cfg.configuration)
        cfg.task = self.task_name
        self.output_dir = output_dir or run_directory(cfg)
        self.device = torch.device(cfg.device)
        self.train_cases, self.val_cases = fold_cases(splits, cfg.fold)
        if not self.train_cases:
            raise DpunetError(f"fold {cfg.fold} of {self.task_name} has no training cases")
        case_patient = {c.case_id: c.patient_id for c in self.task.training}
        self.patients: dict[str, list[str]] = {}
        for case_id in self.train_cases:
            self.patients.setdefault(case_patient[case_id], []).append(case_id)
        overlap = {case_patient[c] for c in self.val_cases} & set(self.patients)
        if overlap:
            raise DpunetError(f"patients {sorted(overlap)[:5]} are in both training and validation of fold {cfg.fold}")
        self.num_patients = len(self.patients) + (len(canaries.included_ids) if canaries else 0)
        self._plan_privacy()
        self._build_model()
        self._build_data()
        self.step = 0
        self.private_dir = private_folder(self.output_dir)
        self.release_dir = release_folder(self.output_dir)
        # rank 0 writes every step to the file as it goes; the other ranks keep rows in memory only
        self.log = TrainingLog(self.private_dir / "training_log.csv", write_through=distributed.is_main_process())
        self.validation_curve: list[tuple[int, float]] = []
        self.elapsed = 0.0

    # ----- set-up -------------------------------------------------------------------------------------
    def _plan_privacy(self) -> None:
        cfg = self.cfg
        expected = cfg.patients_per_step or round(self.plan_config["dp"]["sample_rate"] * self.num_patients)
        if expected > self.num_patients and distributed.is_main_process():
            warn(f"--patients-per-step {expected} is more than the {self.num_patients} training patients of fold "
                 f"{cfg.fold}: clamped to {self.num_patients} (q = 1: every patient in every step)")
        expected = int(min(self.num_patients, max(1, expected)))
        cfg.patients_per_step = expected
        self.sample_rate = expected / self.num_patients
        self.fingerprint_epsilon, self.fingerprint_delta = self._fingerprint_budget()
        if cfg.private:
            check_delta(cfg.delta, self.num_patients, cfg.allow_large_delta)
            self.noise_multiplier = calibrate_noise_multiplier(self.training_epsilon, self.training_delta,
                                                               self.sample_rate, cfg.steps, accountant="prv")
        else:
            self.noise_multiplier = 0.0
        self.ledger = PrivacyLedger(self.noise_multiplier, self.sample_rate)
        self.randomness = self._session_randomness()
        canary_ids = self.canaries.included_ids if self.canaries else []
        self.sampler = PoissonPatientSampler(sorted(self.patients) + canary_ids, self.sample_rate, self.randomness)

    def _fingerprint_budget(self) -> tuple[float, float]:
        """(epsilon, delta) the plan's DP fingerprint statistics spent on this data (0, 0 when none)."""
        fp = self.plans.get("fingerprint_privacy", {}) or {}
        return float(fp.get("epsilon", 0.0) or 0.0), float(fp.get("delta", 0.0) or 0.0)

    def _left_for_training(self, option: str, total: float, spent: float) -> float:
        """--eps and --delta are the total budget: what the fingerprint spent is subtracted before calibrating."""
        remaining = total - spent
        if self.cfg.private and remaining <= 0:
            raise DpunetError(f"--{option} {total} leaves nothing for training: the DP fingerprint statistics "
                              f"already spent {option} {spent}")
        return remaining

    @property
    def training_epsilon(self) -> float:
        return self._left_for_training("eps", self.cfg.epsilon, self.fingerprint_epsilon)

    @property
    def training_delta(self) -> float:
        return self._left_for_training("delta", self.cfg.delta, self.fingerprint_delta)

    def _session_randomness(self) -> PrivateRandomness:
        """A fresh secret key (rank 0's, sent to the other ranks) unless the insecure reproducible mode asks
        for one derived from --seed."""
        if self.cfg.insecure_reproducible_noise:
            return PrivateRandomness.insecure_from_seed(self.cfg.seed)
        return PrivateRandomness(distributed.broadcast_bytes(PrivateRandomness.secure().key), reproducible=False)

    def _initial_weights_path(self) -> Path | None:
        """None (random initialisation), the given checkpoint, or the cached pretraining on the named public
        source (random_images, synthetic_brain; made by rank 0 first if missing, the others wait for it)."""
        cfg = self.cfg
        if cfg.init_from in ("", "none"):
            return None
        if not is_public_source(cfg.init_from):
            return Path(cfg.init_from)
        pretraining = pretraining_config(self.cfg)
        path = pretrained_checkpoint_path(self.task_name, cfg.configuration, pretraining)
        if distributed.is_main_process() and not path.is_file():
            tqdm.write(f"pretraining on {cfg.init_from} (public, no patient data) -> {path}")
            pretrain_on_public_data(self.plan_config, self.task.num_channels, self.task.num_classes, pretraining,
                                    path, self.task_name)
        distributed.barrier()
        return path

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        # the patch size: MONAI networks (--arch monai_unet, unetr, ...) are built for it (issue 11), and a plan
        # patch they cannot take is adapted; from here on (data, validation, checkpoint, release) the
        # configuration is the one with the network's patch size
        planned = self.plan_config
        self.arch, self.plan_config = arch_for_configuration(planned, cfg.arch, cfg.width, cfg.dp_norm,
                                                             cfg.norm_groups, cfg.output_stride, cfg.encoder_depth)
        if self.plan_config is not planned and distributed.is_main_process():
            tqdm.write(f"patch size adapted: {self.arch['patch_size_adapted_because']}")
        self.num_classes = self.task.num_classes
        self.model = build_network(self.arch, self.task.num_channels, self.num_classes, cfg.deep_supervision)
        problems = validate_for_dp(self.model, cfg.engine) if cfg.private else []
        if problems:
            raise DpunetError("the network is not fit for DP-SGD:\n  " + "\n  ".join(problems))
        self.num_trained_parameters = select_trainable(self.model, cfg.trainable)
        self._size_micro_batch(planned.get("patients_per_micro_batch"))
        self.model.to(self.device)
        n_out, _ = supervision_levels(self.arch, cfg.deep_supervision, self.plan_config["dim"])
        # natural images (CamVid) have no background class: every class enters the Dice term
        self.loss_fn = SegmentationLoss(self.num_classes, self.task.ignore_label,
                                        deep_supervision_weights(max(1, n_out)),
                                        dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight,
                                        include_background_in_dice=self.task.background_label is None,
                                        patches_per_patient=cfg.patches_per_patient)
        self.probe_trained_parameters = self._check_probe()
        self.trained_subset = self._subset_at(0)
        select_trainable(self.model, self.trained_subset)
        self.engine = make_engine(cfg.engine if cfg.private else "nonprivate", self.model, self.loss_fn,
                                  cfg.clip_norm if cfg.private else None,
                                  benchmark_batch=self._shape_only_batch() if cfg.engine == "auto" else None)
        # timed before the longest parts (pretraining, training) start, so a run planned for a GPU is not
        # started silently on a CPU
        self._check_run_time()
        initial_weights = self._initial_weights_path()
        # loaded in place: the engine built above keeps the same parameter tensors
        self.initial_weights = load_initial_weights(self.model, initial_weights, self.task_name) \
            if initial_weights else None
        self.optimizer = make_optimizer(cfg.optimizer, self.engine.params, cfg.learning_rate, cfg.momentum,
                                        cfg.weight_decay)
        self.ema = WeightEMA(self.model, cfg.ema_decay)
        self.public_subspace = self._public_subspace() if cfg.public_subspace else None

    def _check_probe(self) -> int | None:
        """--probe-steps: validated; the number of parameters its phase trains (None when off)."""
        cfg = self.cfg
        if cfg.probe_steps == 0:
            return None
        if not 0 < cfg.probe_steps < cfg.steps:
            raise DpunetError(f"--probe-steps must lie between 0 and --steps {cfg.steps} (got {cfg.probe_steps})")
        if cfg.probe_trainable == cfg.trainable:
            raise DpunetError(f"--probe-trainable {cfg.probe_trainable} equals --trainable: the probe phase would "
                              f"change nothing")
        if cfg.public_subspace:
            raise DpunetError("--probe-steps and --public-subspace cannot be combined (the public gradients are "
                              "taken for one trained subset)")
        if distributed.is_distributed():
            raise DpunetError("--probe-steps is not supported in distributed (torchrun) runs yet")
        trained = select_trainable(self.model, cfg.probe_trainable)  # the caller selects step 0's subset next
        if trained == 0:
            raise DpunetError(f"--probe-trainable {cfg.probe_trainable} selects no parameter of --arch {cfg.arch}")
        return trained

    def _subset_at(self, step: int) -> str:
        """The trained subset at `step`: --probe-trainable during the first --probe-steps, then --trainable."""
        return self.cfg.probe_trainable if step < self.cfg.probe_steps else self.cfg.trainable

    def _enter_phase_of(self, step: int) -> None:
        """Switch the trained subset when `step` starts another phase of --probe-steps: a new engine over the
        new parameters and, as between DP-RandP's phases, a fresh optimiser. The phase of every step is fixed by
        the options (public), and every step is the same Gaussian mechanism, so the account is unchanged."""
        subset = self._subset_at(step)
        if subset == self.trained_subset:
            return
        engine_name = self.engine.name
        self.engine.close()
        select_trainable(self.model, subset)
        self.trained_subset = subset
        self.engine = make_engine(engine_name, self.model, self.loss_fn, self.cfg.clip_norm if self.cfg.private
                                  else None)
        self.optimizer = make_optimizer(self.cfg.optimizer, self.engine.params, self.cfg.learning_rate,
                                        self.cfg.momentum, self.cfg.weight_decay)
        if distributed.is_main_process():
            tqdm.write(f"step {step}: --probe-steps phase over, now training --trainable {subset} "
                       f"({self.num_trained_parameters} parameters)")

    def _public_subspace(self) -> PublicGradientSubspace:
        """--public-subspace: the span of public gradients each noisy gradient is projected onto."""
        cfg = self.cfg
        if cfg.public_subspace < 0 or cfg.public_subspace_batch < 1:
            raise DpunetError(f"--public-subspace must be >= 0 (got {cfg.public_subspace}) and "
                              f"--public-subspace-batch >= 1 (got {cfg.public_subspace_batch})")
        if distributed.is_distributed():
            # each rank would compute its own basis, and GPU backward passes are not bitwise reproducible: the
            # replicas would drift apart
            raise DpunetError("--public-subspace is not supported in distributed (torchrun) runs yet")
        source = cfg.public_subspace_source or (cfg.init_from if is_public_source(cfg.init_from) else RANDOM_IMAGES)
        make_batch, description = public_source(source, "--public-subspace-source").load_batches()
        shadow = build_network(self.arch, self.task.num_channels, self.num_classes, cfg.deep_supervision)
        select_trainable(shadow, cfg.trainable)
        n_out, strides = supervision_levels(self.arch, cfg.deep_supervision, self.plan_config["dim"])
        # the public samples are independent images: no pooling of patches per patient
        loss = SegmentationLoss(self.num_classes, None, deep_supervision_weights(max(1, n_out)),
                                dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight,
                                include_background_in_dice=self.task.background_label is None)

        return PublicGradientSubspace(shadow.to(self.device), make_batch,
                                      partial(loss_on_labelled_images, loss, strides=strides, num_outputs=n_out),
                                      list(self.plan_config["patch_size"]), self.task.num_channels,
                                      self.num_classes, cfg.public_subspace, cfg.public_subspace_batch, cfg.seed,
                                      # the report is released: it names the generator, not the run's seed
                                      description.format(seed="drawn per step"))

    def _memory_budget_bytes(self) -> tuple[float, str]:
        """(bytes, how it was set): the plan's memory budget and, on CUDA, at most the device's free memory."""
        gb = float((self.plan_config.get("memory_model") or {}).get("gpu_memory_gb", DEFAULT_MEMORY_GB))
        budget, how = gb * 1024 ** 3, f"the plan's memory_model.gpu_memory_gb {gb:g}"
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if free < budget:
                budget, how = float(free), f"the free memory of {self.device} ({free / 1024 ** 3:.1f} GiB)"
        return budget, how

    def _size_micro_batch(self, planned: int | None) -> None:
        """Patients per physical micro-batch: --patients-per-micro-batch when given; otherwise the most whole
        patients (K patches each) whose micro-batch of the network actually built (any --arch, width, adapted
        patch, trained subset) fits the memory budget, at least 1. The plan's figure was sized for its U-Net."""
        cfg = self.cfg
        budget, budget_how = self._memory_budget_bytes()
        safety = float((self.plan_config.get("memory_model") or {}).get("safety_factor", memory.SAFETY_FACTOR))
        if not safety >= 1.0:
            raise DpunetError(f"plan memory_model.safety_factor must be >= 1 (got {safety:g})")
        estimate: MicroBatchEstimate | None = None
        try:
            estimate = estimate_micro_batch(self.model, self.task.num_channels, self.plan_config["patch_size"],
                                            cfg.patches_per_patient, per_patient_gradients=cfg.private)
        except DpunetError as e:
            if cfg.patients_per_micro_batch is None:
                warn(f"{e}; the plan's patients_per_micro_batch is used")
        if cfg.patients_per_micro_batch is not None:
            n, source = max(1, int(cfg.patients_per_micro_batch)), "--patients-per-micro-batch"
        elif estimate is None:
            n, source = max(1, int(self.plan_config.get("patients_per_micro_batch") or 1)), "plan"
        else:
            fit = estimate.patients_that_fit(budget / safety, cap=self.num_patients)
            n, source = max(1, fit), "memory estimate of the built network"
            if fit == 0:
                warn(f"one patient's {cfg.patches_per_patient} patches need an estimated "
                     f"{estimate.bytes(1) / 1024 ** 3:.1f} GiB with --arch {cfg.arch} --width {cfg.width:g}, more "
                     f"than the budget ({budget_how}) divided by the safety factor {safety:g}: training may run out "
                     f"of memory; lower --width or --patches-per-patient")
            # the plan caps its figure at the task's patients, the trainer at this fold's
            if n != min(planned or n, self.num_patients) and distributed.is_main_process():
                tqdm.write(f"micro-batch: {n} patients x {cfg.patches_per_patient} patches fit {budget_how} with "
                           f"--arch {cfg.arch} --width {cfg.width:g} (estimated {estimate.bytes(n) / 1024 ** 3:.3g} "
                           f"GiB, safety factor {safety:g}); the plan's {planned} was sized for its U-Net")
        self.patients_per_micro_batch = n
        self.micro_batch_record = {
            "patients_per_micro_batch": n, "set_by": source, "plan_patients_per_micro_batch": planned,
            "budget_bytes": int(budget), "budget": budget_how, "safety_factor": safety,
            "estimated_bytes": estimate.bytes(n) if estimate else None,
            "estimate": estimate.to_dict() if estimate else None}

    def _pretraining_steps_to_run(self) -> int:
        """Steps of public pretraining this run will do first (0 when its checkpoint is cached)."""
        cfg = self.cfg
        if not is_public_source(cfg.init_from):
            return 0
        path = pretrained_checkpoint_path(self.task_name, cfg.configuration, pretraining_config(self.cfg))
        return 0 if path.is_file() else cfg.pretraining_steps

    def estimate_run_time(self) -> RunTimeEstimate:
        """This run's wall time on its device, from timings of the engine, the noise and a non-private
        forward/backward on shape-only data (no private data is read). The engine is timed on a micro-batch of
        the run's size: per patient, a large network's micro-batch costs more than one patient alone."""
        cfg, batch = self.cfg, self._shape_only_batch()
        patients_here = math.ceil(cfg.patients_per_step / distributed.world_size())
        micro_batch = max(1, min(self.patients_per_micro_batch, patients_here))
        batches = {1: batch}

        def accumulate(patients: int) -> None:
            if patients not in batches:
                batches[patients] = self._shape_only_batch(patients)
            self.engine.accumulate(batches[patients])

        timing = time_micro_batch(accumulate, micro_batch, self.device)
        batches.clear()  # frees the shape-only tensors (the closure above keeps the dict itself)
        self.engine.zero()
        planning = 0.0
        if getattr(self.engine, "plans_per_shape", False):  # every new micro-batch size is planned again
            sizes = new_micro_batch_sizes(math.ceil(self.num_patients / distributed.world_size()),
                                          self.sample_rate, self.patients_per_micro_batch, cfg.steps,
                                          known={timing.patients})
            planning = new_size_seconds(timing.first_seconds_per_patient, sizes)
        noise = 0.0
        if cfg.private:
            generator = PrivateRandomness.secure().torch_generator("run time estimate", 0, self.device)
            noise = best_seconds(lambda: noisy_average_gradient(self.engine.summed_grad, self.noise_multiplier,
                                                                cfg.clip_norm, cfg.patients_per_step, generator),
                                 self.device)
        pretraining_steps = self._pretraining_steps_to_run()
        per_pretraining_step = 0.0
        if pretraining_steps:
            plain = benchmark_engines(self.model, self.loss_fn, None, batch, names=["nonprivate"], repeats=1)
            per_pretraining_step = plain["nonprivate"] * cfg.pretraining_batch_size / cfg.patches_per_patient
        return RunTimeEstimate(device=self.device.type, seconds_per_patient=timing.seconds_per_patient,
                               patients_per_step=patients_here, patches_per_patient=cfg.patches_per_patient,
                               steps=cfg.steps, noise_seconds_per_step=noise, pretraining_steps=pretraining_steps,
                               pretraining_seconds_per_step=per_pretraining_step if math.isfinite(
                                   per_pretraining_step) else 0.0,
                               timed_patients=timing.patients, micro_batch_patients=micro_batch,
                               new_size_seconds=planning)

    def _check_run_time(self) -> None:
        """Print the estimate (with the CPU recipe when a CPU run would take hours); refuse beyond --max-hours."""
        cfg = self.cfg
        self.run_time_estimate = self.estimate_run_time()
        estimate = self.run_time_estimate
        if distributed.is_main_process():
            tqdm.write(describe_estimate(estimate))
            advice = cpu_advice(estimate, int(self.plan_config["dim"]))
            if advice:
                warn(advice)
        if cfg.max_hours is not None and estimate.total_seconds > cfg.max_hours * 3600:
            fit = estimate.steps_that_fit(cfg.max_hours)
            raise DpunetError(f"--max-hours {cfg.max_hours:g}: {describe_estimate(estimate)}; at this setting "
                              f"{fit} steps fit (--steps {fit}), or lower --width / --patches-per-patient")

    def _shape_only_batch(self, patients: int = 1) -> PatientBatch:
        """Random data with the shapes of `patients` patients' K patches: engine auto-selection and the run-time
        estimate time the engines on it, so they depend on shapes only and never touch private data."""
        pc, k = self.plan_config, self.cfg.patches_per_patient
        generator = torch.Generator().manual_seed(0)
        data = torch.randn(patients, k, self.task.num_channels, *pc["patch_size"], generator=generator)
        seg = torch.randint(0, self.num_classes, (patients, k, 1, *pc["patch_size"]), generator=generator)
        n_out, strides = supervision_levels(self.arch, self.cfg.deep_supervision, len(pc["patch_size"]))
        targets = downsample_seg_for_deep_supervision(seg, strides, n_out)
        return PatientBatch(data.to(self.device), [t.to(self.device) for t in targets])

    def _build_data(self) -> None:
        cfg = self.cfg
        pc = self.plan_config
        self.data_dir = preprocessed_root() / self.task_name / pc["data_identifier"]
        if not self.data_dir.is_dir():
            raise DpunetError(f"{self.data_dir} not found: run dpunet_plan_and_preprocess for {self.task_name}")
        missing = [c for c in self.train_cases + self.val_cases if not (self.data_dir / f"{c}.json").is_file()]
        if missing:
            raise DpunetError(f"{self.data_dir}: {len(missing)} cases not preprocessed (e.g. {missing[:3]}); "
                              f"run dpunet_plan_and_preprocess again")
        store = PreprocessedCaseStore(self.data_dir, self.train_cases)
        strides = supervision_levels(self.arch, True, pc["dim"])[1] if cfg.deep_supervision else None
        self.patch_sampler = PatientPatchSampler(
            store, self.patients, pc["patch_size"], cfg.patches_per_patient, cfg.oversample_foreground,
            pc.get("augmentation") if cfg.augmentation else None, pc["dim"], self.task.ignore_label, strides)
        self.loader: BackgroundPatientLoader | None = None
        # patient draws made ahead of training (for prefetching): (step index, patients)
        self.pending: deque[tuple[int, list[str]]] = deque()

    def _open_loader(self) -> None:
        self.loader = BackgroundPatientLoader(self.patch_sampler, self.cfg.num_workers, self.cfg.seed,
                                              prefetch_steps=2)

    def _draw_ahead(self) -> None:
        """Poisson draws for the next few steps, submitted to the loader."""
        depth = 1 + (2 if self.cfg.num_workers > 0 else 0)
        next_step = self.pending[-1][0] + 1 if self.pending else self.step
        while len(self.pending) < depth and next_step < self.cfg.steps:
            patients = self.sampler.sample(next_step)
            self.pending.append((next_step, patients))
            real = [p for p in patients if p in self.patients]  # audit canaries have no images
            # distributed: every rank drew the same patients; its loader builds only this rank's shard
            self.loader.submit(next_step, iterate_micro_batches(distributed.shard(real),
                                                                self.patients_per_micro_batch))
            next_step += 1

    # ----- one logical step ---------------------------------------------------------------------------
    def _to_device(self, batch: PatientBatch) -> PatientBatch:
        return PatientBatch(batch.data.to(self.device, non_blocking=True),
                            [t.to(self.device, non_blocking=True) for t in batch.targets])

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._enter_phase_of(self.step)
        self._draw_ahead()
        step_index, patients = self.pending.popleft()
        assert step_index == self.step, (step_index, self.step)
        micro_batches = self.loader.get(step_index)
        self.engine.zero()
        loss_sum, clipped, nonfinite = 0.0, 0, 0
        self.model.train()
        for batch in micro_batches:
            stats = self.engine.accumulate(self._to_device(batch))
            loss_sum += stats.loss_sum
            clipped += stats.num_clipped
            nonfinite += stats.num_nonfinite
        if self.canaries is not None and distributed.is_main_process():  # once, before the sum over ranks
            self.canaries.add_to_sum(self.engine.summed_grad, [p for p in patients if self.canaries.is_canary(p)],
                                     cfg.clip_norm if cfg.private else None)
        # ---- distributed: sum the shards' clipped-gradient sums and statistics over all ranks (no-op in one
        # process). Every rank then adds the SAME noise (every rank derives the step's seed from the same session
        # key) to the same total, so the noise enters exactly once per logical step and all ranks take the same
        # optimiser step.
        if distributed.is_distributed():
            totals = torch.tensor([loss_sum, clipped, nonfinite], dtype=torch.float64, device=self.device)
            distributed.all_reduce_sum([*self.engine.summed_grad, totals])
            loss_sum, clipped, nonfinite = float(totals[0]), int(totals[1]), int(totals[2])
        # ---- end distributed
        grads = noisy_average_gradient(self.engine.summed_grad, self.noise_multiplier,
                                       cfg.clip_norm if cfg.private else None, cfg.patients_per_step,
                                       self.randomness.torch_generator("noise", step_index, self.device))
        if self.public_subspace is not None:  # post-processing of the release above: no privacy cost
            grads = self.public_subspace.project(grads, self.model.state_dict(), step_index)
        lr = cfg.learning_rate * lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        assign_gradients(self.engine.params, grads)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.ledger.step()
        self.step += 1
        self._draw_ahead()  # lets workers prepare the next steps while the caller logs and checkpoints
        return {"step": self.step, "patients_sampled": len(patients),
                "loss_noisy_step": loss_sum / len(patients) if patients else "",
                "fraction_clipped": clipped / len(patients) if patients and cfg.private else "",
                "nonfinite_patients": nonfinite, "learning_rate": lr,
                "seconds": time.perf_counter() - t0}

    def noise_norm_per_step(self) -> float:
        """sigma sqrt(d) / (qN): the noise norm on one averaged gradient, against a clipped signal of at most C."""
        return noise_norm_on_mean_gradient(self.noise_multiplier, self.cfg.patients_per_step,
                                           self.num_trained_parameters)

    def epsilon_now(self, accountant: str = "prv") -> float:
        if not self.cfg.private:
            return math.inf
        # the total spent so far: DP-SGD at its share of delta plus the fingerprint statistics
        return self.ledger.epsilon(self.training_delta, accountant) + self.fingerprint_epsilon

    # ----- checkpoints --------------------------------------------------------------------------------
    def privacy_parameters(self) -> dict[str, Any]:
        return {**self.cfg.privacy_fields(), "num_patients": self.num_patients, "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "patients_per_step": self.cfg.patients_per_step}

    def state_dict(self) -> dict[str, Any]:
        """The private resumption checkpoint. No sampler or noise state: both derive from the session key (a
        resumed run draws a new one; the insecure reproducible mode re-derives the same one from --seed)."""
        return {
            "dpunet_version": dpunet.__version__,
            "step": self.step,
            "weights": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ledger": self.ledger.state_dict(),
            "randomness": "reproducible from the seed (insecure)" if self.randomness.reproducible else "secret",
            "privacy_parameters": self.privacy_parameters(),
            "config": self.cfg.to_dict(),
            "architecture": self.arch,
            "plan_configuration": self.plan_config,
            "num_classes": self.num_classes,
            "num_channels": self.task.num_channels,
            "validation_curve": [list(v) for v in self.validation_curve],
            "elapsed_seconds": self.elapsed,
        }

    def save_latest(self) -> None:
        if not distributed.is_main_process():  # distributed: only rank 0 writes files
            return
        save_checkpoint(self.state_dict(), self.private_dir / CHECKPOINT_FILE)  # the log is written as it goes

    def resume(self) -> None:
        path = self.private_dir / CHECKPOINT_FILE
        if not path.is_file():
            raise DpunetError(f"--continue: {path} not found")
        state = load_checkpoint(path, self.device)
        saved, now = state["privacy_parameters"], self.privacy_parameters()
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
            raise DpunetError(f"--continue with changed privacy parameters ({detail}); start a new run instead")
        saved_cfg, now_cfg = state.get("config", {}), self.cfg.to_dict()
        reshaped = {k: (saved_cfg[k], now_cfg[k]) for k in RESUME_FIXED_OPTIONS
                    if k in saved_cfg and saved_cfg[k] != now_cfg[k]}
        if reshaped:
            detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in reshaped.items())
            raise DpunetError(f"--continue with a changed model or optimiser ({detail}); start a new run instead")
        self.model.load_state_dict(state["weights"])
        self.ema.load_state_dict(state["ema"])
        # the saved optimiser is the one of the last step taken; the next train_step switches phase if due
        self._enter_phase_of(max(int(state["step"]) - 1, 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.ledger.load_state_dict(state["ledger"])
        self.step = int(state["step"])
        self.validation_curve = [tuple(v) for v in state.get("validation_curve", [])]
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        self.log = TrainingLog.read(self.log.path, self.log.write_through)
        self.log.truncate(self.step)  # rows of steps lost with the interruption

    # ----- the run ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _run_lock(self) -> Iterator[None]:
        """One process per run folder: a second dpunet_train (or --continue) on the same task/fold/run refuses
        instead of racing the first into the same files. The lock file sits beside the fold folder, and is removed
        again when the run never created that folder."""
        if not distributed.is_main_process():
            yield
            return
        import fcntl

        lock_path = self.output_dir.parent / f".{self.output_dir.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DpunetError(f"{self.output_dir} is in use by another dpunet_train (lock {lock_path}); wait "
                                  f"for it to finish, or choose another run") from None
            try:
                yield
            finally:
                if not self.output_dir.exists():
                    lock_path.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        lock_path.parent.rmdir()  # only if empty: a run folder created for nothing
                fcntl.flock(handle, fcntl.LOCK_UN)

    def run(self, resume: bool = False, stop_after_steps: int | None = None) -> dict[str, Any] | None:
        """Train to T steps (or, for tests, stop early after `stop_after_steps` as if interrupted)."""
        with self._run_lock():
            return self._run(resume, stop_after_steps)

    def _run(self, resume: bool, stop_after_steps: int | None) -> dict[str, Any] | None:
        cfg = self.cfg
        if resume:
            self.resume()  # distributed: every rank loads the same checkpoint
        elif (self.private_dir / CHECKPOINT_FILE).is_file() or self.release_dir.is_dir():
            raise DpunetError(f"{self.output_dir} already holds a run: use --continue to resume it, or remove it")
        self.private_dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main_process():
            self.log.write()  # a fresh run starts a fresh file; a resumed one drops the rows it will redo
        # distributed: all ranks must start from the same weights (same seed or the same checkpoint); this
        # collective also makes every rank check the output folder before rank 0 writes to it
        distributed.assert_replicas_identical(self.replica_tensors(), "weights at the start")
        if distributed.is_main_process():
            write_json({"training_config": cfg.to_dict(), "privacy_parameters": self.privacy_parameters(),
                        "architecture": self.arch, "engine": self.engine_description(),
                        "parameters": {"total": sum(p.numel() for p in self.model.parameters()),
                                       "trained": self.num_trained_parameters, "subset": cfg.trainable,
                                       "noise_norm_per_step_in_units_of_C": self.noise_norm_per_step()},
                        "initial_weights": self.initial_weights, "micro_batch": self.micro_batch_record,
                        "run_time_estimate": self.run_time_estimate.to_dict(),
                        "world_size": distributed.world_size()},
                       self.private_dir / "run_config.json")
        if cfg.private and self.ledger.would_exceed(self.training_epsilon, self.training_delta,
                                                    extra_steps=cfg.steps - self.step,
                                                    accountant="prv"):
            raise DpunetError(f"{cfg.steps - self.step} more steps would exceed epsilon {cfg.epsilon}; refusing to train")
        if self.noise_norm_per_step() > NOISE_NORM_WARNING and self.initial_weights is None \
                and distributed.is_main_process():
            tqdm.write(f"warning: the noise on each averaged gradient has norm {self.noise_norm_per_step():.1f} C "
                       f"(sigma {self.noise_multiplier:.2f} / {cfg.patients_per_step} patients x sqrt of "
                       f"{self.num_trained_parameters} trained parameters) against a signal of at most C: from a "
                       f"random initialisation expect little learning; start from pretrained weights (--init-from "
                       f"random_images or the plan's default source), or train fewer parameters, raise epsilon or "
                       f"patients (documentation/training.md, 'Will it learn?')")
        last_save = time.monotonic()
        session_steps = 0
        self._open_loader()
        try:
            return self._train_loop(last_save, session_steps, stop_after_steps)
        finally:
            self.loader.close()

    def _train_loop(self, last_save: float, session_steps: int, stop_after_steps: int | None) -> dict[str, Any] | None:
        cfg = self.cfg
        # the run folder's name says which run (arch, configuration, epsilon, variant) when several train in turn
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not distributed.is_main_process(),
                   desc=f"train {self.task_name} {self.output_dir.parent.name} fold {cfg.fold}")
        shown_epsilon = "-"
        while self.step < cfg.steps:
            if cfg.private and self.ledger.would_exceed(self.training_epsilon, self.training_delta, accountant="prv"):
                raise DpunetError("the next step would exceed the privacy budget; refusing to continue")
            row = self.train_step()
            self.elapsed += row["seconds"]
            if cfg.private and (self.step % cfg.eps_log_every == 0 or self.step == cfg.steps):
                row["epsilon_spent"] = self.epsilon_now("prv")
            elif not cfg.private:
                row["epsilon_spent"] = "inf"
            self.log.append(row)
            bar.update(1)
            if row.get("epsilon_spent") not in (None, ""):  # computed every eps_log_every steps: keep the last
                shown_epsilon = f"{float(row['epsilon_spent']):.3f}"
            bar.set_postfix(eps=shown_epsilon,
                            loss=f"{row['loss_noisy_step']:.3f}" if row["loss_noisy_step"] != "" else "-")
            session_steps += 1
            due = (cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0) or \
                  (time.monotonic() - last_save > 60 * cfg.checkpoint_minutes)
            if due and self.step < cfg.steps:
                self.save_latest()
                last_save = time.monotonic()
            if stop_after_steps is not None and session_steps >= stop_after_steps and self.step < cfg.steps:
                self.save_latest()
                bar.close()
                return None
        bar.close()
        return self.finish()

    def engine_description(self) -> Any:
        describe = getattr(self.engine, "describe", None)
        return describe() if callable(describe) else {"name": self.engine.name}

    def replica_tensors(self) -> list[torch.Tensor]:
        """What must be identical on every rank of a distributed run: the weights and their EMA."""
        return list(self.model.state_dict().values()) + list(self.ema.weights().values())

    def inference_weights(self) -> dict[str, torch.Tensor]:
        return self.ema.weights() if self.cfg.evaluate_ema else self.model.state_dict()

    def finish(self) -> dict[str, Any]:
        """Final checkpoint, privacy report, validation, log and plot (rank 0 only; other ranks wait for it and
        return no report)."""
        cfg = self.cfg
        distributed.assert_replicas_identical(self.replica_tensors(), "final weights")
        if not distributed.is_main_process():
            distributed.barrier()  # rank 0 writes the outputs and validates
            return {"report": None, "validation": None, "output_dir": str(self.output_dir)}
        # the final state first: a kill from here on resumes at step T (--continue takes no further step), so
        # the released weights are those of the one run the report accounts for, never a second draw
        self.save_latest()
        report = self.privacy_report()
        self.write_release(report)
        summary = None
        if cfg.validation and self.val_cases:
            summary = self.validate()
        plot_progress(self.log, self.validation_curve, self.private_dir / "progress.png",
                      f"{self.task_name} {cfg.configuration} fold {cfg.fold} eps {report['target_epsilon']}")
        self.save_latest()
        distributed.barrier()
        return {"report": report, "validation": summary, "output_dir": str(self.output_dir)}

    def validate(self) -> dict[str, Any]:
        from dpunet.training.validation import mean_foreground_dice, validate_fold

        model = build_network(self.arch, self.task.num_channels, self.num_classes, self.cfg.deep_supervision)
        model.load_state_dict(self.inference_weights())
        model.deep_supervision = False  # full-resolution head only
        model.to(self.device)
        summary = validate_fold(model, self.task, self.val_cases, self.data_dir, self.plan_config, self.num_classes,
                                self.private_dir / "validation", self.cfg.validation_step_size,
                                self.cfg.validation_mirroring)
        self.validation_curve.append((self.step, mean_foreground_dice(summary)))
        return summary

    def public_data(self) -> list[str]:
        used = []
        if self.initial_weights is not None:
            w = self.initial_weights
            used.append(f"initial weights {w['path']} (weights sha256 {w['weights_sha256']}): trained on "
                        f"{w['trained_on']}; {w['tensors_copied']} tensors copied, "
                        f"{len(w['tensors_kept_at_initialisation'])} kept at their seeded initialisation")
        if self.public_subspace is not None:
            sub = self.public_subspace
            used.append(f"public gradient subspace (--public-subspace {sub.dimension}): every noisy gradient was "
                        f"projected onto the span of {sub.dimension} gradients of {sub.batch_size} public samples "
                        f"each at the current weights, from {sub.description}; post-processing of the DP release, "
                        f"no privacy cost")
        return used or ["none (no pretraining, no public data)"]

    def write_release(self, report: dict[str, Any]) -> None:
        """release/: the model file (inference weights and what prediction needs) and the privacy report."""
        write_release(self.release_dir, weights=self.inference_weights(), architecture=self.arch,
                      num_channels=self.task.num_channels, num_classes=self.num_classes,
                      plan_configuration=self.plan_config,
                      description={"task": self.task_name, "configuration": self.cfg.configuration,
                                   "fold": str(self.cfg.fold), "arch": self.cfg.arch, "width": self.cfg.width,
                                   "inference_weights": "ema" if self.cfg.evaluate_ema else "final",
                                   "labels": self.plans.get("labels", {})},
                      privacy_report=report)
        write_json(report, self.release_dir / "privacy_report.json")
        write_text(render_privacy_report_markdown(report), self.release_dir / "privacy_report.md")

    def _hyperparameter_statement(self) -> str:
        """Where the hyperparameters came from: a public tuning file (dpunet_tune_public), else the plan's."""
        tuning = self.cfg.public_tuning
        if tuning:
            return public_tuning_statement(tuning["path"], tuning["sha256"], tuning["proxy_source"],
                                           self.task_name, tuning.get("tuned", ["learning_rate"]))
        return hyperparameter_statement(self.task_name)

    def privacy_report(self) -> dict[str, Any]:
        cfg = self.cfg
        caveats = [
            "private/ (resumption checkpoint, run configuration with the seed, training_log.csv and progress.png "
            "with losses computed on private data without noise, validation on held-out patients) is for the data "
            "owner, not for release; release/ holds what may be shared",
            self._hyperparameter_statement(),
        ]
        if self.plans.get("shape_source") == "cropped":
            caveats.append("the plan used median shapes after cropping to non-zero (derived from pixels, not DP)")
        if cfg.select_checkpoint_on_validation:
            caveats.append("checkpoint selected on private validation data: not covered by the guarantee")
        if cfg.private and cfg.delta >= 1.0 / self.num_patients:
            caveats.append(f"LARGE DELTA: delta {cfg.delta:g} is not below 1/N = {1.0 / self.num_patients:.3g} "
                           f"(--allow-large-delta); such a delta permits releasing a patient's data outright")
        touches_covered = ["gradients of every training patient (DP-SGD, this report)"]
        touches_not = ["image header metadata (spacing, shape, origin, direction): declared public",
                       "per-image normalisation uses only each patient's own pixels (part of that patient's input)",
                       "validation metrics (private/validation/summary.json) are computed without DP on the fold's "
                       "held-out patients, who are not in the training set: they describe those patients, not the "
                       "model's training data, and are private"]
        if self.fingerprint_epsilon:
            touches_covered.append(f"DP intensity statistics for normalisation (epsilon {self.fingerprint_epsilon}, "
                                   f"subtracted from the budget --eps {cfg.epsilon})")
        assumptions = [
            f"the number of training patients N = {self.num_patients} is treated as public: q = (q*N)/N, the noise "
            f"multiplier and the divisor q*N were chosen knowing it",
            split_statement(self.plans.get("split_scheme", "kfold"), cfg.fold),
        ]
        return build_privacy_report(
            num_patients=self.num_patients,
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            clip_norm=cfg.clip_norm if cfg.private else None,
            delta=self.training_delta if cfg.private else cfg.delta,
            target_epsilon=cfg.epsilon,
            steps_planned=cfg.steps,
            patches_per_patient=cfg.patches_per_patient,
            ledger=self.ledger,
            data_touches_covered=touches_covered,
            data_touches_not_covered=touches_not,
            fingerprint_epsilon=self.fingerprint_epsilon,
            fingerprint_delta=self.fingerprint_delta,
            public_data=self.public_data(),
            caveats=caveats,
            assumptions=assumptions,
            randomness="reproducible" if self.randomness.reproducible else "secret",
            extra={"task": self.task_name, "configuration": cfg.configuration, "fold": cfg.fold,
                   "num_cases": len(self.train_cases), "engine": self.engine.name,
                   "trained_parameters": self.num_trained_parameters, "trainable_subset": cfg.trainable,
                   "noise_norm_per_step_in_units_of_C": self.noise_norm_per_step(),
                   "public_subspace_dimension": cfg.public_subspace,
                   "probe_steps": cfg.probe_steps,
                   "probe_trainable": cfg.probe_trainable if cfg.probe_steps else None,
                   "probe_trained_parameters": self.probe_trained_parameters,
                   "model_for_inference": "EMA of the weights at the final step" if cfg.evaluate_ema
                   else "weights at the final step"},
        )
