"""Public tuning files: DP hyperparameters chosen on a public proxy task, never on private labels.

`dpunet_tune_public` (dpunet.tuning) trains one DP run per candidate (learning rate, and optionally steps T,
expected patients per step q*N, patches per patient K and width) on a proxy task made from the target's public
metadata only, and writes `public_tuning__<configuration>__<arch>__eps<E>.json` into the target's preprocessed
folder. This module is what training needs of such a file (it sits below training): its name, the
check that it was made for the run's settings, and the sentence the privacy report says about it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dpunet.dataset.tasks import load_preprocessed_task
from dpunet.paths import preprocessed_root
from dpunet.planning.dp_plan import DEFAULTS_TUNED_ON_TASK, DEFAULTS_TUNING
from dpunet.planning.splits import fold_cases
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import file_sha256, load_json

PUBLIC_TUNING_FORMAT = "dpunet-public-tuning-v1"
# the hyperparameters a tuning file can choose (files that name no `tuned` list chose the learning rate only)
TUNABLE = ("learning_rate", "steps", "patients_per_step", "patches_per_patient", "width")
# tuned settings that are counts (the others are positive real numbers)
WHOLE_NUMBERS = ("steps", "patients_per_step", "patches_per_patient")
# run settings the choice was made at: a run that differs in any of them does not use the file (the best learning
# rate moves with the noise level, the number of steps and the network)
MATCHED_SETTINGS = ("width", "steps", "patients_per_step", "patches_per_patient", "clip_norm", "delta", "init_from")


def epsilon_text(epsilon: float) -> str:
    """8.0 -> '8', 0.5 -> '0.5', inf -> 'inf' (as run folder names write it)."""
    return "inf" if not math.isfinite(epsilon) else f"{epsilon:g}"


def public_tuning_file_name(configuration: str, arch: str, epsilon: float) -> str:
    return f"public_tuning__{configuration}__{arch}__eps{epsilon_text(epsilon)}.json"


def public_tuning_path(task_name: str, configuration: str, arch: str, epsilon: float) -> Path:
    """Where dpunet_tune_public writes (and dpunet_train looks for) the tuning file of these settings."""
    return preprocessed_root() / task_name / public_tuning_file_name(configuration, arch, epsilon)


def fold_num_patients(task_name: str, fold: int | str) -> int:
    """Training patients of a fold, from splits_final.json and dataset.json only (no image is opened): N, which
    the privacy analysis treats as public."""
    splits_path = preprocessed_root() / task_name / "splits_final.json"
    if not splits_path.is_file():
        raise DpunetError(f"{splits_path} not found: run dpunet_plan_and_preprocess for {task_name} first")
    train, _ = fold_cases(load_json(splits_path), fold)
    patient_of = {c.case_id: c.patient_id for c in load_preprocessed_task(task_name).training}
    return len({patient_of[c] for c in train})


def expected_patients_per_step(plan_config: dict[str, Any], num_patients: int, given: int | None) -> int:
    """q*N as the trainer sets it: the option, else the plan's sample rate times the fold's N, within 1..N."""
    expected = given or round(plan_config["dp"]["sample_rate"] * num_patients)
    return int(min(num_patients, max(1, expected)))


def load_public_tuning(path: Path) -> dict[str, Any]:
    """The tuning record, checked for the fields training uses."""
    record = load_json(path)
    if not isinstance(record, dict) or record.get("format") != PUBLIC_TUNING_FORMAT:
        raise DpunetError(f"{path}: not a dpunet public tuning file (format {PUBLIC_TUNING_FORMAT} expected); "
                          f"remake it with dpunet_tune_public or remove it")
    chosen = record.get("chosen", {}).get("learning_rate")
    if not isinstance(chosen, (int, float)) or not (math.isfinite(chosen) and chosen > 0):
        raise DpunetError(f"{path}: chosen.learning_rate must be a positive number, got {chosen!r}")
    unknown = [k for k in tuned_keys(record) if k not in TUNABLE]
    if unknown:
        raise DpunetError(f"{path}: tuned names {unknown}, which dpunet cannot take from a tuning file "
                          f"({', '.join(TUNABLE)})")
    for key in tuned_keys(record)[1:]:
        value = record["chosen"].get(key)
        if key in WHOLE_NUMBERS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DpunetError(f"{path}: chosen.{key} must be a positive whole number, got {value!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
            raise DpunetError(f"{path}: chosen.{key} must be a positive number, got {value!r}")
    return record


def tuned_keys(record: dict[str, Any]) -> list[str]:
    """The hyperparameters the file chose, the learning rate first."""
    keys = record.get("tuned", ["learning_rate"])
    return ["learning_rate"] + [k for k in keys if k != "learning_rate"]


def _at_sample_rate(record: dict[str, Any], patients_per_step: float, num_patients: int) -> float:
    """A q*N of the tuning rescaled to `num_patients` patients: the same sample rate q (folds differ in N)."""
    return patients_per_step * num_patients / int(record["target"]["num_patients"])


def transferred_patients_per_step(record: dict[str, Any], num_patients: int) -> int:
    """The tuned q*N for a run on `num_patients` patients: the tuned sample rate q carries over between folds
    (their N differ by a few patients), not the count."""
    expected = _at_sample_rate(record, record["chosen"]["patients_per_step"], num_patients)
    return int(min(num_patients, max(1, round(expected))))


def run_settings(cfg: Any, patients_per_step: int) -> dict[str, Any]:
    """The MATCHED_SETTINGS of a run (a TrainingConfig), with its expected patients per step q*N."""
    return {key: patients_per_step if key == "patients_per_step" else getattr(cfg, key) for key in MATCHED_SETTINGS}


def settings_mismatch(record: dict[str, Any], settings: dict[str, Any], num_patients: int | None = None
                      ) -> list[str]:
    """'name: tuned X, run Y' for every matched setting the run does not share with the tuning. With the run's
    number of patients N, q*N matches when the run's sample rate is the tuned one to within one patient (folds
    differ in N)."""
    tuned = record.get("settings", {})
    tuned_n = record.get("target", {}).get("num_patients")
    differ = []
    for key in MATCHED_SETTINGS:
        a, b = tuned.get(key), settings.get(key)
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        if key == "patients_per_step" and numbers and num_patients and tuned_n:
            same = abs(b - _at_sample_rate(record, a, num_patients)) <= 1.0 + 1e-9
        else:
            same = math.isclose(float(a), float(b), rel_tol=1e-9) if numbers else a == b
        if not same:
            differ.append(f"{key}: tuned {a}, run {b}")
    return differ


TUNABLE_WORDS = {"learning_rate": "the learning rate", "steps": "the number of steps T",
                 "patients_per_step": "the expected patients per step q*N", "patches_per_patient": "the patches per "
                 "patient K", "width": "the width multiplier"}


def public_tuning_statement(path: str | Path, sha256: str, proxy_source: str, task_name: str,
                            tuned: list[str] | tuple[str, ...] = ("learning_rate",)) -> str:
    """The privacy report's hyperparameter sentence for hyperparameters taken from a public tuning file."""
    others = (f"The plan's pretraining length and start were chosen on private data of THIS task "
              f"({DEFAULTS_TUNING}): those defaults, if used, are not covered; neither is any tuning you did on "
              f"private data"
              if task_name == DEFAULTS_TUNED_ON_TASK else
              "Any tuning you did on private data of this task is not covered by the guarantee")
    words = [TUNABLE_WORDS[k] for k in tuned]
    what = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return (f"hyperparameters: {what} {'was' if len(words) == 1 else 'were'} chosen on a public proxy task, not on "
            f"private data: "
            f"{Path(path).name} (sha256 {sha256}), proxy {proxy_source}; it read only the target's public "
            f"metadata (image headers via the plan, dataset.json, the number of training patients). {others}")


def describe_for_report(path: Path, taken: dict[str, Any]) -> dict[str, Any]:
    """{path, sha256, proxy_source, tuned, taken, learning_rate}: what the run records of the file it used
    (`taken`: the values the run took from it)."""
    record = load_public_tuning(path)
    return {"path": str(path), "sha256": file_sha256(path), "proxy_source": str(record["proxy"]["source"]),
            "tuned": tuned_keys(record), "taken": dict(taken),
            "learning_rate": float(record["chosen"]["learning_rate"])}
