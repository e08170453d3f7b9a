"""A study spec (YAML) and its cells: the cross product of tasks x architectures x widths x epsilons x folds x
seeds x initialisations, with per-task sub-grids, exclusions and per-architecture overrides.

    name: quick_cpu
    tasks:                          # each entry is a sub-grid; keys left out take the top-level lists
      - {task: 4, configuration: 2d, overrides: {steps: 60}, epsilons: [1, 8, inf]}
      - {task: 4, configuration: 2d, overrides: {steps: 60}, epsilons: [8], seeds: [1]}
    architectures: [unet, unet_ws]
    widths: [0.25]
    epsilons: [8, inf]
    folds: [0]
    seeds: [0]
    init: [random_images]           # or synthetic_brain (MNI152 template), none, a checkpoint file
    exclude: [{arch: unet_ws, epsilon: inf}]
    arch_overrides: {unet_ws: {learning_rate: 0.001}}
    executor: {kind: local, parallel: 1}

Every problem is a DpunetError naming the spec file and the key.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpunet.evaluation.cross_validation import DEFAULT_INIT, format_epsilon, run_folder_name
from dpunet.utils.errors import DpunetError

#: factors a cell is made of; `exclude` entries match on them
FACTORS = ("task", "configuration", "arch", "width", "epsilon", "fold", "seed", "init")
#: grid keys allowed at the top level and in a tasks entry, with their factor
GRID_KEYS = {"architectures": "arch", "widths": "width", "epsilons": "epsilon", "folds": "fold", "seeds": "seed",
             "init": "init"}
TOP_KEYS = {"name", "description", "tasks", "exclude", "arch_overrides", "overrides", "executor", "folder",
            "predict_test", "budget_note", "mlflow", *GRID_KEYS}
TASK_KEYS = {"task", "configuration", "overrides", *GRID_KEYS}
#: training options a spec may not set through overrides: they are factors of the cell, or set by the study
NOT_OVERRIDES = {"task", "configuration", "fold", "epsilon", "arch", "seed", "init_from", "run_tag"}
EXECUTOR_KINDS = ("local", "slurm", "debug")
LOCAL_EXECUTOR_KEYS = {"kind", "parallel", "timeout_min", "threads", "gpus_per_node"}
SLURM_EXECUTOR_KEYS = {"kind", "partition", "gpus_per_node", "timeout_min", "cpus_per_task", "mem_gb", "nodes",
                       "tasks_per_node", "account", "qos", "constraint", "array_parallelism", "threads",
                       "exclude", "comment", "setup"}


@dataclass(frozen=True)
class Cell:
    """One ordinary dpunet run of the study: train one fold, validate, predict and evaluate the test set."""
    task: str
    configuration: str
    arch: str
    width: float
    epsilon: float
    fold: str
    seed: int
    init: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def override_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def run_tag(self) -> str:
        """'h' + 8 hex digits of the other overrides (steps, lr, ...), or '' when there are none."""
        if not self.overrides:
            return ""
        text = json.dumps(self.override_dict, sort_keys=True, default=str)
        return "h" + hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def run_name(self) -> str:
        """The run folder's name under results_root()/<Task>/, as dpunet_train names it."""
        return run_folder_name(self.arch, self.configuration, self.epsilon, width=self.width, seed=self.seed,
                               init_from=self.init, run_tag=self.run_tag)

    @property
    def key(self) -> str:
        """Unique within a study: the task as the spec gives it, the run name and the fold."""
        task = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(self.task))
        return f"{task}__{self.run_name}__fold{self.fold}"

    def factors(self) -> dict[str, Any]:
        return {"task": self.task, "configuration": self.configuration, "arch": self.arch, "width": self.width,
                "epsilon": format_epsilon(self.epsilon), "fold": self.fold, "seed": self.seed, "init": self.init}

    def train_options(self) -> dict[str, Any]:
        """dpunet_train's options (TrainingConfig field names) for this cell, device and threads excluded."""
        options = {"task": self.task, "configuration": self.configuration, "fold": self.fold,
                   "epsilon": self.epsilon, "arch": self.arch, "width": self.width, "seed": self.seed,
                   "init_from": self.init, "run_tag": self.run_tag}
        options.update(self.override_dict)
        return options


@dataclass
class StudySpec:
    path: Path
    name: str
    cells: list[Cell]
    executor: dict[str, Any]
    folder: Path
    predict_test: bool = True
    description: str = ""
    budget_note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    # {tracking_uri, experiment} when the report logs cells to MLflow (dpunet.study.tracking), else None
    mlflow: Optional[dict[str, Optional[str]]] = None

    def cell(self, key: str) -> Cell:
        for c in self.cells:
            if c.key == key:
                return c
        raise DpunetError(f"{self.path}: no cell '{key}' in this study (dpunet_study status lists them)")


