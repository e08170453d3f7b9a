"""dpunet_plan -t TASK [-c 2d 3d_fullres] [--eps 8] [--delta 1e-5] [...]: plans from an existing fingerprint."""
from __future__ import annotations

import argparse
import math

from dpunet.dataset.msd import TaskInfo, load_task
from dpunet.paths import preprocessed_root, raw_root, resolve_task
from dpunet.planning.dp_plan import DEFAULTS
from dpunet.planning.planner import plan_experiment
from dpunet.planning.splits import DEFAULT_SPLIT_SCHEME, SPLIT_SCHEMES, make_splits
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import load_json, write_json


def parse_epsilon(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"epsilon must be positive or 'inf', got {text}")
    return value


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--configurations", nargs="+", default=None,
                        help="configurations to plan (default: 2d and 3d_fullres, plus 3d_lowres where needed)")
    parser.add_argument("--eps", type=parse_epsilon, default=8.0, help="target epsilon ('inf' = non-private)")
    parser.add_argument("--delta", type=float, default=DEFAULTS["delta"], help="target delta (default 1e-5)")
    parser.add_argument("--patients-per-step", type=int, default=None, help="expected patients per step q*N")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="DP-SGD steps T")
    parser.add_argument("--patches-per-patient", type=int, default=DEFAULTS["patches_per_patient"],
                        help="patches K averaged per patient before clipping")
    parser.add_argument("--clip", type=float, default=DEFAULTS["clip_norm"], help="per-patient clip norm C")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the features per stage")
    parser.add_argument("--num-groups", type=int, default=8, help="GroupNorm groups")
    parser.add_argument("--gpu-memory-gb", type=float, default=16.0, help="memory budget for the micro-batch")
    parser.add_argument("--shape-source", choices=["header", "cropped"], default="header",
                        help="median shape from image headers (public, default) or shapes after cropping")
    parser.add_argument("--split-scheme", choices=SPLIT_SCHEMES, default=DEFAULT_SPLIT_SCHEME,
                        help="cross-validation folds: patient_hash (default: a patient's fold depends on its own id "
                             "only) or kfold (nnU-Net's split; the privacy report then assumes the split fixed)")
    parser.add_argument("--max-noise-to-signal", type=float, default=DEFAULTS["max_noise_to_signal"],
                        help="warn above this sigma/(qN)")


def run_planning(task: TaskInfo, args: argparse.Namespace) -> dict:
    out_dir = preprocessed_root() / task.name
    fp_path = out_dir / "dataset_fingerprint.json"
    if not fp_path.is_file():
        raise DpunetError(f"{fp_path} not found: run dpunet_extract_fingerprint (or dpunet_plan_and_preprocess)")
    plans, splits = plan_experiment(
        task, load_json(fp_path), args.configurations, args.eps, args.delta, args.patients_per_step, args.steps,
        args.patches_per_patient, args.clip, args.width, num_groups=args.num_groups,
        gpu_memory_gb=args.gpu_memory_gb, shape_source=args.shape_source,
        max_noise_to_signal=args.max_noise_to_signal, split_scheme=args.split_scheme)
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


def print_plan_summary(plans: dict) -> None:
    for name, c in plans["configurations"].items():
        dp = c["dp"]
        arch = c["architecture"]["kwargs"]
        print(f"[{name}] spacing {c['spacing']} median shape {c['median_shape']} patch {c['patch_size']} "
              f"stages {arch['n_stages']} features {arch['features_per_stage']} "
              f"patients/micro-batch {c['patients_per_micro_batch']}")
        print(f"    dp: eps {dp['epsilon']} delta {dp['delta']} N {dp['num_patients']} q {dp['sample_rate']:.3f} "
              f"K {dp['patches_per_patient']} T {dp['steps']} sigma {dp['noise_multiplier']:.3f} "
              f"noise/signal {dp['noise_to_signal']:.4f}")
        for w in dp["warnings"]:
            print(f"    WARNING: {w}")


def load_preprocessed_task(task_arg: str) -> TaskInfo:
    name = resolve_task(task_arg, raw_root(), preprocessed_root())
    for folder in (raw_root() / name, preprocessed_root() / name):
        if (folder / "dataset.json").is_file():
            return load_task(folder)
    raise DpunetError(f"no dataset.json for {name} in {raw_root()} or {preprocessed_root()}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_plan", description=__doc__)
    parser.add_argument("-t", "--task", required=True)
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    run_planning(load_preprocessed_task(args.task), args)
    return 0


if __name__ == "__main__":
    main()
