"""dpunet_preprocess -t TASK [-c 2d 3d_fullres] [-np 2] [--overwrite]: preprocess with existing plans."""
from __future__ import annotations

import argparse

from dpunet.dataset.tasks import load_raw_task
from dpunet.preprocessing.run import preprocess_task
from dpunet.utils.errors import cli_entry


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_preprocess", description=__doc__)
    parser.add_argument("-t", "--task", required=True)
    parser.add_argument("-c", "--configurations", nargs="+", default=None)
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    add_preprocess_arguments(parser)
    args = parser.parse_args(argv)
    preprocess_task(load_raw_task(args.task), args.configurations, args.num_processes, args.overwrite)
    return 0


if __name__ == "__main__":
    main()
