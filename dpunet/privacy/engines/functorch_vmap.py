"""Per-patient gradients with torch.func: vmap over patients of grad(patient's mean patch loss).

Each vmapped call runs the network on one patient's K patches (the inner batch), so the per-patient gradient
is exactly the gradient of that patient's mean loss: no per-patch gradients are ever materialised. Memory is
one gradient copy per patient of a chunk; `patients_per_chunk` bounds it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dpunet.privacy.engines.base import (
    AccumulationStats,
    GradientEngine,
    PatientBatch,
    PerSampleLoss,
    add_weighted_sum,
    empty_stats,
    finalize_per_patient,
    per_patient_norms,
)


class FunctorchEngine(GradientEngine):
    name = "functorch"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: PerSampleLoss,
        clip_norm: float | None,
        patients_per_chunk: int | None = None,
        randomness: str = "different",
    ) -> None:
        super().__init__(model, loss_fn, clip_norm)
        if patients_per_chunk is not None and patients_per_chunk < 1:
            raise ValueError(f"patients_per_chunk must be >= 1, got {patients_per_chunk}")
        self.patients_per_chunk = patients_per_chunk
        # "different": dropout-like randomness is drawn independently per patient, as in a plain batch
        self.randomness = randomness
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]

    def _patient_loss_fn(self):
        model, loss_fn = self.model, self.loss_fn

        def patient_loss(
            params: dict[str, Tensor], constants: dict[str, Tensor], data: Tensor, targets: Sequence[Tensor]
        ):
            # inside vmap: data (K, C, *spatial), targets [(K, 1, *spatial_l)]: one patient's K patches
            outputs = functional_call(model, (params, constants), (data,))
            loss = loss_fn(outputs, list(targets)).mean()
            return loss, loss.detach()

        return patient_loss

    def accumulate(self, batch: PatientBatch) -> AccumulationStats:
        if batch.num_patients == 0:
            return empty_stats()
        params = {n: p.detach() for n, p in zip(self.param_names, self.params)}
        trainable = set(self.param_names)
        # frozen parameters and buffers enter as constants (no gradient, same for every patient)
        constants = {n: p.detach() for n, p in self.model.named_parameters() if n not in trainable}
        constants.update({n: b for n, b in self.model.named_buffers()})
        per_patient = vmap(
            grad(self._patient_loss_fn(), has_aux=True),
            in_dims=(None, None, 0, 0),
            randomness=self.randomness,
        )

        chunk = self.patients_per_chunk or batch.num_patients
        all_norms, all_losses = [], []
        for start in range(0, batch.num_patients, chunk):
            stop = min(start + chunk, batch.num_patients)
            targets = [t[start:stop] for t in batch.targets]
            grads, losses = per_patient(params, constants, batch.data[start:stop], targets)
            per_patient_grads = [grads[n] for n in self.param_names]
            norms = per_patient_norms(per_patient_grads)
            factors, _, _, _ = finalize_per_patient(norms, self.clip_norm)
            add_weighted_sum(self.summed_grad, per_patient_grads, factors)
            all_norms.append(norms.detach().cpu())
            all_losses.append(losses.detach().float().cpu())
            del grads, per_patient_grads
        norms_t = torch.cat(all_norms)
        _, _, num_clipped, num_nonfinite = finalize_per_patient(norms_t, self.clip_norm)
        loss_sum = float(torch.cat(all_losses).sum())
        return AccumulationStats(batch.num_patients, loss_sum, norms_t, num_clipped, num_nonfinite)
