"""Differentially private dataset statistics for uses outside DP-SGD (e.g. CT normalisation).

Each patient contributes one vector of d values clipped to known bounds. We release the Gaussian-noised sum of
the values (rescaled to [-1, 1]) together with a noised count in one query; under add/remove-one-patient
adjacency its L2 sensitivity is sqrt(d + 1). The noise multiplier comes from the same accountant as training
(one step, sampling rate 1), so the epsilon is directly comparable and can be composed with the training run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpunet.privacy.randomness import PrivateRandomness, hardened_normal_numpy
from dpunet.utils.errors import DpunetError


@dataclass
class DPMeansRelease:
    means: np.ndarray
    epsilon: float
    delta: float
    noise_multiplier: float
    num_patients_noisy: float
    accountant: str


def dp_bounded_means(values: np.ndarray, lower: np.ndarray, upper: np.ndarray, epsilon: float, delta: float,
                     randomness: PrivateRandomness | None = None, accountant: str = "prv") -> DPMeansRelease:
    """(epsilon, delta)-DP means of per-patient vectors `values` (n, d), each column clipped to [lower, upper].
    The noise is hardened and drawn from `randomness` (dpunet.privacy.randomness), by default a fresh key from the
    operating system's entropy. A generator or seed is refused: a public seed would let anyone subtract the noise
    (`PrivateRandomness.insecure_from_seed` makes that explicit, for tests)."""
    if randomness is not None and not isinstance(randomness, PrivateRandomness):
        raise TypeError("dp_bounded_means needs a PrivateRandomness (never a seeded generator)")
    from dpunet.privacy.accounting import calibrate_noise_multiplier

    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    lower, upper = np.broadcast_to(lower, values.shape[1:]), np.broadcast_to(upper, values.shape[1:])
    if np.any(upper <= lower):
        raise DpunetError("DP statistics need upper bounds strictly above lower bounds")
    centre, half = (upper + lower) / 2, (upper - lower) / 2
    scaled = (np.clip(values, lower, upper) - centre) / half  # each entry in [-1, 1]
    d = values.shape[1]
    sigma = calibrate_noise_multiplier(epsilon, delta, sample_rate=1.0, steps=1, accountant=accountant)
    std = sigma * np.sqrt(d + 1)
    rng = (randomness or PrivateRandomness.secure()).numpy_generator("dp statistics", 0)
    noisy_sum = scaled.sum(0) + hardened_normal_numpy(d, std, rng)
    noisy_count = len(values) + float(hardened_normal_numpy(1, std, rng)[0])
    count = max(noisy_count, 1.0)
    means = np.clip(noisy_sum / count, -1, 1) * half + centre
    return DPMeansRelease(means, float(epsilon), float(delta), float(sigma), float(noisy_count), accountant)
