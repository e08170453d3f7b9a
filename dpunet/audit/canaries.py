"""Dirac gradient canaries: white-box canary patients whose gradient is M * e_j on one coordinate j of the
trained parameters (Steinke, Nasr, Jagielski 2023, white-box setting; Nasr et al. 2023).

A canary is a patient id in the Poisson sampler like any other. When the sampler draws it, its gradient is
clipped with the engines' own clip rule and added to the step's sum before the noise, so the audit sees exactly
what a real patient's contribution goes through: sampling, clipping, noise, the divisor q*N and the secret
randomness. What it does not exercise is how an engine computes a per-patient gradient from images; the engine
tests compare that with a per-patient loop.

Canary coordinates are drawn at random among all trained coordinates: a real patient's clipped gradient spreads
its norm (at most C) over ~1e5 coordinates, so the training data add little to any one canary's coordinate.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from dpunet.privacy.engines.base import clip_factors

CANARY_PREFIX = "audit_canary_"


class DiracCanaries:
    """m canaries, each included with probability 1/2 by the auditor; `included_ids` join the training set."""

    def __init__(self, num_canaries: int, magnitude: float, rng: np.random.Generator, clip: bool = True) -> None:
        if num_canaries < 1:
            raise ValueError("an audit needs at least one canary")
        if not magnitude > 0:
            raise ValueError(f"canary magnitude must be positive, got {magnitude}")
        self.ids = [f"{CANARY_PREFIX}{i:06d}" for i in range(num_canaries)]
        self.included = rng.random(num_canaries) < 0.5
        self.magnitude = float(magnitude)
        self.clip = clip  # False only for the audit's own broken-variant tests
        self._rng = rng
        self.coordinates: np.ndarray | None = None  # flat indices into the trained parameters, set by bind()
        self._index = {cid: i for i, cid in enumerate(self.ids)}

    @property
    def included_ids(self) -> list[str]:
        return [cid for cid, keep in zip(self.ids, self.included) if keep]

    def is_canary(self, patient_id: str) -> bool:
        return patient_id in self._index

    def bind(self, params: Sequence[Tensor]) -> None:
        """Choose a distinct coordinate per canary among the trained parameters."""
        total = sum(p.numel() for p in params)
        if total < len(self.ids):
            raise ValueError(f"{len(self.ids)} canaries need at least as many trained coordinates (have {total})")
        self.coordinates = self._rng.choice(total, size=len(self.ids), replace=False)
        self._sizes = [p.numel() for p in params]

    def gather(self, tensors: Sequence[Tensor]) -> np.ndarray:
        """The canaries' coordinates of a list of tensors shaped like the trained parameters."""
        flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
        return flat[torch.as_tensor(self.coordinates)].numpy()

    def add_to_sum(self, summed_grad: Sequence[Tensor], sampled_ids: Sequence[str], clip_norm: float | None) -> None:
        """Add the (clipped) gradients of the sampled canaries to the step's sum, in place."""
        if not sampled_ids:
            return
        if self.coordinates is None:
            self.bind(summed_grad)
        value = torch.tensor([self.magnitude])
        if clip_norm is not None and self.clip:
            value = value * clip_factors(value, clip_norm)  # the engines' clip rule, on the canary's norm M
        offsets = np.cumsum([0] + self._sizes)
        for cid in sampled_ids:
            flat_index = int(self.coordinates[self._index[cid]])
            tensor_index = int(np.searchsorted(offsets, flat_index, side="right") - 1)
            target = summed_grad[tensor_index].view(-1)
            target[flat_index - offsets[tensor_index]] += value.to(target.dtype).to(target.device)[0]
