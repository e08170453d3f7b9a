"""The planning stage: plans and splits from an existing fingerprint, written to $DPUNET_PREPROCESSED/<task>/."""
from __future__ import annotations

from typing import Any

from dpunet.dataset.msd import TaskInfo
from dpunet.paths import preprocessed_root
from dpunet.planning.planner import plan_experiment
from dpunet.planning.splits import SPLIT_SCHEMES, make_splits
from dpunet.privacy.accounting import accountant_warnings_summary
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json, write_json


def plan_task(task: TaskInfo, **options: Any) -> dict[str, Any]:
    """Write dpunet_plans.json and splits_final.json; `options` are plan_experiment's keywords (configurations,
    epsilon, delta, patients_per_step, steps, patches_per_patient, clip_norm, width, num_groups, gpu_memory_gb,
    shape_source, max_noise_to_signal, split_scheme). Returns the plans."""
    out_dir = preprocessed_root() / task.name
    fp_path = out_dir / "dataset_fingerprint.json"
    if not fp_path.is_file():
        raise DpunetError(f"{fp_path} not found: run dpunet_extract_fingerprint (or dpunet_plan_and_preprocess)")
    with accountant_warnings_summary(f"the planning of {task.name}"):  # calibration asks the accountant often
        plans, splits = plan_experiment(task, load_json(fp_path), **options)
    splits_path = out_dir / "splits_final.json"
    existing = load_json(splits_path) if splits_path.is_file() else None
    generated = [make_splits(task.patients, scheme=s) for s in SPLIT_SCHEMES]
    if existing is not None and existing != splits and existing not in generated:
        # a hand-made split: no per-patient rule is known, so reports must assume it fixed
        plans["split_scheme"] = "custom"
        print(f"note: {splits_path} differs from the generated splits and is kept (edited by hand?); "
              f"privacy reports will state the fixed-split assumption")
    else:
        write_json(splits, splits_path)
    write_json(plans, out_dir / "dpunet_plans.json")
    print_plan_summary(plans)
    return plans


def print_plan_summary(plans: dict[str, Any]) -> None:
    for name, c in plans["configurations"].items():
        dp = c["dp"]
        arch = c["architecture"]["kwargs"]
        print(f"[{name}] spacing {c['spacing']} median shape {c['median_shape']} patch {c['patch_size']} "
              f"stages {arch['n_stages']} features {arch['features_per_stage']} "
              f"patients/micro-batch {c['patients_per_micro_batch']}")
        print(f"    dp: eps {dp['epsilon']} delta {dp['delta']} N {dp['num_patients']} q {dp['sample_rate']:.3f} "
              f"K {dp['patches_per_patient']} T {dp['steps']} sigma {dp['noise_multiplier']:.3f} "
              f"noise/signal {dp['noise_to_signal']:.4f}")
        training = c.get("training", {})
        if training.get("init_from"):
            print(f"    start: pretrained on {training['init_from']} ({training.get('init_from_rule', '')})")
        for w in dp["warnings"]:
            print(f"    WARNING: {w}")
