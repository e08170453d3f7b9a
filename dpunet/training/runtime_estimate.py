"""How long will this run take here? A measured estimate, printed before any long work starts.

The trainer times its own gradient engine on shape-only data (one patient's K patches, no private data) and the
non-private forward/backward that pretraining repeats, then multiplies by the plan: expected patients per step,
steps, pretraining steps. A default run planned for a GPU can take many hours on a CPU; the estimate says so
before the first pretraining step, and names the reduced recipe that was measured on a 2-core CPU
(documentation/results.md). `--max-hours` turns the warning into a refusal.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

# a run longer than this on a CPU gets the warning and the recommended CPU recipe
CPU_WARNING_HOURS = 1.0
# the reduced settings measured on a 2-core CPU (documentation/results.md, hippocampus): a recommendation,
# never applied silently
CPU_RECIPES = {
    2: "--width 0.25 --steps 300",
    3: "--width 0.25 --steps 150 --patches-per-patient 1 --patients-per-step 32",
}


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

    @property
    def step_seconds(self) -> float:
        return self.seconds_per_patient * self.patients_per_step + self.noise_seconds_per_step

    @property
    def training_seconds(self) -> float:
        return self.step_seconds * self.steps

    @property
    def pretraining_seconds(self) -> float:
        return self.pretraining_seconds_per_step * self.pretraining_steps

    @property
    def total_seconds(self) -> float:
        return self.training_seconds + self.pretraining_seconds

    def steps_that_fit(self, hours: float) -> int:
        """DP steps at this setting that fit in `hours` after pretraining (0 when pretraining alone does not)."""
        left = hours * 3600.0 - self.pretraining_seconds
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


def best_seconds(action: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `action` over `repeats` runs after one warm-up (allocations, lazy plans, autotuning)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    action()
    best = math.inf
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        action()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def describe_estimate(estimate: RunTimeEstimate) -> str:
    """One paragraph: the total, then how it is made up."""
    parts = [f"estimated wall time on {estimate.device}: {format_duration(estimate.total_seconds)}"]
    detail = (f"{estimate.steps} DP steps x {estimate.step_seconds:.2f} s ({estimate.patients_per_step} patients x "
              f"{estimate.patches_per_patient} patches at {estimate.seconds_per_patient:.3f} s per patient, noise "
              f"{estimate.noise_seconds_per_step:.3f} s)")
    if estimate.pretraining_steps:
        detail = (f"pretraining {format_duration(estimate.pretraining_seconds)} ({estimate.pretraining_steps} steps) "
                  f"+ " + detail)
    return f"{parts[0]} = {detail}; validation and checkpoints not included"


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
