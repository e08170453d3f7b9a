"""dpunet_preprocess -t TASK [-c 2d 3d_fullres] [-np 2] [--overwrite]: preprocess with existing plans."""
from __future__ import annotations

import argparse

from dpunet.dataset.msd import TaskInfo
from dpunet.paths import preprocessed_root
from dpunet.preprocessing.preprocessor import preprocess_cases
from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import load_json


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")


def run_preprocessing(task: TaskInfo, configurations: list[str] | None, num_processes: int, overwrite: bool) -> None:
    out_dir = preprocessed_root() / task.name
    plans_path = out_dir / "dpunet_plans.json"
    if not plans_path.is_file():
        raise DpunetError(f"{plans_path} not found: run dpunet_plan first")
    plans = load_json(plans_path)
    names = configurations or list(plans["configurations"])
    for name in names:
        if name not in plans["configurations"]:
            raise DpunetError(f"configuration '{name}' is not in {plans_path} "
                              f"(planned: {', '.join(plans['configurations'])})")
        config = plans["configurations"][name]
        missing = [c.case_id for c in task.training if c.label is None]
        if missing:
            raise DpunetError(f"training cases without a label: {missing[:5]}")
        counts = preprocess_cases(task.training, config, task.foreground_labels, out_dir / config["data_identifier"],
                                  num_processes, overwrite, desc=f"preprocess {name}")
        print(f"[{name}] {counts['done']} cases preprocessed, {counts['skipped']} already done "
              f"-> {out_dir / config['data_identifier']}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from dpunet.fingerprint.cli import load_raw_task

    parser = argparse.ArgumentParser(prog="dpunet_preprocess", description=__doc__)
    parser.add_argument("-t", "--task", required=True)
    parser.add_argument("-c", "--configurations", nargs="+", default=None)
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    add_preprocess_arguments(parser)
    args = parser.parse_args(argv)
    run_preprocessing(load_raw_task(args.task), args.configurations, args.num_processes, args.overwrite)
    return 0


if __name__ == "__main__":
    main()
