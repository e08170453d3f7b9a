"""Projection of each step's noisy gradient onto a subspace spanned by gradients of public data.

DP-SGD's noise has the same standard deviation on every trained coordinate, so its norm grows with sqrt(d) while
the clipped signal stays below C. Gradients of a public task similar to the private one, taken at the current
weights, span a few directions where the private gradient is expected to lie (public-data-assisted DP-SGD:
Zhou et al. 2021, "Bypassing the ambient dimension"; Yu et al. 2021, GEP; Amid et al. 2022, PDA-DPMD). Projecting
the noisy averaged gradient onto the span of k public gradients keeps the part of the signal in that span and
only sqrt(k / d) of the noise norm.

Privacy: the projection is applied to the released noisy average (S + z) / B, and the basis depends only on the
public data and on the weights, which are themselves earlier DP outputs. It is post-processing of the DP-SGD
release, so the privacy account is unchanged, whatever the basis is. The public batches are drawn from a public
generator with a seeded generator: they are public data, nothing about them needs to be secret.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

# (rng, batch, shape, channels, num_classes) -> (images (B, C, *shape), labels (B, 1, *shape))
PublicBatches = Callable[[np.random.Generator, int, Sequence[int], int, int], "tuple[np.ndarray, np.ndarray]"]
# (model outputs, labels) -> the per-sample loss (B,)
LossOnBatch = Callable[[nn.Module, Tensor, Tensor], Tensor]


def orthonormal_basis(vectors: Tensor, relative_tolerance: float = 1e-6) -> Tensor:
    """Orthonormal columns spanning the columns of `vectors` (d, k); directions of negligible norm are dropped."""
    q, r = torch.linalg.qr(vectors, mode="reduced")
    diag = r.diagonal().abs()
    keep = diag > relative_tolerance * max(float(diag.max()), 1e-30) if diag.numel() else diag.bool()
    return q[:, keep]


def project_onto_basis(grads: Sequence[Tensor], basis: Tensor) -> list[Tensor]:
    """Q Q^T g for the flat concatenation g of `grads`, reshaped back; Q has orthonormal columns (d, k)."""
    flat = torch.cat([g.reshape(-1) for g in grads]).to(basis.dtype)
    projected = basis @ (basis.T @ flat)
    out, offset = [], 0
    for g in grads:
        out.append(projected[offset:offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()
    return out


@dataclass
class PublicGradientSubspace:
    """The span of `dimension` public gradients at the current weights, each the gradient of the mean loss over
    `batch_size` public samples. They are taken on `shadow`, a copy of the trained network's architecture with
    the same parameters trainable, loaded with the current weights at every step: the trained network itself
    carries the per-sample gradient engine's hooks. Batches of step t come from a generator seeded by
    (seed, t), so a resumed run sees the same public data."""
    shadow: nn.Module
    make_batch: PublicBatches
    loss_on_batch: LossOnBatch
    patch_size: Sequence[int]
    num_channels: int
    num_classes: int
    dimension: int
    batch_size: int
    seed: int
    description: str

    def basis(self, weights: dict[str, Tensor], step: int) -> Tensor:
        """(d, <= dimension) orthonormal basis of the public gradients at `weights` (a state dict of the trained
        network), over the shadow's trainable parameters in their registration order."""
        self.shadow.load_state_dict(weights)
        self.shadow.train()
        params = [p for p in self.shadow.parameters() if p.requires_grad]
        device = params[0].device
        rng = np.random.default_rng([self.seed, step])
        columns = []
        for _ in range(self.dimension):
            images, labels = self.make_batch(rng, self.batch_size, self.patch_size, self.num_channels,
                                             self.num_classes)
            loss = self.loss_on_batch(self.shadow, torch.from_numpy(images).to(device),
                                      torch.from_numpy(labels).long().to(device)).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            columns.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                      for g, p in zip(grads, params)]))
        return orthonormal_basis(torch.stack(columns, dim=1))

    def project(self, grads: Sequence[Tensor], weights: dict[str, Tensor], step: int) -> list[Tensor]:
        """The released noisy gradient (one tensor per trainable parameter, in registration order), projected onto
        this step's public subspace: post-processing."""
        return project_onto_basis(grads, self.basis(weights, step))
