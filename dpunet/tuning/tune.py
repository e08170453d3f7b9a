"""dpunet_tune_public's procedure: choose the DP learning rate (and, when given several values, the steps T, the
expected patients per step q*N, the patches per patient K and the width) on a public proxy task, at the target's
privacy parameters and with the target's network, and write the choice next to the target's plan.

1. The proxy (dpunet.tuning.proxy_task): the target's public metadata, images from a public generator. It lives in
   roots of its own under $DPUNET_PREPROCESSED/<target>/public_proxy/ (raw, preprocessed, results), so nothing of
   it mixes with the user's tasks.
2. Its plan is the target's plan configuration (same network, patch, spacing, DP block and recipe), and it is
   preprocessed with the ordinary preprocessing.
3. One run of the ordinary trainer per candidate (the product of the candidate values): the target's epsilon,
   delta and C, the candidate's lr, T, q*N (with the same N), K and width (with that width's initial weights),
   the noise calibrated for them; scored by the mean foreground Dice on the proxy's validation patients. The
   best score wins.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import dpunet
from dpunet.dataset.msd import load_task
from dpunet.learning.checkpoint import load_checkpoint
from dpunet.paths import preprocessed_root, raw_root
from dpunet.planning.plans import load_training_inputs
from dpunet.planning.public_tuning import (PUBLIC_TUNING_FORMAT, TUNABLE, WHOLE_NUMBERS, epsilon_text,
                                           expected_patients_per_step, public_tuning_path, run_settings)
from dpunet.preprocessing.run import preprocess_task
from dpunet.pretraining.pretrain import pretrained_checkpoint_path
from dpunet.pretraining.sources import PUBLIC_SOURCES, public_source
from dpunet.training.config import TrainingConfig, merge_plan_and_options, pretraining_config
from dpunet.tuning.proxy_task import (PROXY_TASK_NAME, ProxyDefinition, case_ids,
                                      proxy_definition, proxy_plans, write_proxy_task)
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json, write_json

DEFAULT_LEARNING_RATES = (3e-3, 1e-2, 3e-2)
# options of the target's run that are not carried into the proxy runs (the proxy sets them itself)
NOT_CARRIED = ("task", "fold", "configuration", "epsilon", "learning_rate", "init_from", "run_tag", "public_tuning",
               "validation", "patients_per_step", "select_checkpoint_on_validation")


@contextlib.contextmanager
def dpunet_roots(base: Path) -> Iterator[None]:
    """$DPUNET_RAW/PREPROCESSED/RESULTS under `base` for the duration (the proxy's own roots)."""
    keys = {"DPUNET_RAW": base / "raw", "DPUNET_PREPROCESSED": base / "preprocessed",
            "DPUNET_RESULTS": base / "results"}
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(v) for k, v in keys.items()})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def proxy_base(definition: ProxyDefinition) -> Path:
    """The proxy's roots: one folder per (generator, configuration, fold, seed) of the target."""
    name = f"{definition.generator}__{definition.configuration}__fold{definition.fold}__seed{definition.seed}"
    return preprocessed_root() / definition.target_task / "public_proxy" / name


def pretraining_source(init_from: str) -> str | None:
    """Which public generator the run's initial weights were pretrained on (None: none known, or no weights)."""
    if init_from in ("", "none"):
        return None
    if init_from in PUBLIC_SOURCES:
        return init_from
    path = Path(init_from)
    if not path.is_file():
        return None  # the trainer names a missing checkpoint
    described = str(load_checkpoint(path).get("public_source", ""))
    for name, source in PUBLIC_SOURCES.items():
        if source.module in described or name in described:
            return name
    return None


def refuse_same_source(proxy: str, init_from: str) -> None:
    """A proxy drawn from the generator the run is pretrained on is already solved by the initial weights: every
    candidate would score alike and the choice would say nothing about the target."""
    source = pretraining_source(init_from)
    if source == proxy:
        raise DpunetError(f"--proxy {proxy}: the run starts from weights pretrained on the same generator "
                          f"(--init-from {init_from}); the pretrained network already solves that proxy, so the "
                          f"tuning would learn nothing. Choose another --proxy "
                          f"({', '.join(n for n in PUBLIC_SOURCES if n != proxy)}) or another --init-from")


def target_config(task_name: str, configuration: str, epsilon: float, fold: int | str,
                  options: dict[str, Any]) -> TrainingConfig:
    """The target run's configuration as dpunet_train would merge it (plan, then options), learning rate aside."""
    _, _, plan_config, _, _ = load_training_inputs(task_name, configuration)
    given = {k: v for k, v in options.items() if v is not None}
    # any learning rate: it keeps merge_plan_and_options from applying an existing tuning file
    given.update(task=task_name, fold=str(fold), epsilon=float(epsilon), configuration=configuration,
                 learning_rate=1.0)
    return merge_plan_and_options(plan_config, given)


