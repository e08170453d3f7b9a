"""dpunet_preprocess -t TASK [-c 2d 3d_fullres] [-np 2] [--overwrite]: preprocess with existing plans."""
from __future__ import annotations

import argparse

from dpunet.dataset.tasks import load_raw_task
from dpunet.pipeline.arguments import add_preprocess_arguments, add_task_argument
from dpunet.preprocessing.run import preprocess_task
from dpunet.utils.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_preprocess", description=__doc__)
    add_task_argument(parser)
    parser.add_argument("-c", "--configurations", nargs="+", default=None)
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    add_preprocess_arguments(parser)
    args = parser.parse_args(argv)
    preprocess_task(load_raw_task(args.task), args.configurations, args.num_processes, args.overwrite)
    return 0


if __name__ == "__main__":
    main()
