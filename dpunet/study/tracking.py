"""Optional: every finished cell of a study as one MLflow run, so that users browse the grid in the tool they know.

Asked for by the spec (`mlflow: true`, or `mlflow: {tracking_uri: URI, experiment: NAME}`) or by
`dpunet_study report SPEC --mlflow [URI]`. The default store is a local file store in the study folder
(`<study>/mlruns`; browse it with `mlflow ui --backend-store-uri <study>/mlruns`); any other tracking URI (a
server, a database) is used as given. The experiment is the study's name. A cell is logged once and found again
by its key (tag `dpunet.cell`): a later report updates its metrics instead of adding a run.

What is logged is what results.csv holds: the cell's factors and overrides as parameters, its privacy figures,
scores, time and memory as metrics. Like results.csv these include validation metrics of private patients: an
MLflow store is as private as the study folder (documentation/privacy_model.md).

MLflow is not a dependency of dpunet: `pip install mlflow-skinny` (or mlflow) to use this.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from dpunet.utils.errors import DpunetError

CELL_TAG = "dpunet.cell"
# results.csv columns that name the cell rather than measure it: parameters, not metrics
PARAMETER_COLUMNS = ("task", "task_name", "configuration", "arch", "width", "epsilon", "fold", "seed", "init",
                     "overrides", "run_name", "score_metric")
SETTINGS_KEYS = {"tracking_uri", "experiment"}


def parse_mlflow_setting(raw: Any, where: str) -> Optional[dict[str, Optional[str]]]:
    """The spec's `mlflow` entry as {tracking_uri, experiment} (None: not asked for); `where` names it in errors."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return {"tracking_uri": None, "experiment": None}
    if not isinstance(raw, dict) or set(raw) - SETTINGS_KEYS:
        raise DpunetError(f"{where}: expected true or a mapping with {' and/or '.join(sorted(SETTINGS_KEYS))}, "
                          f"got {raw!r}")
    return {key: (str(raw[key]) if raw.get(key) is not None else None) for key in sorted(SETTINGS_KEYS)}


def default_tracking_uri(study_folder: Path) -> str:
    return (Path(study_folder).resolve() / "mlruns").as_uri()


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise DpunetError("logging the study to MLflow needs MLflow, which dpunet does not install: "
                          "pip install mlflow-skinny (or mlflow), or drop the spec's `mlflow` entry") from None
    return mlflow


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers that are measurements (not factors)."""
    metrics = {}
    for column, value in row.items():
        if column in PARAMETER_COLUMNS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            metrics[column] = float(value)
    return metrics


def log_cells(rows: list[dict[str, Any]], study_name: str, study_folder: Path,
              setting: dict[str, Optional[str]]) -> dict[str, Any]:
    """Log every done row (results.csv rows) as an MLflow run; returns {'created': n, 'updated': m,
    'tracking_uri': the store used, 'experiment': its experiment}."""
    mlflow = _import_mlflow()
    uri = setting.get("tracking_uri") or default_tracking_uri(study_folder)
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the local default here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment_name = setting.get("experiment") or study_name
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    counts: dict[str, Any] = {"created": 0, "updated": 0, "tracking_uri": uri, "experiment": experiment_name}
    for row in rows:
        if row.get("status") != "done":
            continue
        found = client.search_runs([experiment_id], filter_string=f"tags.`{CELL_TAG}` = '{row['key']}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            counts["updated"] += 1
        else:
            run = client.create_run(experiment_id, run_name=row["key"],
                                    tags={CELL_TAG: row["key"], "dpunet.study": study_name})
            run_id = run.info.run_id
            for column in PARAMETER_COLUMNS:
                if row.get(column) is not None:
                    client.log_param(run_id, column, row[column])
            counts["created"] += 1
        for name, value in _metrics(row).items():
            client.log_metric(run_id, name, value)
        client.set_terminated(run_id)
    return counts
