"""How long will this run take here? A measured estimate, printed before any long work starts.

The trainer times its own gradient engine on shape-only data (no private data) at the size of the run's real
micro-batch (`min(patients per micro-batch, patients per step)` patients of K patches, after one untimed warm-up
at that size), and the non-private forward/backward that pretraining repeats, then multiplies by the plan:
expected patients per step, steps, pretraining steps. One patient alone is not enough: a micro-batch holds the
per-patient gradients of all its patients at once, the fast engine takes another path for one patient (a plain
backward) than for several, and it plans its layer implementations per micro-batch shape; a 45.6M-parameter
VNet took 351 s for a real first step against 6.8 s estimated from one patient. An engine that plans its layers
per micro-batch shape (the fast engine) pays that planning again for every new micro-batch size that Poisson
sampling brings: the estimate adds it, from the measured extra cost of the first micro-batch of a size and the
sizes the run is expected to meet.

A default run planned for a GPU can take many hours on a CPU; the estimate says so before the first pretraining
step, and names the reduced recipe that was measured on a 2-core CPU (documentation/results.md). `--max-hours`
turns the warning into a refusal.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Collection

import torch

# a run longer than this on a CPU gets the warning and the recommended CPU recipe
CPU_WARNING_HOURS = 1.0
# the reduced settings of the five-fold CVs measured on a 2-core CPU (documentation/results.md, hippocampus: 2d
# chosen on the public proxy, documentation/tuning.md): a recommendation, never applied silently
CPU_RECIPES = {
    2: "--width 0.5 --steps 250 --patients-per-step 32",
    3: "--width 0.25 --steps 150 --patches-per-patient 1 --patients-per-step 32",
}
# a one-patient warm-up longer than this: time one patient only, so the estimate itself stays short (a real-size
# micro-batch would cost warm-up + timed run = twice the micro-batch's patients at this rate)
LONG_PATIENT_SECONDS = 20.0


@dataclass(frozen=True)
class RunTimeEstimate:
    """Seconds of each part of a run on one device (validation and checkpoints not included)."""
    device: str
    seconds_per_patient: float
    patients_per_step: int
    patches_per_patient: int
    steps: int
    noise_seconds_per_step: float
    pretraining_steps: int
    pretraining_seconds_per_step: float
    # patients in the timed micro-batch, and in the run's micro-batch (fewer timed when one patient took long)
    timed_patients: int = 1
    micro_batch_patients: int = 1
    # expected extra seconds of the first micro-batch of each size the run meets (per-shape planning)
    new_size_seconds: float = 0.0

    @property
    def step_seconds(self) -> float:
        return self.seconds_per_patient * self.patients_per_step + self.noise_seconds_per_step

    @property
    def training_seconds(self) -> float:
        return self.step_seconds * self.steps + self.new_size_seconds

    @property
    def pretraining_seconds(self) -> float:
        return self.pretraining_seconds_per_step * self.pretraining_steps

    @property
    def total_seconds(self) -> float:
        return self.training_seconds + self.pretraining_seconds

    def steps_that_fit(self, hours: float) -> int:
        """DP steps at this setting that fit in `hours` after pretraining (0 when pretraining alone does not)."""
        left = hours * 3600.0 - self.pretraining_seconds - self.new_size_seconds
        return max(0, int(left // self.step_seconds)) if self.step_seconds > 0 else self.steps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(step_seconds=self.step_seconds, training_seconds=self.training_seconds,
                 pretraining_seconds=self.pretraining_seconds, total_seconds=self.total_seconds)
        return d


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _sync(device: torch.device) -> None:
    # CUDA runs asynchronously: wait for the work before reading the clock
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_seconds(action: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    action()
    _sync(device)
    return time.perf_counter() - start


def best_seconds(action: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `action` over `repeats` runs after one warm-up (allocations, lazy plans, autotuning)."""
    action()
    return min(_wall_seconds(action, device) for _ in range(max(1, repeats)))


@dataclass(frozen=True)
class MicroBatchTiming:
    seconds_per_patient: float
    patients: int  # patients in the timed micro-batch
    first_seconds_per_patient: float  # what the first micro-batch of a size costs more, per patient (>= 0)


