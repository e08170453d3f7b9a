"""The non-private path (--eps inf): the plain gradient of the summed patient losses, no clipping.

It goes through the same trainer code as the private engines (sum into `summed_grad`, divide by the expected
batch size in `dp_step`), so the only difference between a private and a non-private run is clipping and
noise.
"""
from __future__ import annotations

import torch
from torch import nn

from dpunet.privacy.engines.base import AccumulationStats, GradientEngine, PatientBatch, PerSampleLoss, empty_stats


class NonPrivateEngine(GradientEngine):
    name = "nonprivate"

    def __init__(self, model: nn.Module, loss_fn: PerSampleLoss, clip_norm: float | None = None) -> None:
        if clip_norm is not None:
            raise ValueError("the non-private engine does not clip; pass clip_norm=None or use a private engine")
        super().__init__(model, loss_fn, None)

    def accumulate(self, batch: PatientBatch) -> AccumulationStats:
        if batch.num_patients == 0:
            return empty_stats()
        num_patients, k = batch.num_patients, batch.patches_per_patient
        data, targets = batch.flat()
        patient_losses = self.loss_fn(self.model(data), targets).reshape(num_patients, k).mean(1)
        total = patient_losses.sum()
        finite = torch.isfinite(patient_losses.detach())
        num_nonfinite = int((~finite).sum())
        if num_nonfinite and bool(finite.any()):
            # leave those patients out and redo the pass: masking the loss alone would still send 0 * NaN
            # through the backward of the shared layers
            keep = finite.nonzero().flatten()
            sub = PatientBatch(batch.data[keep], [t[keep] for t in batch.targets])
            data, targets = sub.flat()
            total = self.loss_fn(self.model(data), targets).reshape(len(keep), k).mean(1).sum()
        if bool(finite.any()):
            grads = torch.autograd.grad(total, self.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
            if all(bool(torch.isfinite(g).all()) for g in grads):
                for acc, g in zip(self.summed_grad, grads):
                    acc.add_(g.float())
            else:  # a finite loss with a non-finite gradient: per-patient gradients are not available here,
                # so the whole micro-batch is dropped
                num_nonfinite = num_patients
        # per-patient norms are not computed on this path
        norms = torch.full((num_patients,), float("nan"))
        return AccumulationStats(num_patients, float(patient_losses.detach().float().sum()), norms, 0, num_nonfinite)
