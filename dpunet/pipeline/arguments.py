"""The options of the three stages (fingerprint, planning, preprocessing), defined once: each stage's command and
dpunet_plan_and_preprocess, which chains them, read them from here (command modules import no other command)."""
from __future__ import annotations

import argparse

from dpunet.planning.dp_plan import DEFAULTS
from dpunet.planning.splits import DEFAULT_SPLIT_SCHEME, SPLIT_SCHEMES
from dpunet.utils.arguments import parse_epsilon

TASK_HELP = "task id (4) or folder name in $DPUNET_RAW (Task04_Hippocampus, Dataset004_Hippocampus)"


def add_task_argument(parser: argparse.ArgumentParser) -> None:
    """-t/--task, with nnU-Net v2's spelling -d/--dataset."""
    parser.add_argument("-t", "-d", "--task", "--dataset", dest="task", required=True, help=TASK_HELP)


def add_fingerprint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--verify", dest="verify", action="store_true", default=True,
                        help="check dataset integrity first (default)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the integrity check")
    parser.add_argument("--ct-statistics", choices=["prior", "dp"], default="prior",
                        help="CT normalisation: a declared public HU window prior (default) or a DP estimate")
    parser.add_argument("--ct-epsilon", type=float, default=0.1, help="epsilon of the DP CT statistics (default 0.1)")


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


def plan_options(args: argparse.Namespace) -> dict:
    """plan_task's keywords from the options of add_plan_arguments."""
    return dict(configurations=args.configurations, epsilon=args.eps, delta=args.delta,
                patients_per_step=args.patients_per_step, steps=args.steps,
                patches_per_patient=args.patches_per_patient, clip_norm=args.clip, width=args.width,
                num_groups=args.num_groups, gpu_memory_gb=args.gpu_memory_gb, shape_source=args.shape_source,
                max_noise_to_signal=args.max_noise_to_signal, split_scheme=args.split_scheme)


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")