def time_micro_batch(accumulate: Callable[[int], Any], patients: int, device: torch.device,
                     long_seconds: float = LONG_PATIENT_SECONDS) -> MicroBatchTiming:
    """Per-patient seconds of `accumulate(n)` (one micro-batch of n shape-only patients) at n = `patients`.

    One patient first, watched: when it takes longer than `long_seconds`, one more one-patient run is timed and
    nothing larger is tried (bounded cost). Otherwise a warm-up of the full `patients` (allocations, the
    engine's per-shape planning), then a timed run of it; their difference is the first-size cost.
    """
    patients = max(1, int(patients))
    one_patient_warm_up = _wall_seconds(lambda: accumulate(1), device)
    if patients == 1 or one_patient_warm_up > long_seconds:
        return MicroBatchTiming(_wall_seconds(lambda: accumulate(1), device), 1, 0.0)
    warm_up = _wall_seconds(lambda: accumulate(patients), device)
    timed = _wall_seconds(lambda: accumulate(patients), device)
    return MicroBatchTiming(timed / patients, patients, max(0.0, warm_up - timed) / patients)


def new_micro_batch_sizes(patients: int, sample_rate: float, per_micro_batch: int, steps: int,
                          known: Collection[int] = ()) -> dict[int, float]:
    """Size -> probability that `steps` Poisson-sampled steps (each patient drawn with `sample_rate`, a step
    split into micro-batches of `per_micro_batch`: full ones and one remainder) meet a micro-batch of that size
    at least once; sizes of two patients or more (one patient takes no per-shape plan) not in `known`."""
    from scipy.stats import binom

    per_step: dict[int, float] = {}
    for m, p in enumerate(binom.pmf(range(patients + 1), patients, sample_rate).tolist()):
        sizes = ({per_micro_batch} if m >= per_micro_batch else set()) | ({m % per_micro_batch} - {0})
        for size in sizes:
            per_step[size] = per_step.get(size, 0.0) + p
    return {size: 1.0 - (1.0 - p) ** steps for size, p in sorted(per_step.items())
            if size >= 2 and size not in known and p > 0}


def new_size_seconds(first_seconds_per_patient: float, sizes: dict[int, float]) -> float:
    """Expected extra seconds of the first micro-batches of new sizes: that cost grows with the patients."""
    return first_seconds_per_patient * sum(size * p for size, p in sizes.items())


def describe_estimate(estimate: RunTimeEstimate) -> str:
    """One paragraph: the total, then how it is made up."""
    parts = [f"estimated wall time on {estimate.device}: {format_duration(estimate.total_seconds)}"]
    detail = (f"{estimate.steps} DP steps x {estimate.step_seconds:.2f} s ({estimate.patients_per_step} patients x "
              f"{estimate.patches_per_patient} patches at {estimate.seconds_per_patient:.3f} s per patient, noise "
              f"{estimate.noise_seconds_per_step:.3f} s)")
    if estimate.new_size_seconds > 0:
        detail += (f" + {format_duration(estimate.new_size_seconds)} for the engine's plans of the micro-batch "
                   f"sizes the run is expected to meet")
    detail += f"; {timing_basis(estimate)}"
    if estimate.pretraining_steps:
        detail = (f"pretraining {format_duration(estimate.pretraining_seconds)} ({estimate.pretraining_steps} steps) "
                  f"+ " + detail)
    return f"{parts[0]} = {detail}; validation and checkpoints not included"


def timing_basis(estimate: RunTimeEstimate) -> str:
    """What the per-patient figure was timed on."""
    if estimate.timed_patients >= estimate.micro_batch_patients:
        return f"timed on a micro-batch of {estimate.timed_patients} patient(s), the run's size"
    return (f"timed on 1 patient only, not the run's micro-batch of {estimate.micro_batch_patients}: its warm-up "
            f"took over {LONG_PATIENT_SECONDS:g} s, and larger micro-batches can cost more per patient")


def cpu_advice(estimate: RunTimeEstimate, dim: int) -> str | None:
    """The warning for a CPU run estimated longer than CPU_WARNING_HOURS, with the settings that shorten it."""
    if estimate.device != "cpu" or estimate.total_seconds <= CPU_WARNING_HOURS * 3600:
        return None
    fit = estimate.steps_that_fit(CPU_WARNING_HOURS)
    fit_text = (f"at this width, {fit} steps fit in {CPU_WARNING_HOURS:g} h (--steps {fit})" if fit else
                f"at this width not even the pretraining fits in {CPU_WARNING_HOURS:g} h")
    return (f"this run was planned for a GPU and would take {format_duration(estimate.total_seconds)} on this "
            f"CPU. The reduced recipe measured on a 2-core CPU (documentation/results.md) is "
            f"`{CPU_RECIPES.get(dim, CPU_RECIPES[3])}`; {fit_text}. `--max-hours H` refuses runs estimated "
            f"longer than H hours")
