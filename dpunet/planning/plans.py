"""Reading what planning wrote: dpunet_plans.json, a configuration entry and splits_final.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dpunet.dataset.msd import TaskInfo
from dpunet.dataset.tasks import load_preprocessed_task
from dpunet.paths import preprocessed_root, raw_root, resolve_task
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json


def plans_file(task_name: str) -> Path:
    """Where planning writes a task's dpunet_plans.json."""
    return preprocessed_root() / task_name / "dpunet_plans.json"


def load_plans(task_arg: str | int) -> tuple[str, dict[str, Any]]:
    """(task name, dpunet_plans.json) with a clear error when planning has not been run."""
    task_name = resolve_task(task_arg, preprocessed_root(), raw_root())
    plans_path = plans_file(task_name)
    if not plans_path.is_file():
        raise DpunetError(f"{plans_path} not found: run dpunet_plan_and_preprocess -t {task_arg} first")
    return task_name, load_json(plans_path)


def default_configuration(task_arg: str | int) -> str:
    """3d_fullres when it is planned, else the first planned configuration (2d for 2D data)."""
    planned = load_plans(task_arg)[1]["configurations"]
    return "3d_fullres" if "3d_fullres" in planned else next(iter(planned))


def load_training_inputs(task_arg: str | int, configuration: str
                         ) -> tuple[str, dict[str, Any], dict[str, Any], list, TaskInfo]:
    """(task name, plans, configuration entry, splits, raw task) with clear errors for anything missing."""
    task_name, plans = load_plans(task_arg)
    if configuration not in plans["configurations"]:
        raise DpunetError(f"configuration '{configuration}' is not planned for {task_name} "
                          f"(planned: {', '.join(plans['configurations'])})")
    splits = load_json(preprocessed_root() / task_name / "splits_final.json")
    return task_name, plans, plans["configurations"][configuration], splits, load_preprocessed_task(task_name)


def planned_init_from(task_name: str, configuration: str) -> str | None:
    """The public pretraining source the plan starts `configuration` from (what a run trained without
    --init-from used, hence part of its folder name); None without a plan or an entry."""
    plans_path = plans_file(task_name)
    if not plans_path.is_file():
        return None
    entry = load_json(plans_path)["configurations"].get(configuration, {})
    return entry.get("training", {}).get("init_from")