def initial_weights(cfg: TrainingConfig) -> str:
    """The proxy runs' --init-from: the target's own cached pretraining file when the target names a public
    source and that file exists (the same weights dpunet_train would start from), else the target's --init-from
    unchanged (a named source is then pretrained once in the proxy's roots, with the same recipe and seed)."""
    if cfg.init_from not in PUBLIC_SOURCES:
        return cfg.init_from
    path = pretrained_checkpoint_path(cfg.task, cfg.configuration, pretraining_config(cfg))
    return str(path) if path.is_file() else cfg.init_from


def prepare_proxy(definition: ProxyDefinition, num_processes: int) -> None:
    """Raw proxy task, its plan (the target's configuration) and split, preprocessed (reused when unchanged)."""
    _, target_plans, _, _, _ = load_training_inputs(definition.target_task, definition.configuration)
    with dpunet_roots(proxy_base(definition)):
        raw = raw_root() / PROXY_TASK_NAME
        if write_proxy_task(definition, raw):
            print(f"proxy task written: {raw} ({definition.source})")
        pre = preprocessed_root() / PROXY_TASK_NAME
        write_json(proxy_plans(target_plans, definition), pre / "dpunet_plans.json")
        train, val = case_ids(definition)
        write_json([{"train": train, "val": val}], pre / "splits_final.json")
        preprocess_task(load_task(raw), [definition.configuration], num_processes)


