"""The run-time estimate: its arithmetic, the CPU advice it prints, and --max-hours refusing a long run."""
from __future__ import annotations

import torch

from dpunet.training.runtime_estimate import (CPU_RECIPES, RunTimeEstimate, best_seconds, cpu_advice,
                                              describe_estimate, format_duration)


def estimate(device: str = "cpu", seconds_per_patient: float = 0.5, steps: int = 500,
             pretraining_steps: int = 600) -> RunTimeEstimate:
    return RunTimeEstimate(device=device, seconds_per_patient=seconds_per_patient, patients_per_step=64,
                           patches_per_patient=4, steps=steps, noise_seconds_per_step=0.2,
                           pretraining_steps=pretraining_steps, pretraining_seconds_per_step=0.5)


def test_totals_add_up_from_the_measured_parts():
    e = estimate()
    assert e.step_seconds == 0.5 * 64 + 0.2
    assert e.training_seconds == e.step_seconds * 500
    assert e.pretraining_seconds == 300
    assert e.total_seconds == e.training_seconds + 300
    d = e.to_dict()
    assert d["total_seconds"] == e.total_seconds and d["device"] == "cpu"


def test_steps_that_fit_leave_room_for_pretraining():
    e = estimate()
    fit = e.steps_that_fit(1.0)
    assert fit == int((3600 - 300) // e.step_seconds)
    assert fit * e.step_seconds + e.pretraining_seconds <= 3600 < (fit + 1) * e.step_seconds + e.pretraining_seconds
    assert estimate(pretraining_steps=100000).steps_that_fit(1.0) == 0


def test_long_cpu_runs_get_advice_and_short_or_gpu_runs_do_not():
    long_run = estimate()
    advice = cpu_advice(long_run, 3)
    assert advice is not None and CPU_RECIPES[3] in advice and "--max-hours" in advice
    assert f"--steps {long_run.steps_that_fit(1.0)}" in advice
    assert cpu_advice(estimate(seconds_per_patient=0.001, steps=10), 2) is None
    assert cpu_advice(estimate(device="cuda"), 2) is None


def test_description_names_each_part():
    text = describe_estimate(estimate())
    assert "pretraining 5 min" in text and "500 DP steps" in text and "64 patients x 4 patches" in text
    assert "pretraining" not in describe_estimate(estimate(pretraining_steps=0))
    assert format_duration(30) == "30 s" and format_duration(600) == "10 min" and format_duration(7200) == "2.0 h"


def test_best_seconds_times_after_a_warm_up():
    calls = []
    seconds = best_seconds(lambda: calls.append(torch.ones(10).sum()), torch.device("cpu"), repeats=2)
    assert len(calls) == 3 and 0 <= seconds < 1
