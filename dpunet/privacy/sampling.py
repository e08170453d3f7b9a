"""Poisson sampling of patients: the sampling the accountant assumes.

Every logical step includes each patient independently with probability q, so batch sizes vary
(Binomial(N, q)) and an empty batch is a valid step. Fixed-size batches or shuffled epochs would not match
the Poisson-subsampled Gaussian analysis.

The draw of step t comes from a generator seeded by the session's secret key and t
(`dpunet.privacy.randomness`): amplification by subsampling assumes the attacker cannot re-draw the batches, so
the sampler has no public seed and no state worth saving; a resumed run draws its remaining steps afresh.
"""
from __future__ import annotations

import numbers
from typing import Sequence

from dpunet.privacy.randomness import PrivateRandomness
from dpunet.utils.errors import DpunetError

PURPOSE = "poisson sampling"


class PoissonPatientSampler:
    """Draws the patients of each logical step from the session's secret randomness."""

    def __init__(self, patient_ids: Sequence[str], sample_rate: float, randomness: PrivateRandomness) -> None:
        ids = [str(p) for p in patient_ids]
        if not ids:
            raise DpunetError("Poisson sampler needs at least one patient")
        if len(set(ids)) != len(ids):
            dupes = sorted({p for p in ids if ids.count(p) > 1})
            # a patient listed twice would be sampled twice per step: twice the sensitivity
            raise DpunetError(f"patient ids must be unique; duplicated: {dupes[:10]}")
        if isinstance(sample_rate, bool) or not (isinstance(sample_rate, numbers.Real) and 0.0 < sample_rate <= 1.0):
            raise DpunetError(f"sample rate q must be in (0, 1], got {sample_rate!r}")
        if not isinstance(randomness, PrivateRandomness):
            raise TypeError("PoissonPatientSampler needs a PrivateRandomness (never a public seed)")
        self.patient_ids = ids
        self.sample_rate = float(sample_rate)
        self._randomness = randomness

    @property
    def num_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def expected_batch_size(self) -> float:
        """q * N: what the noisy sum is divided by (not the realised batch size, which leaks membership)."""
        return self.sample_rate * self.num_patients

    def sample(self, step: int) -> list[str]:
        """The patients of logical step `step`, in the order of `patient_ids` (possibly none). The same step
        gives the same draw within a session (every rank of a distributed run draws alike)."""
        included = self._randomness.numpy_generator(PURPOSE, step).random(self.num_patients) < self.sample_rate
        return [p for p, keep in zip(self.patient_ids, included) if keep]
