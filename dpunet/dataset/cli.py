"""dpunet_verify_dataset: check a raw task's integrity before fingerprinting, planning or training."""
from __future__ import annotations

import argparse
from typing import Optional

from dpunet.dataset.msd import load_task
from dpunet.dataset.tasks import task_folder
from dpunet.dataset.verify import DEFAULT_GEOMETRY_TOLERANCE, verify_task
from dpunet.utils.errors import cli_entry


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description="Check a raw task, MSD or nnU-Net v2 layout (dataset.json, files, channels, labels, geometry), "
        "and list every problem."
    )
    p.add_argument("-t", "-d", "--task", "--dataset", dest="task", required=True,
                   help="task id (4), name (Task04_Hippocampus, Dataset004_Hippocampus) in $DPUNET_RAW, or a folder")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes reading the cases")
    p.add_argument("--geometry-tolerance", type=float, default=DEFAULT_GEOMETRY_TOLERANCE,
                   help="relative tolerance for spacing, origin and direction of image vs label")
    args = p.parse_args(argv)
    folder = task_folder(args.task)
    verify_task(folder, args.num_processes, args.geometry_tolerance)
    task = load_task(folder)
    print(f"OK: {len(task.training)} cases ({len(task.test)} test images) in {folder}")
    return 0


if __name__ == "__main__":
    main()
