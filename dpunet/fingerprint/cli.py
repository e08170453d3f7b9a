"""dpunet_extract_fingerprint -t TASK [-np N] [--verify]"""
from __future__ import annotations

import argparse

from dpunet.dataset.msd import TaskInfo
from dpunet.dataset.tasks import load_raw_task
from dpunet.fingerprint.run import fingerprint_task
from dpunet.utils.errors import cli_entry


def add_fingerprint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--verify", dest="verify", action="store_true", default=True,
                        help="check dataset integrity first (default)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the integrity check")
    parser.add_argument("--ct-statistics", choices=["prior", "dp"], default="prior",
                        help="CT normalisation: a declared public HU window prior (default) or a DP estimate")
    parser.add_argument("--ct-epsilon", type=float, default=0.1, help="epsilon of the DP CT statistics (default 0.1)")


def run_fingerprint(task: TaskInfo, args: argparse.Namespace) -> dict:
    """fingerprint_task with the options of add_fingerprint_arguments."""
    return fingerprint_task(task, args.num_processes, args.verify, args.ct_statistics, args.ct_epsilon)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_extract_fingerprint", description=__doc__)
    parser.add_argument("-t", "--task", required=True, help="task id (4) or name (Task04_Hippocampus)")
    add_fingerprint_arguments(parser)
    args = parser.parse_args(argv)
    run_fingerprint(load_raw_task(args.task), args)
    return 0


if __name__ == "__main__":
    main()
