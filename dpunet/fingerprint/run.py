"""The fingerprint stage: integrity check, then dataset_fingerprint.json (and a copy of dataset.json) in
$DPUNET_PREPROCESSED/<task>/."""
from __future__ import annotations

import shutil
from typing import Any

from dpunet.dataset.msd import TaskInfo
from dpunet.dataset.verify import verify_task
from dpunet.fingerprint.extract import extract_fingerprint, write_fingerprint
from dpunet.paths import preprocessed_root
from dpunet.utils.files import atomic_write_with


def fingerprint_task(task: TaskInfo, num_processes: int = 2, verify: bool = True, ct_statistics: str = "prior",
                     ct_epsilon: float = 0.1) -> dict[str, Any]:
    """Check the raw task (unless `verify` is False), extract and write its fingerprint; returns it."""
    if verify:
        verify_task(task.folder, num_processes=num_processes)
    out_dir = preprocessed_root() / task.name
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = extract_fingerprint(task, num_processes, ct_statistics, ct_epsilon)
    write_fingerprint(fingerprint, out_dir)
    atomic_write_with(out_dir / "dataset.json", lambda tmp: shutil.copyfile(task.folder / "dataset.json", tmp))
    print(f"fingerprint: {out_dir / 'dataset_fingerprint.json'}")
    return fingerprint
