"""dpunet_tune_public -t TASK -c CONFIGURATION --eps E [--proxy random_images|synthetic_brain|synthetic_hippocampus]
[--learning-rates 3e-3,1e-2,3e-2] [--arch NAME] [--width W[,W2..]] [--steps T[,T2..]]
[--patients-per-step B[,B2..]] [--patches-per-patient K[,K2..]] ...

Chooses the DP learning rate of the run `dpunet_train TASK FOLD -c CONFIGURATION --eps E` (same options) on a
public proxy task: the target's public metadata (N, channels, classes, the plan's median shape and spacing) with
images from a public generator, trained with the target's network and privacy parameters, one run per candidate,
scored on proxy validation patients. Several comma-separated values of --steps, --patients-per-step,
--patches-per-patient or --width make them tuned too (every combination is a candidate, each with its own
calibrated noise).
Writes public_tuning__<configuration>__<arch>__eps<E>.json into the target's preprocessed folder; dpunet_train then
takes the chosen values (unless --lr is given; a tuned setting given on its command line must equal the chosen
one) and the privacy report says so. No private image or label is read (documentation/tuning.md)."""
from __future__ import annotations

import argparse
from typing import Callable

from dpunet.utils.arguments import parse_epsilon
from dpunet.utils.errors import DpunetError, cli_entry


def comma_separated(kind: type, what: str) -> Callable[[str], list]:
    """An argparse type: 'a,b,c' -> [kind(a), kind(b), kind(c)], else a message naming `what` was expected."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated {what} expected, got {text!r}") from None

    return parse


parse_numbers = comma_separated(float, "numbers")
parse_counts = comma_separated(int, "whole numbers")


def build_parser() -> argparse.ArgumentParser:
    from dpunet.pretraining.sources import PUBLIC_SOURCES
    from dpunet.tuning.proxy_task import DEFAULT_VALIDATION_PATIENTS
    from dpunet.tuning.tune import DEFAULT_LEARNING_RATES

    p = argparse.ArgumentParser(prog="dpunet_tune_public", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--task", required=True, help="target task id (4) or name (Task04_Hippocampus)")
    p.add_argument("-c", "--configuration", required=True, help="target plan configuration (2d, 3d_fullres)")
    p.add_argument("--eps", type=parse_epsilon, required=True, help="the target run's epsilon (finite)")
    p.add_argument("--proxy", default="random_images", choices=sorted(PUBLIC_SOURCES),
                   help="public generator of the proxy's images and labels (random_images); it must differ from "
                        "the generator the run's initial weights were pretrained on")
    p.add_argument("--learning-rates", type=parse_numbers, default=list(DEFAULT_LEARNING_RATES),
                   help="candidates, comma-separated (3e-3,1e-2,3e-2)")
    p.add_argument("--fold", default="0", help="the fold whose number of training patients N the proxy copies (0)")
    p.add_argument("--proxy-validation-patients", type=int, default=DEFAULT_VALIDATION_PATIENTS,
                   help=f"proxy patients each candidate is scored on ({DEFAULT_VALIDATION_PATIENTS})")
    p.add_argument("--proxy-seed", type=int, default=0, help="seed of the proxy's images (0)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="processes preprocessing the proxy (1)")
    p.add_argument("--arch", default="unet", help="architecture, as dpunet_train --arch (unet)")
    p.add_argument("--width", type=parse_numbers, default=None,
                   help="width multiplier, as dpunet_train; several values: tuned")
    p.add_argument("--init-from", default=None, help="initial weights, as dpunet_train (plan default)")
    p.add_argument("--pretraining-steps", type=int, default=None, help="as dpunet_train")
    p.add_argument("--delta", type=float, default=None, help="as dpunet_train (plan default)")
    p.add_argument("--steps", type=parse_counts, default=None,
                   help="DP-SGD steps T, as dpunet_train (plan default); several values: tuned")
    p.add_argument("--patients-per-step", type=parse_counts, default=None,
                   help="expected patients per step q*N (values above N mean all); several values: tuned")
    p.add_argument("--patches-per-patient", type=parse_counts, default=None,
                   help="patches K per patient; several values: tuned")
    p.add_argument("--clip", type=float, default=None, dest="clip_norm", help="per-patient clip norm C")
    p.add_argument("--seed", type=int, default=None, help="as dpunet_train (0)")
    p.add_argument("--engine", default=None, help="per-patient gradient engine, as dpunet_train")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def _values(entry: dict, keys: list[str]) -> str:
    names = {"learning_rate": "lr", "steps": "T", "patients_per_step": "q*N", "patches_per_patient": "K",
             "width": "width"}
    return ", ".join(f"{names[k]} {entry[k]:g}" for k in keys)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    import torch

    from dpunet.planning.plans import load_plans
    from dpunet.tuning.tune import tune_public

    args = build_parser().parse_args(argv)
    if args.proxy_validation_patients < 1:
        raise DpunetError("--proxy-validation-patients must be at least 1")
    task_name, _ = load_plans(args.task)
    options = {k: getattr(args, k) for k in ("arch", "init_from", "pretraining_steps", "delta", "clip_norm", "seed",
                                             "engine")}
    options["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    search = {k: getattr(args, k) for k in ("steps", "patients_per_step", "patches_per_patient", "width")
              if getattr(args, k) is not None}
    path, record = tune_public(task_name, args.configuration, args.eps, args.proxy, args.learning_rates, args.fold,
                               args.proxy_validation_patients, args.proxy_seed, args.num_processes, search=search,
                               **options)
    print(f"public proxy: {record['proxy']['source']}")
    tuned = record["tuned"]
    for c in record["candidates"]:
        dice = c["proxy_mean_foreground_dice"]
        print(f"  {_values(c, tuned)}: sigma {c['noise_multiplier']:.3f}, proxy Dice "
              f"{'nan' if dice is None else f'{dice:.4f}'} "
              f"({c['seconds']:.0f} s{', reused' if c['reused_finished_run'] else ''})")
    print(f"chosen {_values(record['chosen'], tuned)} -> {path} ({record['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    main()
