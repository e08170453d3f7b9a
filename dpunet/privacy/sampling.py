"""Poisson sampling of patients: the sampling the accountant assumes.

Every logical step includes each patient independently with probability q, so batch sizes vary
(Binomial(N, q)) and an empty batch is a valid step. Fixed-size batches or shuffled epochs would not match
the Poisson-subsampled Gaussian analysis.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from dpunet.utils.errors import DpunetError


class PoissonPatientSampler:
    """Draws the patients of each logical step; its RNG state is checkpointed so a resumed run continues
    the very same sequence of batches (and never re-draws a step it already paid for)."""

    STATE_VERSION = 1

    def __init__(self, patient_ids: Sequence[str], sample_rate: float, seed: int) -> None:
        ids = [str(p) for p in patient_ids]
        if not ids:
            raise DpunetError("Poisson sampler needs at least one patient")
        if len(set(ids)) != len(ids):
            dupes = sorted({p for p in ids if ids.count(p) > 1})
            # a patient listed twice would be sampled twice per step: twice the sensitivity
            raise DpunetError(f"patient ids must be unique; duplicated: {dupes[:10]}")
        if isinstance(sample_rate, bool) or not (isinstance(sample_rate, numbers.Real) and 0.0 < sample_rate <= 1.0):
            raise DpunetError(f"sample rate q must be in (0, 1], got {sample_rate!r}")
        self.patient_ids = ids
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.num_draws = 0

    @property
    def num_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def expected_batch_size(self) -> float:
        """q * N: what the noisy sum is divided by (not the realised batch size, which leaks membership)."""
        return self.sample_rate * self.num_patients

    def sample(self) -> list[str]:
        """The patients of the next logical step, in the order of `patient_ids` (possibly none)."""
        included = self._rng.random(self.num_patients) < self.sample_rate
        self.num_draws += 1
        return [p for p, keep in zip(self.patient_ids, included) if keep]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (the PCG64 state is plain ints)."""
        return {
            "version": self.STATE_VERSION,
            "patient_ids": list(self.patient_ids),
            "sample_rate": self.sample_rate,
            "seed": self.seed,
            "num_draws": self.num_draws,
            "bit_generator": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the exact RNG state; refuses a state drawn for other patients or another q."""
        try:
            if state["version"] != self.STATE_VERSION:
                raise DpunetError(f"sampler state has version {state['version']}, expected {self.STATE_VERSION}")
            if list(state["patient_ids"]) != self.patient_ids:
                raise DpunetError("sampler state was saved for a different list of patients; cannot resume")
            if float(state["sample_rate"]) != self.sample_rate:
                raise DpunetError(
                    f"sampler state was saved with q={state['sample_rate']}, this run uses q={self.sample_rate}"
                )
            bit_state = state["bit_generator"]
            if bit_state.get("bit_generator") != "PCG64":
                raise DpunetError(f"sampler state has bit generator {bit_state.get('bit_generator')!r}, expected PCG64")
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = bit_state
            num_draws = int(state["num_draws"])
            seed = int(state["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise DpunetError(f"invalid sampler state: {e!r}") from e
        self._rng = rng
        self.num_draws = num_draws
        self.seed = seed
