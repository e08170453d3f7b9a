"""--public-subspace: the noisy gradient projected onto the span of public gradients.

Oracle: a least-squares projection in float64 onto the raw (not orthonormalised) public gradients. The trainer's
use (a projected run's update is exactly the projection of the same DP release) is tested in tests/test_training.py."""
from __future__ import annotations

import torch

from dpunet.privacy.public_subspace import orthonormal_basis, project_onto_basis


def _lstsq_projection(vectors: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    coef = torch.linalg.lstsq(vectors.double(), g.double().unsqueeze(1)).solution
    return (vectors.double() @ coef).squeeze(1)


def test_projection_equals_least_squares_onto_the_public_vectors():
    torch.manual_seed(0)
    vectors = torch.randn(300, 5)
    vectors = torch.cat([vectors, vectors[:, :1] * 2 + vectors[:, 1:2]], dim=1)  # one dependent column
    basis = orthonormal_basis(vectors)
    assert basis.shape == (300, 5)
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    grads = [torch.randn(10, 20), torch.randn(100)]
    projected = project_onto_basis(grads, basis)
    flat = torch.cat([g.reshape(-1) for g in grads])
    # the oracle spans the same space with the independent columns only: the dependent one, rounded to float32,
    # is not exactly dependent in float64
    oracle = _lstsq_projection(vectors[:, :5], flat)
    assert [p.shape for p in projected] == [g.shape for g in grads]
    got = torch.cat([p.reshape(-1) for p in projected]).double()
    assert torch.allclose(got, oracle, rtol=1e-4, atol=1e-5)
    assert got.norm() <= flat.norm()
    # a vector in the span is kept, one orthogonal to it is removed
    inside = vectors[:, 2].clone()
    assert torch.allclose(project_onto_basis([inside], basis)[0], inside, atol=1e-4)
    outside = flat - _lstsq_projection(vectors[:, :5], flat).float()
    assert project_onto_basis([outside], basis)[0].norm() < 1e-4 * outside.norm()
