"""dpunet_audit TASK FOLD --eps 8 [-c 2d] [--canaries 1000] [--steps T] [--width W] [...]

Measures an empirical lower bound on epsilon for a training configuration with one DP training run (Steinke,
Nasr, Jagielski 2023): m Dirac gradient canaries, each in the training set with probability 1/2, membership
guessed from the released model file. A bound above the claimed epsilon is evidence of a bug; a bound below it
proves nothing (documentation/privacy_model.md, "Empirical audit")."""
from __future__ import annotations

import argparse

from dpunet.utils.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    from dpunet.utils.arguments import parse_epsilon

    p = argparse.ArgumentParser(prog="dpunet_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id (4) or name (Task04_Hippocampus)")
    p.add_argument("fold", help="0-4 or all")
    p.add_argument("--eps", type=parse_epsilon, required=True, help="target epsilon of the audited run")
    p.add_argument("-c", "--configuration", default="2d", help="plan configuration (default 2d)")
    p.add_argument("--canaries", type=int, default=1000, help="number of canary patients m (default 1000)")
    p.add_argument("--canary-magnitude", type=float, default=10.0,
                   help="canary gradient norm in units of C before clipping (default 10)")
    p.add_argument("--guess-fraction", type=float, default=0.25,
                   help="fraction of canaries guessed 'in', and as many 'out'; the rest abstain (default 0.25)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    p.add_argument("--steps", type=int, default=None, help="DP-SGD steps T (plan default)")
    p.add_argument("--width", type=float, default=None, help="width multiplier")
    p.add_argument("--patients-per-step", type=int, default=None, help="expected patients per step q*N")
    p.add_argument("--patches-per-patient", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, dest="learning_rate", help="SGD learning rate")
    p.add_argument("--engine", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", default=None, help="folder for audit.json and the audited run")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from dpunet.audit.audit import AuditSettings, describe, run_audit

    args = build_parser().parse_args(argv)
    options = {k: getattr(args, k) for k in ("steps", "width", "patients_per_step", "patches_per_patient",
                                             "learning_rate", "engine", "device") if getattr(args, k) is not None}
    settings = AuditSettings(task=args.task, fold=args.fold, configuration=args.configuration, epsilon=args.eps,
                             num_canaries=args.canaries, canary_magnitude_in_C=args.canary_magnitude,
                             guess_fraction=args.guess_fraction, confidence=args.confidence, options=options)
    report = run_audit(settings, args.output)
    print(describe(report))
    return 0


if __name__ == "__main__":
    main()
