"""Find a task's dataset.json from what a user types (an id, a name or a folder) and load it."""
from __future__ import annotations

from pathlib import Path

from dpunet.dataset.msd import TaskInfo, load_task
from dpunet.paths import preprocessed_root, raw_root, resolve_task
from dpunet.utils.errors import DpunetError


def task_folder(task: str | int) -> Path:
    """A task id or name resolved against $DPUNET_RAW; an existing folder path is taken as it is."""
    as_path = Path(str(task))
    if (as_path / "dataset.json").is_file():
        return as_path
    return raw_root() / resolve_task(task, raw_root())


def load_raw_task(task: str | int) -> TaskInfo:
    """The raw task (images and labels) named by `task`, from $DPUNET_RAW."""
    name = resolve_task(task, raw_root())
    folder = raw_root() / name
    if not folder.is_dir():
        raise DpunetError(f"raw task folder {folder} not found (set DPUNET_RAW)")
    return load_task(folder)


def load_preprocessed_task(task: str | int) -> TaskInfo:
    """The task description from $DPUNET_RAW, else the copy planning left in $DPUNET_PREPROCESSED."""
    name = resolve_task(task, raw_root(), preprocessed_root())
    for folder in (raw_root() / name, preprocessed_root() / name):
        if (folder / "dataset.json").is_file():
            return load_task(folder)
    raise DpunetError(f"no dataset.json for {name} in {raw_root()} or {preprocessed_root()}")