# ------------------------------------------------------------------------------------------------ parsing
def _err(path: Path, key: str, problem: str) -> DpunetError:
    return DpunetError(f"{path}: {key}: {problem}")


def _as_list(path: Path, key: str, value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise _err(path, key, "an empty list gives no cells")
        return list(value)
    return [value]


def _parse_epsilon(path: Path, key: str, value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", ".inf"):
        return math.inf
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise _err(path, key, f"epsilon {value!r} is not a number or inf") from None
    if math.isnan(eps) or eps <= 0:
        raise _err(path, key, f"epsilon must be positive or inf, got {value!r}")
    return eps


def _parse_factor(path: Path, key: str, factor: str, value: Any) -> Any:
    if factor == "epsilon":
        return _parse_epsilon(path, key, value)
    if factor == "width":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _err(path, key, f"width must be a positive number, got {value!r}")
        return float(value)
    if factor == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _err(path, key, f"seed must be a non-negative integer, got {value!r}")
        return value
    if factor == "fold":
        text = str(value)
        if not (text == "all" or text.isdigit()):
            raise _err(path, key, f"fold must be a number or 'all', got {value!r}")
        return text
    if not isinstance(value, str) or not value:
        raise _err(path, key, f"expected a non-empty name, got {value!r}")
    return value


def _check_overrides(path: Path, key: str, overrides: Any) -> dict[str, Any]:
    from dataclasses import fields

    from dpunet.training.config import TrainingConfig

    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise _err(path, key, "expected a mapping of training options, e.g. {steps: 60, learning_rate: 0.002}")
    known = {f.name for f in fields(TrainingConfig)} - NOT_OVERRIDES
    for name, value in overrides.items():
        if name in NOT_OVERRIDES:
            raise _err(path, f"{key}.{name}", "is a factor of the cell: use the grid keys (architectures, epsilons, "
                                              "folds, seeds, init) instead")
        if name not in known:
            raise _err(path, f"{key}.{name}", f"unknown training option (known: {', '.join(sorted(known))})")
        if isinstance(value, (dict, list)):
            raise _err(path, f"{key}.{name}", "expected a single value")
    return dict(overrides)


def _check_keys(path: Path, where: str, entry: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise _err(path, f"{where}{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def parse_executor(path: Path, raw: Any) -> dict[str, Any]:
    """The executor block with defaults: local (parallel 1) when absent."""
    raw = {"kind": "local"} if raw is None else raw
    if not isinstance(raw, dict):
        raise _err(path, "executor", "expected a mapping such as {kind: local, parallel: 1}")
    kind = raw.get("kind", "local")
    if kind not in EXECUTOR_KINDS:
        raise _err(path, "executor.kind", f"{kind!r} is not one of {', '.join(EXECUTOR_KINDS)}")
    allowed = SLURM_EXECUTOR_KEYS if kind == "slurm" else LOCAL_EXECUTOR_KEYS
    _check_keys(path, "executor.", raw, allowed)
    executor = {"kind": kind, "timeout_min": 24 * 60, "threads": None, "gpus_per_node": 0}
    if kind != "slurm":
        executor["parallel"] = 1
    executor.update(raw)
    for name in ("parallel", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "nodes", "tasks_per_node",
                 "array_parallelism", "threads"):
        value = executor.get(name)
        if value is None:
            continue
        minimum = 0 if name == "gpus_per_node" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _err(path, f"executor.{name}", f"expected an integer >= {minimum}, got {value!r}")
    if kind == "slurm" and not executor.get("partition"):
        raise _err(path, "executor.partition", "a Slurm executor needs a partition")
    return executor


def _task_cells(path: Path, index: int, entry: Any, top: dict[str, Any]) -> list[Cell]:
    where = f"tasks[{index}]"
    if not isinstance(entry, dict):
        raise _err(path, where, "expected a mapping such as {task: 4, configuration: 2d}")
    _check_keys(path, f"{where}.", entry, TASK_KEYS)
    for required in ("task", "configuration"):
        if required not in entry:
            raise _err(path, f"{where}.{required}", "missing")
    task = str(entry["task"])
    configuration = _parse_factor(path, f"{where}.configuration", "configuration", entry["configuration"])
    overrides = {**_check_overrides(path, "overrides", top.get("overrides")),
                 **_check_overrides(path, f"{where}.overrides", entry.get("overrides"))}
    lists: dict[str, list[Any]] = {}
    for grid_key, factor in GRID_KEYS.items():
        source_key = f"{where}.{grid_key}" if grid_key in entry else grid_key
        value = entry.get(grid_key, top.get(grid_key))
        if factor == "width" and value is None and "width" in overrides:
            value = overrides.pop("width")  # the form: overrides: {width: 0.25}
        elif factor == "width" and "width" in overrides:
            raise _err(path, f"{where}.overrides.width", "width is given twice (also as widths)")
        if value is None:
            value = {"arch": None, "width": 1.0, "epsilon": None, "fold": 0, "seed": 0, "init": DEFAULT_INIT}[factor]
        if value is None:
            raise _err(path, grid_key, f"missing (at the top level or in {where})")
        lists[factor] = [_parse_factor(path, source_key, factor, v) for v in _as_list(path, source_key, value)]
    arch_overrides = top.get("arch_overrides") or {}
    cells = []
    for arch in lists["arch"]:
        cell_overrides = {**overrides, **_check_overrides(path, f"arch_overrides.{arch}", arch_overrides.get(arch))}
        frozen = tuple(sorted(cell_overrides.items()))
        for width in lists["width"]:
            for eps in lists["epsilon"]:
                for fold in lists["fold"]:
                    for seed in lists["seed"]:
                        for init in lists["init"]:
                            cells.append(Cell(task, configuration, arch, width, eps, fold, seed, init, frozen))
    return cells


def _matches(cell: Cell, rule: dict[str, Any], path: Path, where: str) -> bool:
    for factor, wanted in rule.items():
        values = [_parse_factor(path, f"{where}.{factor}", factor, v) for v in _as_list(path, where, wanted)] \
            if factor not in ("task", "configuration") else [str(v) for v in _as_list(path, where, wanted)]
        if getattr(cell, "arch" if factor == "arch" else factor) not in values:
            return False
    return True


def parse_spec(raw: Any, path: Path) -> StudySpec:
    """A StudySpec from the loaded YAML; `path` names the file in errors."""
    if not isinstance(raw, dict):
        raise DpunetError(f"{path}: expected a YAML mapping with name, tasks, architectures, epsilons, ...")
    _check_keys(path, "", raw, TOP_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise _err(path, "name", f"expected a name of letters, digits, '-', '_', '.', got {name!r}")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _err(path, "tasks", "expected a non-empty list of {task: ..., configuration: ...}")
    arch_overrides = raw.get("arch_overrides") or {}
    if not isinstance(arch_overrides, dict):
        raise _err(path, "arch_overrides", "expected a mapping {arch: {option: value}}")
    cells: list[Cell] = []
    for i, entry in enumerate(tasks):
        cells.extend(_task_cells(path, i, entry, raw))
    excludes = raw.get("exclude") or []
    if not isinstance(excludes, list):
        raise _err(path, "exclude", "expected a list of {factor: value or [values]}")
    for i, rule in enumerate(excludes):
        if not isinstance(rule, dict) or not rule:
            raise _err(path, f"exclude[{i}]", "expected a non-empty mapping such as {arch: unetpp, epsilon: 1}")
        _check_keys(path, f"exclude[{i}].", rule, set(FACTORS))
        cells = [c for c in cells if not _matches(c, rule, path, f"exclude[{i}]")]
    unique: dict[str, Cell] = {}
    for c in cells:  # two sub-grids may name the same cell: run it once
        unique.setdefault(c.key, c)
    if not unique:
        raise _err(path, "exclude", "every cell is excluded")
    from dpunet.paths import results_root
    from dpunet.study.tracking import parse_mlflow_setting

    folder = Path(raw["folder"]) if raw.get("folder") else results_root() / "studies" / name
    return StudySpec(path=path, name=name, cells=list(unique.values()),
                     executor=parse_executor(path, raw.get("executor")),
                     folder=folder, predict_test=bool(raw.get("predict_test", True)),
                     description=str(raw.get("description", "")), budget_note=str(raw.get("budget_note", "")),
                     raw=raw, mlflow=parse_mlflow_setting(raw.get("mlflow"), f"{path}: mlflow"))


def load_spec(path: str | Path, folder: Optional[str | Path] = None) -> StudySpec:
    """Read and validate a study spec; `folder` replaces the spec's study folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DpunetError(f"{path}: study spec not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DpunetError(f"{path}: not valid YAML ({e})") from None
    spec = parse_spec(raw, path)
    if folder is not None:
        spec.folder = Path(folder)
    return spec