def _run_tag(learning_rate: float, options: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"lr{learning_rate:g}_{digest}"


def _finished(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(privacy report, validation summary) of a finished proxy run, else None."""
    report, summary = folder / "release" / "privacy_report.json", folder / "private" / "validation" / "summary.json"
    if report.is_file() and summary.is_file():
        return load_json(report), load_json(summary)
    return None


def train_candidate(definition: ProxyDefinition, learning_rate: float, options: dict[str, Any]
                    ) -> dict[str, Any]:
    """One DP run on the proxy at `learning_rate` and `options` (a finished identical run is reused); its score."""
    from dpunet.api import train
    from dpunet.training.trainer import run_directory

    t0 = time.perf_counter()
    with dpunet_roots(proxy_base(definition)):
        opts = {**options, "learning_rate": learning_rate, "run_tag": _run_tag(learning_rate, options),
                "validation": True}
        _, _, plan_config, _, _ = load_training_inputs(PROXY_TASK_NAME, definition.configuration)
        folder = run_directory(merge_plan_and_options(plan_config, {
            **opts, "task": PROXY_TASK_NAME, "fold": "0", "epsilon": options["epsilon"],
            "configuration": definition.configuration}))
        done = _finished(folder)
        reused = done is not None
        if done is None:
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted proxy run: public data, started again
            epsilon = opts.pop("epsilon")
            run = train(PROXY_TASK_NAME, 0, epsilon, definition.configuration, **opts)
            done = (run.privacy_report, run.validation)
    report, summary = done
    dice = float(summary["foreground_mean"]["Dice"])
    return {"learning_rate": learning_rate, "steps": options["steps"], "width": options["width"],
            "patients_per_step": options["patients_per_step"], "patches_per_patient": options["patches_per_patient"],
            "proxy_mean_foreground_dice": dice if math.isfinite(dice) else None,
            "proxy_dice_per_class": {k: v.get("Dice") for k, v in summary.get("mean", {}).items()},
            "epsilon_spent_prv": report["epsilon"]["prv"], "noise_multiplier": report["noise_multiplier"],
            "seconds": round(time.perf_counter() - t0, 1), "reused_finished_run": reused,
            "run_folder": str(folder)}


def choose(candidates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the highest finite proxy Dice (the first of equals)."""
    scored = [c for c in candidates if c["proxy_mean_foreground_dice"] is not None]
    if not scored:
        raise DpunetError("no candidate gave a finite proxy Dice; nothing to choose")
    return max(scored, key=lambda c: c["proxy_mean_foreground_dice"])


def _checked_values(option: str, values: Sequence[Any], whole: bool) -> list[Any]:
    """`values` as distinct positive (whole) numbers, else an error naming the option."""
    values = list(values)
    if not values or len(set(values)) != len(values) or any(
            isinstance(v, bool) or not (math.isfinite(v) and v > 0) or (whole and int(v) != v) for v in values):
        raise DpunetError(f"{option} candidates must be distinct positive {'whole numbers' if whole else 'numbers'}, "
                          f"got {values}")
    return [int(v) if whole else float(v) for v in values]


def candidate_grid(learning_rates: Sequence[float], search: Mapping[str, Sequence[float]]
                   ) -> tuple[list[float], dict[str, list[Any]]]:
    """The checked candidate values: distinct positive learning rates, and for each searched setting (steps,
    patients_per_step, patches_per_patient: whole numbers; width) distinct positive values."""
    rates = _checked_values("--learning-rates", learning_rates, whole=False)
    grid: dict[str, list[Any]] = {}
    for key, values in search.items():
        if key not in TUNABLE[1:]:
            raise DpunetError(f"cannot tune {key!r} on the proxy; tunable: {', '.join(TUNABLE)}")
        grid[key] = _checked_values(f"--{key.replace('_', '-')}", values, whole=key in WHOLE_NUMBERS)
    return rates, grid


def tune_public(task_name: str, configuration: str, epsilon: float, proxy: str = "random_images",
                learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES, fold: int | str = 0,
                num_validation: int = 40, proxy_seed: int = 0, num_processes: int = 1,
                search: Mapping[str, Sequence[float]] | None = None, **options: Any) -> tuple[Path, dict[str, Any]]:
    """Tune the target's DP run on a public proxy; returns (tuning file, its record). The candidates are every
    combination of `learning_rates` and the values in `search` ({steps|patients_per_step|patches_per_patient|width:
    [values]}; a setting with one value is fixed, not tuned). `options`: the other TrainingConfig fields of the
    target run (arch, width, steps, patients_per_step, ...)."""
    t0 = time.perf_counter()
    public_source(proxy, "--proxy")  # refuses an unknown name
    if not math.isfinite(epsilon):
        raise DpunetError("--eps inf: public tuning chooses DP hyperparameters; give a finite epsilon")
    rates, grid = candidate_grid(learning_rates, search or {})
    fixed = {k: v[0] for k, v in grid.items() if len(v) == 1}
    grid = {k: v for k, v in grid.items() if len(v) > 1}
    cfg = target_config(task_name, configuration, epsilon, fold,
                        {**{k: v for k, v in options.items() if k not in grid}, **fixed})
    refuse_same_source(proxy, cfg.init_from)
    definition = proxy_definition(task_name, configuration, proxy, fold, num_validation, proxy_seed)
    _, _, plan_config, _, _ = load_training_inputs(task_name, configuration)
    patients_per_step = expected_patients_per_step(plan_config, definition.num_train, cfg.patients_per_step)
    if "patients_per_step" in grid:  # counts above N mean every patient: one candidate each
        grid["patients_per_step"] = list(dict.fromkeys(
            expected_patients_per_step(plan_config, definition.num_train, v) for v in grid["patients_per_step"]))
    # before the roots change: the target's pretraining file (one per width)
    init_path = {w: initial_weights(replace(cfg, width=w)) for w in grid.get("width", [cfg.width])}
    prepare_proxy(definition, num_processes)
    carried = {k: v for k, v in cfg.to_dict().items() if k not in NOT_CARRIED}
    carried.update(epsilon=float(epsilon), patients_per_step=patients_per_step)
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    candidates = [train_candidate(definition, rate, {**carried, **combination, "init_from": init_path[
                      combination.get("width", cfg.width)]})
                  for combination in combinations for rate in rates]
    best = choose(candidates)
    tuned = ["learning_rate", *grid]
    chosen_cfg = replace(cfg, **{k: best[k] for k in grid})
    settings = run_settings(chosen_cfg, best["patients_per_step"])
    record = {
        "format": PUBLIC_TUNING_FORMAT,
        "what": f"DP hyperparameters ({', '.join(tuned)}) chosen on a public proxy task (dpunet_tune_public); no "
                f"private label or image was read",
        "target": {"task": task_name, "configuration": configuration, "arch": cfg.arch, "epsilon": epsilon_text(
                   epsilon), "fold_for_N": str(fold), "num_patients": definition.num_train,
                   "patch_size": plan_config["patch_size"]},
        "read_from_target": ["dpunet_plans.json (configuration entry: spacing, median shape, network, patch, DP "
                             "block, recipe; derived from image headers)", "dataset.json (channel and label names, "
                             "case-to-patient ids)", "splits_final.json (the number of training patients N)"],
        "proxy": {**definition.to_dict(), "source": definition.source, "folder": str(proxy_base(definition))},
        "tuned": tuned,
        "search": {"learning_rate": rates, **grid},
        "settings": settings,
        "privacy_parameters": {"epsilon": epsilon, "delta": cfg.delta, "num_patients": definition.num_train,
                               "expected_patients_per_step": best["patients_per_step"],
                               "sample_rate": best["patients_per_step"] / definition.num_train,
                               "steps": best["steps"], "patches_per_patient": best["patches_per_patient"],
                               "clip_norm": cfg.clip_norm, "noise_multiplier": best["noise_multiplier"],
                               "init_from": cfg.init_from, "width": best["width"],
                               "initial_weights_file": init_path[best["width"]]},
        "candidates": candidates,
        "chosen": {**{k: best[k] for k in tuned}, "proxy_mean_foreground_dice": best["proxy_mean_foreground_dice"],
                   "rule": "highest mean foreground Dice on the proxy's validation patients (first of equals)"},
        "plan_default_learning_rate": plan_config["training"].get("learning_rate"),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "dpunet_version": dpunet.__version__,
    }
    path = public_tuning_path(task_name, configuration, cfg.arch, epsilon)
    write_json(record, path)
    return path, record
