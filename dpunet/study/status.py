"""Where a study stands: each cell done / running / failed / interrupted / pending, a progress bar and the time
left, estimated from the wall time of the cells done so far."""
from __future__ import annotations

import os
import socket
from typing import Any

from dpunet.study.cells import DONE, ERROR, RUNNING, cell_folder, is_done
from dpunet.study.spec import StudySpec
from dpunet.utils.files import load_json

STATES = ("done", "running", "failed", "interrupted", "pending")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_state(marker: dict[str, Any]) -> str:
    """A running marker whose process is gone (same host) is an interrupted cell; another host's is trusted."""
    if marker.get("host") == socket.gethostname() and not marker.get("slurm_job_id"):
        return "running" if _alive(int(marker.get("pid", -1))) else "interrupted"
    return "running"


def cell_states(spec: StudySpec) -> dict[str, str]:
    states = {}
    for cell in spec.cells:
        folder = cell_folder(spec.folder, cell)
        if is_done(spec.folder, cell):
            states[cell.key] = "done"
        elif (folder / RUNNING).is_file():
            try:
                states[cell.key] = _running_state(load_json(folder / RUNNING))
            except (ValueError, OSError):  # a marker being replaced right now
                states[cell.key] = "running"
        elif (folder / ERROR).is_file():
            states[cell.key] = "failed"
        else:
            states[cell.key] = "pending"
    return states


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def summarize_status(spec: StudySpec, width: int = 40) -> dict[str, Any]:
    """Counts per state, the failed cells with the first line of their error, a progress bar and the time left."""
    states = cell_states(spec)
    counts = {s: sum(1 for v in states.values() if v == s) for s in STATES}
    walls = [load_json(cell_folder(spec.folder, c) / DONE).get("wall_seconds") for c in spec.cells
             if states[c.key] == "done"]
    walls = [w for w in walls if w]
    total = len(spec.cells)
    left = total - counts["done"]
    parallel = max(1, int(spec.executor.get("parallel") or spec.executor.get("array_parallelism") or 1))
    eta = sum(walls) / len(walls) * left / parallel if walls and left else (0.0 if not left else None)
    filled = int(round(width * counts["done"] / total))
    errors = {}
    for c in spec.cells:
        if states[c.key] == "failed":
            text = (cell_folder(spec.folder, c) / ERROR).read_text().strip().splitlines()
            errors[c.key] = text[0] if text else "(empty error file)"
    return {"states": states, "counts": counts, "total": total, "eta_seconds": eta, "errors": errors,
            "bar": "[" + "#" * filled + "." * (width - filled) + f"] {counts['done']}/{total}",
            "mean_cell_seconds": sum(walls) / len(walls) if walls else None}


def format_status(spec: StudySpec, verbose: bool = False) -> str:
    s = summarize_status(spec)
    lines = [f"study {spec.name} ({spec.path}) -> {spec.folder}", s["bar"],
             "  ".join(f"{k} {v}" for k, v in s["counts"].items())]
    if s["mean_cell_seconds"]:
        eta = "done" if s["eta_seconds"] == 0 else f"about {_duration(s['eta_seconds'])} left"
        lines.append(f"mean cell {_duration(s['mean_cell_seconds'])}; {eta} at the spec's parallelism")
    else:
        lines.append("time left: unknown until a cell is done")
    for key, error in s["errors"].items():
        lines.append(f"failed {key}: {error} (see cells/{key}/error.txt)")
    if verbose:
        lines += [f"{state:<12}{key}" for key, state in s["states"].items()]
    return "\n".join(lines)
