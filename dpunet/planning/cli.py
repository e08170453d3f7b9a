"""dpunet_plan -t TASK [-c 2d 3d_fullres] [--eps 8] [--delta 1e-5] [...]: plans from an existing fingerprint."""
from __future__ import annotations

import argparse

from dpunet.dataset.tasks import load_preprocessed_task
from dpunet.pipeline.arguments import add_plan_arguments, add_task_argument, plan_options
from dpunet.planning.run import plan_task
from dpunet.utils.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_plan", description=__doc__)
    add_task_argument(parser)
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    plan_task(load_preprocessed_task(args.task), **plan_options(args))
    return 0


if __name__ == "__main__":
    main()
