"""Training configuration: the plan's entries, overridden by command-line options, as one flat record."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dpunet.architectures.classic_nets import DEFAULT_ENCODER_DEPTH, classic_encoder_options, is_classic_arch
from dpunet.architectures.dp_conversion import DP_NORMS
from dpunet.architectures.monai_nets import is_monai_arch, monai_has_deep_supervision
from dpunet.pretraining.pretrain import PretrainingConfig
from dpunet.utils.errors import DpunetError, warn

# fallbacks for plans made before pretraining existed: the same as dpunet_pretrain's
PRETRAINING_DEFAULTS = PretrainingConfig()
# fields whose change would alter the privacy guarantee: `--continue` refuses to resume if any differs
PRIVACY_FIELDS = ("epsilon", "delta", "steps", "patients_per_step", "patches_per_patient", "clip_norm",
                  "fold", "configuration", "task", "seed", "insecure_reproducible_noise", "allow_large_delta")


@dataclass
class TrainingConfig:
    task: str
    configuration: str
    fold: str
    arch: str = "unet"
    width: float = 1.0
    # the per-sample norm that replaces BatchNorm in converted networks (MONAI, classic families)
    dp_norm: str = "group"
    norm_groups: int = 8
    # the classic families' encoder: output stride 8 or 16 (dilated families; None: the family's own) and depth
    output_stride: int | None = None
    encoder_depth: int = DEFAULT_ENCODER_DEPTH
    trainable: str = "all"
    # DP-RandP's phased fine-tuning: the first probe_steps of the T steps train only the probe_trainable subset
    # (a private probe of the public features), the rest `trainable`; same sigma, q and C on every step
    probe_steps: int = 0
    probe_trainable: str = "head"
    init_from: str = "none"
    pretraining_steps: int = PRETRAINING_DEFAULTS.steps
    pretraining_batch_size: int = PRETRAINING_DEFAULTS.batch_size
    pretraining_learning_rate: float = PRETRAINING_DEFAULTS.learning_rate
    # project each noisy gradient onto the span of this many public gradients (0: off; post-processing, no
    # privacy cost; dpunet.privacy.public_subspace), each over this many samples of a public source (default:
    # the run's init_from when it names one, else random_images)
    public_subspace: int = 0
    public_subspace_batch: int = 4
    public_subspace_source: str | None = None
    epsilon: float = 8.0
    delta: float = 1e-5
    steps: int = 500
    patients_per_step: int | None = None
    patches_per_patient: int = 4
    clip_norm: float = 1.0
    optimizer: str = "adam"
    learning_rate: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 20
    ema_decay: float = 0.99
    evaluate_ema: bool = True
    deep_supervision: bool = True
    # seeds initialisation, augmentation, patch choice and pretraining; never the noise or the Poisson sampling
    seed: int = 0
    # derive noise and sampling from `seed` (tests, debugging): the report says the run is not private
    insecure_reproducible_noise: bool = False
    allow_large_delta: bool = False
    device: str = "cpu"
    engine: str = "auto"
    num_workers: int = 0
    augmentation: bool = True
    oversample_foreground: float = 0.33
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    # None: the trainer sizes it for the network it builds (memory estimate against the plan's budget)
    patients_per_micro_batch: int | None = None
    checkpoint_minutes: float = 5.0
    checkpoint_every_steps: int | None = None
    eps_log_every: int = 10
    validation: bool = True
    validation_step_size: float = 0.5
    validation_mirroring: bool = False
    select_checkpoint_on_validation: bool = False
    # refuse to start when the measured estimate of the run's wall time exceeds this (hours); None: only warn
    max_hours: float | None = None
    # appended to the run folder's name (dpunet_study: a short hash of a cell's other overrides); not a hyperparameter
    run_tag: str = ""
    # the public tuning file the learning rate came from ({path, sha256, proxy_source, learning_rate}), set by
    # merge_plan_and_options when dpunet_tune_public made one for these settings and no learning rate was given
    public_tuning: dict[str, Any] | None = None

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epsilon"] = "inf" if not self.private else self.epsilon
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["epsilon"] = float(values.get("epsilon", 8.0))
        return cls(**values)

    def privacy_fields(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in PRIVACY_FIELDS}


def pretraining_config(cfg: TrainingConfig) -> PretrainingConfig:
    """The pretraining a run starting from a named public source uses (its cached file is named by it)."""
    return PretrainingConfig(arch=cfg.arch, width=cfg.width, steps=cfg.pretraining_steps,
                             batch_size=cfg.pretraining_batch_size, learning_rate=cfg.pretraining_learning_rate,
                             seed=cfg.seed, device=cfg.device, dp_norm=cfg.dp_norm, norm_groups=cfg.norm_groups,
                             output_stride=cfg.output_stride, encoder_depth=cfg.encoder_depth, source=cfg.init_from)


def merge_plan_and_options(plan_config: dict[str, Any], options: dict[str, Any]) -> TrainingConfig:
    """Plan entries first (dp and training blocks), then every option the user gave (not None)."""
    dp, train = plan_config["dp"], plan_config["training"]
    values: dict[str, Any] = {
        "delta": dp["delta"],
        "steps": dp["steps"],
        "patches_per_patient": dp["patches_per_patient"],
        "clip_norm": dp["clip_norm"] if dp.get("clip_norm") else 1.0,
        "oversample_foreground": plan_config.get("oversample_foreground_fraction", 0.33),
    }
    for key in ("optimizer", "learning_rate", "momentum", "weight_decay", "lr_schedule", "warmup_steps",
                "ema_decay", "evaluate_ema", "deep_supervision", "dice_weight", "ce_weight", "trainable",
                "init_from", "pretraining_steps", "pretraining_batch_size", "pretraining_learning_rate"):
        if key in train:
            values[key] = train[key]
    values.update({k: v for k, v in options.items() if v is not None})
    cfg = TrainingConfig(**values)
    if cfg.deep_supervision and ((is_monai_arch(cfg.arch) and not monai_has_deep_supervision(cfg.arch))
                                 or is_classic_arch(cfg.arch)):
        # MONAI networks other than DynUNet (whose heads enter the loss) and the classic families (DeepLabV3+,
        # FPN, PSPNet, LinkNet) give one output
        kind = "a MONAI network" if is_monai_arch(cfg.arch) else "a classic family"
        warn(f"--arch {cfg.arch} ({kind}) trains without deep supervision in dpunet")
        cfg.deep_supervision = False
    if cfg.dp_norm not in DP_NORMS:
        raise DpunetError(f"--dp-norm must be one of {', '.join(DP_NORMS)}, got {cfg.dp_norm!r}")
    if cfg.norm_groups < 1:
        raise DpunetError(f"--norm-groups must be at least 1, got {cfg.norm_groups}")
    # refused here, before any data is read, for an arch that lacks them; the family's own stride is recorded
    cfg.output_stride = classic_encoder_options(cfg.arch, cfg.output_stride, cfg.encoder_depth)[0]
    if cfg.steps < 1:
        raise DpunetError("--steps must be at least 1")
    if cfg.patches_per_patient < 1:
        raise DpunetError("--patches-per-patient must be at least 1")
    if cfg.private and cfg.clip_norm <= 0:
        raise DpunetError("--clip must be positive")
    if not (str(cfg.fold) == "all" or str(cfg.fold).isdigit()):
        raise DpunetError(f"fold {cfg.fold!r} does not exist: give a fold number (0-4 with the default 5 folds) "
                          f"or 'all'")
    if not (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise DpunetError(f"--lr must be a positive number, got {cfg.learning_rate}")
    if cfg.max_hours is not None and not (math.isfinite(cfg.max_hours) and cfg.max_hours > 0):
        raise DpunetError(f"--max-hours must be a positive number of hours, got {cfg.max_hours}")
    if cfg.patients_per_step is not None and cfg.patients_per_step < 1:
        raise DpunetError(f"--patients-per-step must be at least 1, got {cfg.patients_per_step}")
    if options.get("task") is not None and options.get("learning_rate") is None and cfg.private:
        apply_public_tuning(cfg, plan_config, options)
    return cfg


def apply_public_tuning(cfg: TrainingConfig, plan_config: dict[str, Any], options: dict[str, Any]) -> None:
    """Take the hyperparameters the task's public tuning file (dpunet_tune_public) chose, when one was made for this
    configuration, arch, epsilon and the run's other settings; a file made for other settings is named and not
    used. A tuned setting the user gave (`options`) is not replaced: it must equal the tuned value."""
    from dpunet.paths import preprocessed_root, raw_root, resolve_task
    from dpunet.planning.public_tuning import (describe_for_report, expected_patients_per_step, fold_num_patients,
                                               load_public_tuning, public_tuning_path, run_settings,
                                               settings_mismatch, transferred_patients_per_step, tuned_keys)

    try:
        task_name = resolve_task(cfg.task, preprocessed_root(), raw_root())
    except DpunetError:
        return  # the trainer names the missing task
    path = public_tuning_path(task_name, cfg.configuration, cfg.arch, cfg.epsilon)
    if not path.is_file():
        return
    record = load_public_tuning(path)
    num_patients = fold_num_patients(task_name, cfg.fold)
    taken = {k: record["chosen"][k] for k in tuned_keys(record) if options.get(k) is None}
    if "patients_per_step" in taken:
        taken["patients_per_step"] = transferred_patients_per_step(record, num_patients)
    trial = replace(cfg, **taken)
    settings = run_settings(trial, expected_patients_per_step(plan_config, num_patients, trial.patients_per_step))
    differ = settings_mismatch(record, settings, num_patients)
    if differ:
        warn(f"{path.name} was tuned for other settings ({'; '.join(differ)}): not used, the learning rate stays "
             f"{cfg.learning_rate:g} (the plan's); rerun dpunet_tune_public with this run's options, or give --lr")
        return
    for key, value in taken.items():
        setattr(cfg, key, value)
    cfg.public_tuning = describe_for_report(path, taken)
