"""Running a study's pending cells through submitit: local processes (`kind: local`, at most `parallel` at a
time; the study command waits for them), Slurm (`kind: slurm`, one job-array element per cell; the command
submits and returns) or in this process (`kind: debug`, submitit's DebugExecutor)."""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Optional

from dpunet.study.cells import is_done, run_cell_job
from dpunet.study.spec import Cell, StudySpec
from dpunet.study.status import cell_states
from dpunet.utils.errors import DpunetError

# the data roots travel with every job: a Slurm node or a local worker sees the same DPUNET_* folders
ENVIRONMENT_KEYS = ("DPUNET_RAW", "DPUNET_PREPROCESSED", "DPUNET_RESULTS")


def job_environment() -> dict[str, str]:
    env = {k: str(Path(os.environ[k]).resolve()) for k in ENVIRONMENT_KEYS if os.environ.get(k)}
    return env


def slurm_parameters(executor: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters from a validated `executor: {kind: slurm, ...}` block."""
    params: dict[str, Any] = {"partition": executor["partition"], "time": int(executor["timeout_min"]),
                              "job_name": f"dpunet_study_{name}", "gpus_per_node": int(executor["gpus_per_node"]),
                              "nodes": int(executor.get("nodes") or 1),
                              "ntasks_per_node": int(executor.get("tasks_per_node") or 1)}
    for key, slurm_key in (("cpus_per_task", "cpus_per_task"), ("mem_gb", "mem"), ("account", "account"),
                           ("qos", "qos"), ("constraint", "constraint"), ("array_parallelism", "array_parallelism"),
                           ("exclude", "exclude"), ("comment", "comment"), ("setup", "setup")):
        if executor.get(key) is not None:
            params[slurm_key] = f"{executor[key]}GB" if key == "mem_gb" else executor[key]
    return params


def slurm_sbatch_preview(spec: StudySpec, log_folder: Optional[Path] = None) -> str:
    """The sbatch script submitit would submit for one cell, built from the spec alone (no cluster needed):
    checks every parameter against submitit's Slurm parameters."""
    from submitit.slurm import slurm

    params = slurm_parameters(spec.executor, spec.name)
    unknown = sorted(set(params) - set(slurm._get_default_parameters()))
    if unknown:
        raise DpunetError(f"{spec.path}: executor: submitit's Slurm executor has no parameter {', '.join(unknown)}")
    folder = Path(log_folder or spec.folder / "logs") / "%j"
    try:
        return slurm._make_sbatch_string("python -u -m submitit.core._submit " + shlex.quote(str(folder)), folder,
                                         **params)
    except (ValueError, TypeError) as e:
        raise DpunetError(f"{spec.path}: executor: submitit refuses the Slurm parameters: {e}") from None


def make_executor(spec: StudySpec, log_folder: Optional[Path] = None) -> Any:
    """The submitit executor of the spec, its parameters set (no cluster needed to build a Slurm one)."""
    import submitit

    kind = spec.executor["kind"]
    log_folder = Path(log_folder or spec.folder / "logs") / "%j"
    if kind == "debug":
        return submitit.DebugExecutor(folder=log_folder)
    if kind == "local":
        executor = submitit.LocalExecutor(folder=log_folder)
        executor.update_parameters(timeout_min=int(spec.executor["timeout_min"]),
                                   gpus_per_node=int(spec.executor["gpus_per_node"]))
        return executor
    slurm_sbatch_preview(spec, log_folder.parent)  # a bad parameter fails here, with the spec's name
    try:
        executor = submitit.SlurmExecutor(folder=log_folder)
    except RuntimeError as e:
        raise DpunetError(f"{spec.path}: executor kind slurm, but this machine has no Slurm ({e}); run the cells "
                          f"with `dpunet_study commands {spec.path}` or a local executor") from None
    params = slurm_parameters(spec.executor, spec.name)
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as e:
        raise DpunetError(f"{spec.path}: executor: submitit refuses the Slurm parameters: {e}") from None
    return executor


def pending_cells(spec: StudySpec) -> list[Cell]:
    """Cells that are neither done nor running now (failed and interrupted cells are pending again)."""
    states = cell_states(spec)
    return [c for c in spec.cells if states[c.key] in ("pending", "failed", "interrupted")]


def pretraining_first_order(cells: list[Cell]) -> list[Cell]:
    """The cells reordered round-robin over their pretraining groups (task, configuration, arch, width, seed, init,
    pretraining options): the first cell of every group comes before any group's second, so that cells running
    side by side do not make the same cached public pretraining twice."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        pretraining = tuple(sorted((k, v) for k, v in c.overrides if k.startswith("pretraining")))
        groups.setdefault((c.task, c.configuration, c.arch, c.width, c.seed, c.init, pretraining), []).append(c)
    ordered, lists = [], list(groups.values())
    for i in range(max(len(g) for g in lists) if lists else 0):
        ordered += [g[i] for g in lists if i < len(g)]
    return ordered


def _submit(executor: Any, spec: StudySpec, cell: Cell) -> Any:
    return executor.submit(run_cell_job, cell, str(spec.folder.resolve()), spec.predict_test,
                           spec.executor.get("threads"), job_environment())


def run_study(spec: StudySpec, only: Optional[list[str]] = None, say: Callable[[str], None] = print) -> dict[str, int]:
    """Run every pending cell (or the cells keyed in `only`); returns counts of done/failed/submitted."""
    spec.folder.mkdir(parents=True, exist_ok=True)
    cells = pending_cells(spec)
    if only is not None:
        cells = [spec.cell(k) for k in only if not is_done(spec.folder, spec.cell(k))]
    done_before = sum(is_done(spec.folder, c) for c in spec.cells)
    say(f"study {spec.name}: {len(spec.cells)} cells, {done_before} done, {len(cells)} to run "
        f"({spec.executor['kind']} executor) -> {spec.folder}")
    if not cells:
        return {"done": 0, "failed": 0, "submitted": 0}
    executor = make_executor(spec)
    if spec.executor["kind"] == "slurm":
        with executor.batch():  # one job array: one element per cell
            jobs = [_submit(executor, spec, c) for c in cells]
        say(f"submitted {len(jobs)} Slurm jobs ({jobs[0].job_id.split('_')[0] if jobs else '-'}); "
            f"follow them with dpunet_study status {spec.path}")
        return {"done": 0, "failed": 0, "submitted": len(jobs)}
    parallel = int(spec.executor.get("parallel", 1))
    counts = {"done": 0, "failed": 0, "submitted": 0}
    queue, running = (pretraining_first_order(cells) if parallel > 1 else list(cells)), []
    while queue or running:
        while queue and len(running) < parallel:
            cell = queue.pop(0)
            say(f"start {cell.key}")
            running.append((cell, _submit(executor, spec, cell)))
            counts["submitted"] += 1
        finished = [(c, j) for c, j in running if j.done()]
        for cell, job in finished:
            running.remove((cell, job))
            try:
                status = job.result()
            except Exception as e:  # noqa: BLE001 - the job itself died (killed, timeout): recorded as failed
                status = "failed"
                _record_job_failure(spec, cell, e)
            counts[status] += 1
            say(f"{status}: {cell.key}")
        if not finished:
            time.sleep(0.5 if spec.executor["kind"] == "local" else 0)
    return counts


def _record_job_failure(spec: StudySpec, cell: Cell, error: BaseException) -> None:
    from dpunet.study.cells import ERROR, cell_folder
    from dpunet.utils.files import write_text

    write_text(f"the job running this cell ended without a result: {type(error).__name__}: {error}\n",
               cell_folder(spec.folder, cell) / ERROR)
