"""The noisy step: (sum + N(0, sigma^2 C^2)) / (qN), noise drawn once per step."""
from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn

from dpunet.privacy.dp_step import (
    assign_gradients,
    noise_norm_on_mean_gradient,
    noise_std_on_mean_gradient,
    noisy_average_gradient,
)
from dpunet.utils.errors import DpunetError


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_noise_has_the_right_std_and_mean():
    sigma, clip, expected_batch = 1.3, 0.7, 10.25
    summed = [torch.full((200, 100), 3.0), torch.full((50,), -2.0)]
    out = noisy_average_gradient(summed, sigma, clip, expected_batch, _gen(0))
    assert [o.shape for o in out] == [s.shape for s in summed]
    assert all(o.dtype == torch.float32 for o in out)
    noise = torch.cat([(o * expected_batch - s).flatten() for o, s in zip(out, summed)]).double()
    target_std = sigma * clip
    n = noise.numel()
    assert float(noise.mean()) == pytest.approx(0.0, abs=5 * target_std / n**0.5)
    # sample std within ~5 standard errors (se of std ~ std / sqrt(2n))
    assert float(noise.std()) == pytest.approx(target_std, rel=5 / (2 * n) ** 0.5)
    # and it is Gaussian
    assert stats.kstest(noise.numpy() / target_std, "norm").pvalue > 1e-3


def test_empty_step_is_pure_noise():
    # Poisson sampling drew no patient: the step still releases N(0, sigma^2 C^2) / (qN), never zeros
    sigma, clip, expected_batch = 2.0, 1.0, 4.0
    zeros = [torch.zeros(10_000)]
    out = noisy_average_gradient(zeros, sigma, clip, expected_batch, _gen(1))[0]
    assert float(out.abs().max()) > 0
    assert float((out * expected_batch).std()) == pytest.approx(sigma * clip, rel=0.05)


def test_noise_is_fresh_per_call_and_reproducible_per_seed():
    summed = [torch.zeros(1000)]
    a = noisy_average_gradient(summed, 1.0, 1.0, 1.0, _gen(5))[0]
    b = noisy_average_gradient(summed, 1.0, 1.0, 1.0, _gen(5))[0]
    assert torch.equal(a, b)
    g = _gen(5)
    first = noisy_average_gradient(summed, 1.0, 1.0, 1.0, g)[0]
    second = noisy_average_gradient(summed, 1.0, 1.0, 1.0, g)[0]
    assert not torch.equal(first, second)
    # parameter tensors get independent noise (not one draw broadcast to all)
    two = noisy_average_gradient([torch.zeros(500), torch.zeros(500)], 1.0, 1.0, 1.0, _gen(6))
    assert abs(float(torch.corrcoef(torch.stack(two))[0, 1])) < 0.2


def test_summed_gradient_is_not_modified():
    summed = [torch.ones(20)]
    noisy_average_gradient(summed, 1.0, 1.0, 2.0, _gen(0))
    assert torch.equal(summed[0], torch.ones(20))


def test_non_private_is_plain_average():
    summed = [torch.arange(6.0).reshape(2, 3), torch.tensor([4.0])]
    out = noisy_average_gradient(summed, 0.0, None, 2.0)
    assert torch.equal(out[0], summed[0] / 2) and torch.equal(out[1], torch.tensor([2.0]))
    # clipping without noise (sigma 0) also divides by the expected batch and adds nothing
    out = noisy_average_gradient(summed, 0.0, 1.0, 4.0, _gen(0))
    assert torch.equal(out[0], summed[0] / 4)


def test_half_precision_sum_is_noised_in_fp32():
    out = noisy_average_gradient([torch.zeros(4000, dtype=torch.bfloat16)], 1.0, 1e-3, 1.0, _gen(0))[0]
    assert out.dtype == torch.float32
    assert float(out.std()) == pytest.approx(1e-3, rel=0.1)  # bf16 noise would be visibly quantised


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=0.0),
        dict(noise_multiplier=-1.0, clip_norm=1.0, expected_batch_size=1.0),
        dict(noise_multiplier=1.0, clip_norm=None, expected_batch_size=1.0),
        dict(noise_multiplier=1.0, clip_norm=0.0, expected_batch_size=1.0),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(DpunetError):
        noisy_average_gradient([torch.zeros(3)], **kwargs)


def test_assign_gradients_sets_grad_in_param_dtype():
    model = nn.Linear(3, 2).double()
    params = list(model.parameters())
    grads = [torch.ones_like(p, dtype=torch.float32) * 0.5 for p in params]
    assign_gradients(params, grads)
    for p in params:
        assert p.grad.dtype == torch.float64 and torch.all(p.grad == 0.5)
    grads[0].add_(1.0)  # p.grad is a copy, not a view of the caller's tensor
    assert torch.all(params[0].grad == 0.5)
    with pytest.raises(ValueError):
        assign_gradients(params, grads[:1])
    with pytest.raises(ValueError):
        assign_gradients(params, [torch.zeros(5), torch.zeros(2)])


def test_noise_std_on_mean_gradient_matches_design_brief():
    # N=41, q=0.25: sigma 2.676 (eps 8, RDP) -> 0.26 C on the mean gradient
    assert noise_std_on_mean_gradient(2.676, 0.25 * 41) == pytest.approx(0.26, abs=0.005)


def test_noise_norm_on_mean_gradient_is_the_norm_of_the_drawn_noise():
    """sigma sqrt(d) / (qN) predicts the norm of the noise the step really adds (d = 40,000 trained params)."""
    sigma, expected, shapes = 3.0, 50.0, [(100, 200), (20000,)]
    zero_sums = [torch.zeros(s) for s in shapes]
    generator = torch.Generator().manual_seed(0)
    noisy = noisy_average_gradient(zero_sums, sigma, 1.0, expected, generator)
    drawn = float(torch.cat([g.flatten() for g in noisy]).norm())
    predicted = noise_norm_on_mean_gradient(sigma, expected, 40000)
    assert predicted == pytest.approx(3.0 * 200 / 50)
    assert drawn == pytest.approx(predicted, rel=0.02)
    assert noise_norm_on_mean_gradient(sigma, expected, 0) == 0.0
