"""dpunet_plan_and_preprocess -t TASK [-c 2d 3d_fullres] [--eps 8] [--delta 1e-5] [-np 2] [--verify]

Integrity check, fingerprint, plans (with the DP block) and preprocessed data, in one command.
TASK: an id (4) or a folder name in $DPUNET_RAW: TaskXX_Name (MSD layout) or DatasetXXX_Name (nnU-Net v2)."""
from __future__ import annotations

import argparse

from dpunet.pipeline.arguments import (add_fingerprint_arguments, add_plan_arguments, add_preprocess_arguments,
                                      add_task_argument, plan_options)
from dpunet.utils.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_plan_and_preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_argument(parser)
    add_fingerprint_arguments(parser)
    add_plan_arguments(parser)
    add_preprocess_arguments(parser)
    parser.add_argument("--no-preprocess", action="store_true", help="stop after planning")
    args = parser.parse_args(argv)
    from dpunet.api import plan_and_preprocess  # looked up at each call, like the other commands

    options = plan_options(args)
    plan_and_preprocess(args.task, options.pop("configurations"), options.pop("epsilon"),
                        num_processes=args.num_processes, verify=args.verify, ct_statistics=args.ct_statistics,
                        ct_epsilon=args.ct_epsilon, preprocess=not args.no_preprocess, overwrite=args.overwrite,
                        **options)
    return 0


if __name__ == "__main__":
    main()
