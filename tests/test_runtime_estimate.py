"""The run-time estimate: its arithmetic, the micro-batch it times, the CPU advice it prints, and --max-hours
refusing a long run."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dpunet.training import runtime_estimate
from dpunet.training.runtime_estimate import (CPU_RECIPES, LONG_PATIENT_SECONDS, RunTimeEstimate, best_seconds,
                                              cpu_advice, describe_estimate, format_duration,
                                              new_micro_batch_sizes, new_size_seconds, time_micro_batch)


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
    plus n * `planning` seconds the first time it meets a size (like the fast engine's per-shape planning)."""

    def __init__(self, base: float, growth: float = 0.25, planning: float = 3.0) -> None:
        self.base, self.growth, self.planning = base, growth, planning
        self.now, self.calls = 0.0, []

    def per_patient(self, n: int) -> float:
        return self.base + self.growth * n

    def accumulate(self, n: int) -> None:
        self.now += n * (self.per_patient(n) + (self.planning if n not in self.calls else 0.0))
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
    timing = time_micro_batch(engine.accumulate, 8, torch.device("cpu"))
    # per patient at 8 patients, without the planning: 1 + 0.25 * 8; one patient alone would say 1.25
    assert timing.patients == 8 and engine.calls == [1, 8, 8]
    assert timing.seconds_per_patient == pytest.approx(engine.per_patient(8)) != engine.per_patient(1)
    assert timing.first_seconds_per_patient == pytest.approx(engine.planning)


def test_one_patient_runs_are_timed_once_after_their_warm_up(fake_engine):
    engine = fake_engine(base=1.0)
    timing = time_micro_batch(engine.accumulate, 1, torch.device("cpu"))
    assert (timing.patients, engine.calls, timing.first_seconds_per_patient) == (1, [1, 1], 0.0)
    assert timing.seconds_per_patient == pytest.approx(engine.per_patient(1))


def test_a_long_patient_is_timed_alone_so_the_estimate_stays_short(fake_engine):
    engine = fake_engine(base=LONG_PATIENT_SECONDS)  # the warm-up: 20.25 s + planning > the limit
    timing = time_micro_batch(engine.accumulate, 8, torch.device("cpu"))
    assert (timing.patients, engine.calls) == (1, [1, 1])
    assert timing.seconds_per_patient == pytest.approx(engine.per_patient(1))
    # just under the limit: the real micro-batch is timed
    engine = fake_engine(base=LONG_PATIENT_SECONDS - 3.5)
    assert time_micro_batch(engine.accumulate, 8, torch.device("cpu")).patients == 8


def test_new_micro_batch_sizes_by_hand():
    # 4 patients, q 1/2: m ~ Binomial(4, 1/2) = 1, 4, 6, 4, 1 sixteenths for m = 0..4
    # micro-batches of 2: m = 2 -> [2], 3 -> [2, 1], 4 -> [2, 2]; one patient is never planned
    assert new_micro_batch_sizes(4, 0.5, 2, 1) == pytest.approx({2: 11 / 16})
    assert new_micro_batch_sizes(4, 0.5, 2, 2) == pytest.approx({2: 1 - (5 / 16) ** 2})
    # micro-batches of 3: m = 2 -> [2], 3 -> [3], 4 -> [3, 1]; the size already planned is left out
    assert new_micro_batch_sizes(4, 0.5, 3, 1) == pytest.approx({2: 6 / 16, 3: 5 / 16})
    assert new_micro_batch_sizes(4, 0.5, 3, 1, known={3}) == pytest.approx({2: 6 / 16})
    assert new_micro_batch_sizes(4, 1.0, 3, 5) == {3: 1.0} and new_micro_batch_sizes(4, 0.0, 3, 5) == {}


def test_new_micro_batch_sizes_match_simulated_poisson_sampling():
    patients, q, per_micro_batch, steps, runs = 30, 0.3, 4, 3, 4000
    generator = torch.Generator().manual_seed(0)
    drawn = torch.bernoulli(torch.full((runs, steps, patients), q), generator=generator).sum(-1).long()
    seen: dict[int, int] = {}
    for run in drawn.tolist():
        sizes = set()
        for m in run:
            sizes |= {len(chunk) for chunk in (list(range(m))[i:i + per_micro_batch]
                                               for i in range(0, m, per_micro_batch))}
        for size in sizes - {0, 1}:
            seen[size] = seen.get(size, 0) + 1
    predicted = new_micro_batch_sizes(patients, q, per_micro_batch, steps)
    assert set(predicted) == set(seen)
    for size, p in predicted.items():
        assert abs(seen[size] / runs - p) < 0.03, size
    assert new_size_seconds(2.0, {2: 0.5, 4: 0.25}) == pytest.approx(2.0 * (2 * 0.5 + 4 * 0.25))


def describe(timed_patients: int, micro_batch_patients: int, new_size: float = 0.0) -> str:
    e = RunTimeEstimate(device="cpu", seconds_per_patient=2.0, patients_per_step=16, patches_per_patient=1,
                        steps=3, noise_seconds_per_step=0.1, pretraining_steps=0, pretraining_seconds_per_step=0,
                        timed_patients=timed_patients, micro_batch_patients=micro_batch_patients,
                        new_size_seconds=new_size)
    assert e.to_dict()["timed_patients"] == timed_patients
    assert e.training_seconds == pytest.approx(3 * (2.0 * 16 + 0.1) + new_size)
    return describe_estimate(e)


def test_description_says_what_was_timed():
    assert "timed on a micro-batch of 16 patient(s), the run's size" in describe(16, 16)
    text = describe(1, 16)
    assert "timed on 1 patient only, not the run's micro-batch of 16" in text
    assert f"over {LONG_PATIENT_SECONDS:g} s" in text
    assert "plans of the micro-batch sizes" not in text
    assert "+ 2 min for the engine's plans of the micro-batch sizes" in describe(16, 16, new_size=120.0)
