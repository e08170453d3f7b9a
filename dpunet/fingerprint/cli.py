"""dpunet_extract_fingerprint -t TASK [-np N] [--verify]"""
from __future__ import annotations

import argparse

from dpunet.dataset.tasks import load_raw_task
from dpunet.fingerprint.run import fingerprint_task
from dpunet.pipeline.arguments import add_fingerprint_arguments, add_task_argument
from dpunet.utils.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_extract_fingerprint", description=__doc__)
    add_task_argument(parser)
    add_fingerprint_arguments(parser)
    args = parser.parse_args(argv)
    fingerprint_task(load_raw_task(args.task), args.num_processes, args.verify, args.ct_statistics, args.ct_epsilon)
    return 0


if __name__ == "__main__":
    main()
