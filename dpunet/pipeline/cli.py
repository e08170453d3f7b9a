"""dpunet_plan_and_preprocess -t TASK [-c 2d 3d_fullres] [--eps 8] [--delta 1e-5] [-np 2] [--verify]

Integrity check, fingerprint, plans (with the DP block) and preprocessed data, in one command."""
from __future__ import annotations

import argparse

from dpunet.dataset.tasks import load_raw_task
# a console entry point itself: it reuses the options of the three commands it chains
from dpunet.fingerprint.cli import add_fingerprint_arguments, run_fingerprint
from dpunet.planning.cli import add_plan_arguments, run_planning
from dpunet.preprocessing.cli import add_preprocess_arguments
from dpunet.preprocessing.run import preprocess_task
from dpunet.utils.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_plan_and_preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--task", required=True, help="task id (4) or name (Task04_Hippocampus)")
    add_fingerprint_arguments(parser)
    add_plan_arguments(parser)
    add_preprocess_arguments(parser)
    parser.add_argument("--no-preprocess", action="store_true", help="stop after planning")
    args = parser.parse_args(argv)
    task = load_raw_task(args.task)
    run_fingerprint(task, args)
    plans = run_planning(task, args)
    if not args.no_preprocess:
        preprocess_task(task, list(plans["configurations"]), args.num_processes, args.overwrite)
    return 0


if __name__ == "__main__":
    main()
