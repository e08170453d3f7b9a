"""The per-patient gradient interface every trainer talks to.

A physical micro-batch holds B patients with K patches each. An engine computes, for every patient i, the
gradient g_i of that patient's loss (the mean of the per-patch losses of its K patches), clips it to norm C
(flat over all trainable parameters, norms in fp32), and adds sum_i clip(g_i) into fp32 accumulators. Noise is
not the engine's business: it is added once per logical step by `dpunet.privacy.dp_step`.

With `clip_norm=None` (non-private training) an engine adds the plain sum of patient gradients instead.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn

# outputs of the network for N = B*K patches (a tensor, or a list of deep-supervision tensors, highest
# resolution first) and the matching targets -> per-patch losses of shape (N,)
PerSampleLoss = Callable[[Union[Tensor, Sequence[Tensor]], Sequence[Tensor]], Tensor]


@dataclass
class PatientBatch:
    data: Tensor  # (B, K, C, *spatial)
    targets: list[Tensor]  # one per deep-supervision level, each (B, K, 1, *spatial_level)

    @property
    def num_patients(self) -> int:
        return int(self.data.shape[0])

    @property
    def patches_per_patient(self) -> int:
        return int(self.data.shape[1])

    def flat(self) -> tuple[Tensor, list[Tensor]]:
        """Patches of all patients as one (B*K, ...) batch, patient-major."""
        return self.data.flatten(0, 1), [t.flatten(0, 1) for t in self.targets]

    def patient(self, i: int) -> tuple[Tensor, list[Tensor]]:
        return self.data[i], [t[i] for t in self.targets]


@dataclass
class AccumulationStats:
    num_patients: int
    loss_sum: float  # sum over patients of each patient's mean patch loss
    grad_norms: Tensor  # (B,) per-patient gradient norms before clipping (fp32, cpu)
    num_clipped: int  # patients whose norm exceeded C
    num_nonfinite: int  # patients whose gradient held NaN/Inf: zeroed, not added


class GradientEngine(ABC):
    """Accumulates sum_i clip_C(g_i) over the patients of successive micro-batches."""

    name: str = "base"

    def __init__(self, model: nn.Module, loss_fn: PerSampleLoss, clip_norm: float | None) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip norm must be positive, got {clip_norm}")
        self.model = model
        self.loss_fn = loss_fn
        self.clip_norm = clip_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.summed_grad = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @property
    def private(self) -> bool:
        return self.clip_norm is not None

    def zero(self) -> None:
        for g in self.summed_grad:
            g.zero_()

    @abstractmethod
    def accumulate(self, batch: PatientBatch) -> AccumulationStats:
        """Add this micro-batch's (clipped) per-patient gradients to `summed_grad`."""

    def close(self) -> None:
        """Remove hooks or other state the engine attached to the model."""


def clip_factors(norms: Tensor, clip_norm: float) -> Tensor:
    """min(1, C / ||g||): the clipped norm is strictly below C (Opacus uses the same 1e-6 guard)."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


def finalize_per_patient(norms: Tensor, clip_norm: float | None) -> tuple[Tensor, Tensor, int, int]:
    """Scale factors per patient (clipping, and 0 for a non-finite gradient) and counts for the log."""
    finite = torch.isfinite(norms)
    if clip_norm is None:
        factors = torch.ones_like(norms)
        num_clipped = 0
    else:
        factors = clip_factors(torch.where(finite, norms, torch.zeros_like(norms)), clip_norm)
        num_clipped = int(((norms > clip_norm) & finite).sum())
    factors = torch.where(finite, factors, torch.zeros_like(factors))
    return factors, finite, num_clipped, int((~finite).sum())
