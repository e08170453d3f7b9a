"""Where raw, preprocessed and result folders live, and how a task is named (by id or by name)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from dpunet.utils.errors import DpunetError

_DEFAULT_BASE = "dpunet_data"


def _root(env: str, sub: str) -> Path:
    value = os.environ.get(env)
    return Path(value) if value else Path.cwd() / _DEFAULT_BASE / sub


def raw_root() -> Path:
    """$DPUNET_RAW, else ./dpunet_data/raw."""
    return _root("DPUNET_RAW", "raw")


def preprocessed_root() -> Path:
    """$DPUNET_PREPROCESSED, else ./dpunet_data/preprocessed."""
    return _root("DPUNET_PREPROCESSED", "preprocessed")


def results_root() -> Path:
    """$DPUNET_RESULTS, else ./dpunet_data/results."""
    return _root("DPUNET_RESULTS", "results")


# MSD / nnU-Net v1 task folders (Task04_Hippocampus) and nnU-Net v2 dataset folders (Dataset004_Hippocampus)
_TASK_RE = re.compile(r"^(?:Task|Dataset)(\d+)_(.+)$")


def task_name_from_folder(name: str) -> tuple[int, str]:
    m = _TASK_RE.match(name)
    if not m:
        raise DpunetError(f"'{name}' is not a task folder name of the form TaskXX_Name or DatasetXXX_Name")
    return int(m.group(1)), m.group(2)


def resolve_task(task: str | int, *roots: Path) -> str:
    """Full task folder name ('Task04_Hippocampus', 'Dataset004_Hippocampus') from an id ('4', 4) or a name,
    searched in `roots`; an id that matches both a TaskXX_ and a DatasetXXX_ folder is ambiguous."""
    roots = roots or (raw_root(), preprocessed_root())
    text = str(task)
    if _TASK_RE.match(text):
        return text
    if not text.isdigit():
        raise DpunetError(f"task '{task}' is neither a number nor a TaskXX_Name / DatasetXXX_Name folder name")
    wanted = int(text)
    found = set()
    for root in roots:
        if root.is_dir():
            for d in root.iterdir():
                m = _TASK_RE.match(d.name)
                if d.is_dir() and m and int(m.group(1)) == wanted:
                    found.add(d.name)
    if not found:
        where = ", ".join(str(r) for r in roots)
        raise DpunetError(f"no folder Task{wanted:02d}_* or Dataset{wanted:03d}_* for task {task} in {where}")
    if len(found) > 1:
        raise DpunetError(f"task id {wanted} is ambiguous: {sorted(found)}; name the task in full")
    return found.pop()
