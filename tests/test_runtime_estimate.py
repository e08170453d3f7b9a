"""The run-time estimate: its arithmetic, the micro-batch it times, the CPU advice it prints, and --max-hours
refusing a long run."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dpunet.training import runtime_estimate
from dpunet.training.runtime_estimate import (CPU_RECIPES, LONG_PATIENT_SECONDS, RunTimeEstimate, best_seconds,
                                              cpu_advice, describe_estimate, format_duration,
                                              seconds_per_patient_at)


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


class FakeEngine:
    """An engine on a fake clock whose cost is known: a micro-batch of n patients takes n * (base + growth * n)
    seconds (per patient it costs more the more patients it holds, like per-patient gradients filling memory),
    plus `planning` seconds the first time it meets a size (like the fast engine's per-shape planning)."""

    def __init__(self, base: float, growth: float = 0.25, planning: float = 5.0) -> None:
        self.base, self.growth, self.planning = base, growth, planning
        self.now, self.calls = 0.0, []

    def per_patient(self, n: int) -> float:
        return self.base + self.growth * n

    def accumulate(self, n: int) -> None:
        self.now += n * self.per_patient(n) + (self.planning if n not in self.calls else 0.0)
        self.calls.append(n)


@pytest.fixture
def fake_engine(monkeypatch):
    def make(**cost) -> FakeEngine:
        engine = FakeEngine(**cost)
        monkeypatch.setattr(runtime_estimate, "time", SimpleNamespace(perf_counter=lambda: engine.now))
        return engine
    return make


def test_the_run_s_micro_batch_is_timed_after_a_warm_up_at_its_size(fake_engine):
    engine = fake_engine(base=1.0)
    seconds, timed = seconds_per_patient_at(engine.accumulate, 8, torch.device("cpu"))
    # per patient at 8 patients, without the planning: 1 + 0.25 * 8; one patient alone would say 1.25
    assert timed == 8 and seconds == pytest.approx(engine.per_patient(8)) and seconds != engine.per_patient(1)
    assert engine.calls == [1, 8, 8]


def test_one_patient_runs_are_timed_once_after_their_warm_up(fake_engine):
    engine = fake_engine(base=1.0)
    seconds, timed = seconds_per_patient_at(engine.accumulate, 1, torch.device("cpu"))
    assert (timed, engine.calls) == (1, [1, 1]) and seconds == pytest.approx(engine.per_patient(1))


def test_a_long_patient_is_timed_alone_so_the_estimate_stays_short(fake_engine):
    engine = fake_engine(base=LONG_PATIENT_SECONDS)  # the warm-up: 20.25 s + planning > the limit
    seconds, timed = seconds_per_patient_at(engine.accumulate, 8, torch.device("cpu"))
    assert (timed, engine.calls) == (1, [1, 1]) and seconds == pytest.approx(engine.per_patient(1))
    # just under the limit: the real micro-batch is timed
    engine = fake_engine(base=LONG_PATIENT_SECONDS - 5.5)
    assert seconds_per_patient_at(engine.accumulate, 8, torch.device("cpu"))[1] == 8


def test_description_says_what_was_timed():
    def timed(timed_patients: int, micro_batch_patients: int) -> str:
        e = RunTimeEstimate(device="cpu", seconds_per_patient=2.0, patients_per_step=16, patches_per_patient=1,
                            steps=3, noise_seconds_per_step=0.1, pretraining_steps=0, pretraining_seconds_per_step=0,
                            timed_patients=timed_patients, micro_batch_patients=micro_batch_patients)
        assert e.to_dict()["timed_patients"] == timed_patients
        return describe_estimate(e)

    assert "timed on a micro-batch of 16 patient(s), the run's size" in timed(16, 16)
    text = timed(1, 16)
    assert "timed on 1 patient only, not the run's micro-batch of 16" in text
    assert f"over {LONG_PATIENT_SECONDS:g} s" in text
