"""dpunet_pretrain TASK [-c 2d|3d_fullres] [--init-from random_images|synthetic_brain|synthetic_hippocampus]
[--arch NAME] [--width W] [--steps T] [--batch-size B] [-o FILE]

Pretrains the task's planned network, non-privately, on public data (no patient data, no privacy cost): images
of random processes (random_images), synthetic brain MR images from the public MNI152 template
(synthetic_brain), or synthetic hippocampus crops from the same template labelled by a published anatomical
prior (synthetic_hippocampus). Without --init-from it pretrains on the plan's source (synthetic_hippocampus
for an MR hippocampus task, else random_images). dpunet_train does this itself; this command makes the
checkpoint ahead of time, or with other settings for dpunet_train --init-from FILE (same -c, --arch, --width
and network options: --dp-norm, --norm-groups, --output-stride, --encoder-depth).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpunet.pretraining.pretrain import PretrainingConfig, pretrain_on_public_data, pretrained_checkpoint_path
from dpunet.pretraining.sources import PUBLIC_SOURCES
from dpunet.planning.plans import default_configuration, load_training_inputs
from dpunet.utils.errors import DpunetError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpunet_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PretrainingConfig()
    p.add_argument("task", help="task id (4) or name (Task04_Hippocampus)")
    p.add_argument("-c", "--configuration", default=None, help="plan configuration (default 3d_fullres, else 2d)")
    p.add_argument("--init-from", "--source", dest="source", default=None, choices=list(PUBLIC_SOURCES),
                   help="public data to pretrain on (the plan's training.init_from); synthetic_brain and "
                        "synthetic_hippocampus download the MNI152 template once (documentation/pretraining.md)")
    p.add_argument("--arch", default=defaults.arch, help="architecture, as for dpunet_train (list: dpunet_archs)")
    p.add_argument("--width", type=float, default=defaults.width, help="width multiplier, as for dpunet_train")
    p.add_argument("--dp-norm", default=defaults.dp_norm, choices=["group", "instance"],
                   help="norm replacing BatchNorm in converted networks, as for dpunet_train")
    p.add_argument("--norm-groups", type=int, default=defaults.norm_groups, help="GroupNorm groups, as for dpunet_train")
    p.add_argument("--output-stride", type=int, default=defaults.output_stride, choices=[8, 16],
                   help="dilated classic families' output stride, as for dpunet_train (the family's own)")
    p.add_argument("--encoder-depth", type=int, default=defaults.encoder_depth, choices=[18, 34],
                   help="classic families' encoder depth, as for dpunet_train (18)")
    p.add_argument("--steps", type=int, default=None, help="plan default (training.pretraining_steps)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="random images per step (plan default, training.pretraining_batch_size)")
    p.add_argument("--lr", type=float, default=None, dest="learning_rate",
                   help="plan default (training.pretraining_learning_rate)")
    p.add_argument("--no-deep-supervision", dest="deep_supervision", action="store_false")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="checkpoint path (default $DPUNET_RESULTS/<task>/pretrained/<arch>__<config>__width<w>"
                        "__<source>__steps<T>__seed<s>.pt, where dpunet_train looks for it)")
    return p


def network_options(cfg: PretrainingConfig) -> str:
    """The non-default network options of `cfg` as dpunet_train arguments (the DP run must build the same network)."""
    defaults = PretrainingConfig()
    pairs = (("--dp-norm", cfg.dp_norm, defaults.dp_norm), ("--norm-groups", cfg.norm_groups, defaults.norm_groups),
             ("--output-stride", cfg.output_stride, defaults.output_stride),
             ("--encoder-depth", cfg.encoder_depth, defaults.encoder_depth))
    return "".join(f" {option} {value}" for option, value, default in pairs if value != default)


def _planned_source(plan_training: dict, fallback: str) -> str:
    """The plan's public source; plans whose start is not a public source (none, a file) pretrain on `fallback`."""
    source = plan_training.get("init_from")
    return source if source in PUBLIC_SOURCES else fallback


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configuration = args.configuration or default_configuration(args.task)
    task_name, _, plan_config, _, task = load_training_inputs(args.task, configuration)
    plan, fallback = plan_config.get("training", {}), PretrainingConfig()
    cfg = PretrainingConfig(
        arch=args.arch, width=args.width,
        steps=args.steps or plan.get("pretraining_steps", fallback.steps),
        batch_size=args.batch_size or plan.get("pretraining_batch_size", fallback.batch_size),
        learning_rate=args.learning_rate or plan.get("pretraining_learning_rate", fallback.learning_rate),
        deep_supervision=args.deep_supervision, seed=args.seed, device=device, dp_norm=args.dp_norm,
        norm_groups=args.norm_groups, output_stride=args.output_stride, encoder_depth=args.encoder_depth,
        source=args.source or _planned_source(plan, fallback.source))
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DpunetError("--steps and --batch-size must be at least 1")
    output = args.output or pretrained_checkpoint_path(task_name, configuration, cfg)
    summary = pretrain_on_public_data(plan_config, task.num_channels, task.num_classes, cfg, output, task_name)
    print(f"pretrained {cfg.steps} steps in {summary['seconds']:.0f} s: loss {summary['loss_first_20_steps']:.3f} "
          f"-> {summary['loss_last_20_steps']:.3f}")
    print(f"checkpoint: {output}")
    cached = "" if args.output else f"  (or --init-from {cfg.source} --pretraining-steps {cfg.steps})"
    print(f"next: dpunet_train {task_name} FOLD -c {configuration} --arch {args.arch} --width {args.width:g}"
          f"{network_options(cfg)} --eps 8 --init-from {output}{cached}")
    return 0


if __name__ == "__main__":
    main()
