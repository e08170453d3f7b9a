"""The per-example reference: each patient alone through the model. Slow, obviously correct: the oracle."""
from __future__ import annotations

import torch

from dpunet.privacy.engines.base import AccumulationStats, GradientEngine, PatientBatch, finalize_per_patient


class ReferenceLoopEngine(GradientEngine):
    name = "reference_loop"

    def accumulate(self, batch: PatientBatch) -> AccumulationStats:
        norms, losses = [], []
        for i in range(batch.num_patients):
            data, targets = batch.patient(i)
            loss = self.loss_fn(self.model(data), targets).mean()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            factor, _, _, _ = finalize_per_patient(norm.reshape(1), self.clip_norm)
            for acc, g in zip(self.summed_grad, grads):
                acc.add_(torch.nan_to_num(g.float()) * factor[0])
            norms.append(norm.detach())
            losses.append(float(loss.detach()))
        norms_t = torch.stack(norms).cpu() if norms else torch.zeros(0)
        _, _, num_clipped, num_nonfinite = finalize_per_patient(norms_t, self.clip_norm)
        return AccumulationStats(len(losses), float(sum(losses)), norms_t, num_clipped, num_nonfinite)
