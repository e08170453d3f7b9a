"""dpunet_train TASK FOLD --eps 8 [-c 3d_fullres|2d] [--delta 1e-5] [--arch NAME] [--steps T]
[--patients-per-step B] [--patches-per-patient K] [--clip C] [--lr LR] [--seed S] [--device cpu|cuda] [--continue]

FOLD is 0-4 or 'all'. --eps inf trains non-privately through the same code (no clipping, no noise).

Several GPUs or nodes: torchrun --nproc_per_node=G -m dpunet.training.cli TASK FOLD --eps 8 (one process per GPU,
same guarantee and report as one process; see documentation/training.md)."""
from __future__ import annotations

import argparse
import json

from dpunet.architectures import TRAINABLE_SUBSETS
from dpunet.planning.dp_plan import INIT_FROM_METAVAR, PUBLIC_PRETRAINING_SOURCES
from dpunet.utils.arguments import parse_epsilon
from dpunet.utils.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpunet_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id (4) or name (Task04_Hippocampus, Dataset004_Hippocampus)")
    p.add_argument("fold", help="0-4 or all")
    p.add_argument("--eps", type=parse_epsilon, required=True, help="target epsilon, or inf for non-private")
    p.add_argument("-c", "--configuration", default=None, help="plan configuration (default 3d_fullres, else 2d)")
    p.add_argument("--delta", type=float, default=None, help="target delta (plan default 1e-5)")
    p.add_argument("--arch", default="unet", help="architecture: a U-Net preset, a MONAI network or a classic "
                   "family (unet; list: dpunet_archs)")
    p.add_argument("--width", type=float, default=None, help="width multiplier of the planned features")
    p.add_argument("--dp-norm", default=None, choices=["group", "instance"],
                   help="per-sample norm replacing BatchNorm in converted networks (MONAI, classic families): "
                        "GroupNorm (group, default) or InstanceNorm without running statistics (instance)")
    p.add_argument("--norm-groups", type=int, default=None,
                   help="GroupNorm groups for --dp-norm group: the largest divisor of each layer's channels up to "
                        "this (8)")
    p.add_argument("--output-stride", type=int, default=None, choices=[8, 16],
                   help="output stride of the dilated classic families' encoder (deeplabv3plus: 16, pspnet: 8); "
                        "its later strides become dilations")
    p.add_argument("--encoder-depth", type=int, default=None, choices=[18, 34],
                   help="classic families' encoder: ResNet-18-like (18: 2, 2, 2, 2 blocks per stage) or "
                        "ResNet-34-like (34: 3, 4, 6, 3)")
    p.add_argument("--trainable", default=None, choices=sorted(TRAINABLE_SUBSETS),
                   help="parameters DP-SGD updates; the rest keep their initial weights, pretrained or seeded (all; "
                        "bias_norm_head: biases, norms and heads; decoder: all but the encoder's weights; head: the "
                        "output heads)")
    p.add_argument("--probe-steps", type=int, default=None, metavar="T1",
                   help="phased fine-tuning (DP-RandP): the first T1 of the T DP-SGD steps train only "
                        "--probe-trainable, then --trainable takes over with a fresh optimiser; every step has the "
                        "same sigma, q and clip, so the account is that of T steps (0: off, the default)")
    p.add_argument("--probe-trainable", default=None, choices=sorted(TRAINABLE_SUBSETS),
                   help="parameters the --probe-steps phase trains (head: the 1x1 output heads, a private linear "
                        "probe of the public features; or bias_norm_head)")
    p.add_argument("--public-subspace", type=int, default=None, metavar="K",
                   help="project every noisy gradient onto the span of K gradients of public data at the current "
                        "weights: keeps sqrt(K/d) of the noise norm and the part of the signal in that span; "
                        "post-processing of the DP release, so no privacy cost (0: off, the default)")
    p.add_argument("--public-subspace-batch", type=int, default=None, metavar="B",
                   help="public samples per public gradient of --public-subspace (4)")
    p.add_argument("--public-subspace-source", default=None, choices=list(PUBLIC_PRETRAINING_SOURCES),
                   help="public generator of --public-subspace's samples (the run's --init-from when it names "
                        "one, else random_images)")
    p.add_argument("--init-from", default=None, metavar=INIT_FROM_METAVAR,
                   help="initial weights, by default the plan's training.init_from (synthetic_hippocampus where "
                        "dataset.json declares MR images of the hippocampus, else random_images): the planned "
                        "network pretrained on random-process images (random_images), on synthetic brain MR images "
                        "from the public MNI152 template (synthetic_brain) or on synthetic hippocampus crops "
                        "labelled by a published anatomical prior (synthetic_hippocampus), each made once per task "
                        "and cached; a random initialisation (none); or a checkpoint trained on public data. The "
                        "privacy report lists them")
    p.add_argument("--pretraining-steps", type=int, default=None,
                   help="steps of that pretraining (plan default: 1500 in 2D, 600 in 3D)")
    p.add_argument("--steps", type=int, default=None, help="DP-SGD steps T (plan default)")
    p.add_argument("--patients-per-step", type=int, default=None, help="expected patients per step q*N")
    p.add_argument("--patches-per-patient", type=int, default=None, help="patches K per patient, averaged")
    p.add_argument("--clip", type=float, default=None, dest="clip_norm", help="per-patient clip norm C")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw", "nadam"])
    p.add_argument("--lr", type=float, default=None, dest="learning_rate",
                   help="learning rate (default: the plan's, or the choice of a public tuning file that "
                        "dpunet_tune_public made for these settings; documentation/tuning.md)")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine", "poly"])
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--no-ema", dest="evaluate_ema", action="store_false", default=None,
                   help="evaluate and export the final weights instead of their EMA")
    p.add_argument("--no-deep-supervision", dest="deep_supervision", action="store_false", default=None)
    p.add_argument("--engine", default=None, help="per-patient gradient engine (auto, fast, functorch, "
                                                  "opacus_hooks, reference_loop)")
    p.add_argument("--patients-per-micro-batch", type=int, default=None,
                   help="physical micro-batch (patients); default: the most that fit the plan's memory budget "
                        "with the network built (a measured estimate)")
    p.add_argument("--num-workers", type=int, default=None, help="background data-loading processes")
    p.add_argument("--no-augmentation", dest="augmentation", action="store_false", default=None,
                   help="patches without data augmentation (ablations, debugging)")
    p.add_argument("--oversample-foreground", type=float, default=None,
                   help="fraction of patches centred on a foreground voxel (plan default 0.33)")
    p.add_argument("--dice-weight", type=float, default=None, help="weight of the soft Dice term (1)")
    p.add_argument("--ce-weight", type=float, default=None, help="weight of the cross-entropy term (1)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds initialisation, augmentation, patch choice and pretraining (0); never the DP noise or "
                        "the Poisson sampling, which come from the operating system's entropy")
    p.add_argument("--insecure-reproducible-noise", action="store_true", default=None,
                   help="derive the DP noise and the Poisson sampling from --seed, for tests and debugging: the run is "
                        "NOT private against anyone who knows the seed, and the privacy report says so first")
    p.add_argument("--allow-large-delta", action="store_true", default=None,
                   help="accept delta >= 1/N (refused by default; the privacy report flags it)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--checkpoint-minutes", type=float, default=None,
                   help="minutes between private/checkpoint_latest.pt")
    p.add_argument("--no-validation", dest="validation", action="store_false", default=None)
    p.add_argument("--validation-mirroring", action="store_true", default=None,
                   help="mirroring test-time augmentation during the final validation")
    p.add_argument("--run-tag", default=None, help="text appended to the run folder's name, to keep runs that differ "
                                                   "in other options apart (dpunet_study sets one)")
    p.add_argument("--max-hours", type=float, default=None,
                   help="refuse to start when the run's estimated wall time (measured on this device before "
                        "pretraining) exceeds this many hours; without it a CPU run estimated over 1 h only warns")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="resume from private/checkpoint_latest.pt")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from dpunet.api import train

    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("task", "fold", "eps", "configuration", "resume")}
    run = train(args.task, args.fold, args.eps, args.configuration, resume=args.resume, **options)
    if run.privacy_report is None:
        return 0  # a non-zero rank of a distributed run: rank 0 prints the summary and wrote every output
    report = run.privacy_report
    print(f"privacy: epsilon {report['epsilon']['prv']} (PRV) / {report['epsilon']['rdp']} (RDP) at delta "
          f"{run.options['delta']}, sigma {report['noise_multiplier']}, q {report['sample_rate']:.4f}, "
          f"T {report['steps_taken']}")
    tuning = run.options.get("public_tuning")
    if tuning:
        taken = tuning.get("taken", {"learning_rate": tuning["learning_rate"]})
        print(f"from the public tuning file {tuning['path']}: "
              + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in taken.items()))
    if run.validation:
        mean = run.validation["mean"]
        print("validation Dice: " + json.dumps({k: round(v["Dice"], 4) for k, v in mean.items()}))
    print(f"outputs: {run.folder}")
    return 0


if __name__ == "__main__":
    main()
