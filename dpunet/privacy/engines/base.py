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
    grad_norms: Tensor  # (B,) per-patient gradient norms before clipping (fp32, cpu); NaN where an engine
    # does not compute them (the non-private engine)
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


def empty_stats() -> AccumulationStats:
    """Stats of a micro-batch without patients (Poisson sampling may draw none)."""
    return AccumulationStats(0, 0.0, torch.zeros(0), 0, 0)


def per_patient_norms(per_patient_grads: Sequence[Tensor]) -> Tensor:
    """Flat L2 norm over all parameters of each patient's gradient, in fp32: tensors are (B, *param.shape)."""
    squares = [g.float().flatten(1).pow(2).sum(1) for g in per_patient_grads]
    return torch.stack(squares, 0).sum(0).sqrt()


def add_weighted_sum(summed_grad: Sequence[Tensor], per_patient_grads: Sequence[Tensor], factors: Tensor) -> None:
    """summed_grad += sum_i factors[i] * g_i, in fp32. Non-finite entries are zeroed first, so a factor of 0
    really removes a patient whose gradient holds NaN/Inf (NaN * 0 would still be NaN)."""
    for acc, g in zip(summed_grad, per_patient_grads):
        g32 = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
        acc.add_(torch.tensordot(factors.to(device=g32.device, dtype=torch.float32), g32, dims=1))


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
