"""dpunet_extract_fingerprint -t TASK [-np N] [--verify]"""
from __future__ import annotations

import argparse
import shutil

from dpunet.dataset.msd import TaskInfo, load_task
from dpunet.fingerprint.extract import extract_fingerprint, write_fingerprint
from dpunet.paths import preprocessed_root, raw_root, resolve_task
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import atomic_write_with


def add_fingerprint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--verify", dest="verify", action="store_true", default=True,
                        help="check dataset integrity first (default)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the integrity check")
    parser.add_argument("--ct-statistics", choices=["prior", "dp"], default="prior",
                        help="CT normalisation: a declared public HU window prior (default) or a DP estimate")
    parser.add_argument("--ct-epsilon", type=float, default=0.1, help="epsilon of the DP CT statistics (default 0.1)")


def load_raw_task(task_arg: str) -> TaskInfo:
    name = resolve_task(task_arg, raw_root())
    folder = raw_root() / name
    if not folder.is_dir():
        raise DpunetError(f"raw task folder {folder} not found (set DPUNET_RAW)")
    return load_task(folder)


def run_fingerprint(task: TaskInfo, args: argparse.Namespace) -> dict:
    if args.verify:
        from dpunet.dataset.verify import verify_task
        verify_task(task.folder, num_processes=args.num_processes)
    out_dir = preprocessed_root() / task.name
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = extract_fingerprint(task, args.num_processes, args.ct_statistics, args.ct_epsilon)
    write_fingerprint(fingerprint, out_dir)
    atomic_write_with(out_dir / "dataset.json", lambda tmp: shutil.copyfile(task.folder / "dataset.json", tmp))
    print(f"fingerprint: {out_dir / 'dataset_fingerprint.json'}")
    return fingerprint


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
