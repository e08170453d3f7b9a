"""The preprocessing stage: every training case of the planned configurations, with the plans already written."""
from __future__ import annotations

from typing import Sequence

from dpunet.dataset.msd import TaskInfo
from dpunet.paths import preprocessed_root
from dpunet.preprocessing.preprocessor import preprocess_cases
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json


def preprocess_task(task: TaskInfo, configurations: Sequence[str] | None = None, num_processes: int = 2,
                    overwrite: bool = False) -> None:
    """Preprocess `configurations` (default: all planned) into $DPUNET_PREPROCESSED/<task>/<data identifier>/."""
    out_dir = preprocessed_root() / task.name
    plans_path = out_dir / "dpunet_plans.json"
    if not plans_path.is_file():
        raise DpunetError(f"{plans_path} not found: run dpunet_plan first")
    plans = load_json(plans_path)
    names = list(configurations or plans["configurations"])
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
