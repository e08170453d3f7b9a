"""The noisy step: (sum of clipped per-patient gradients + N(0, sigma^2 C^2)) / (q N).

Noise is drawn exactly once per logical step (after all micro-batches of the step were accumulated), per
parameter tensor, in fp32 on the parameter's device, with the hardened sampler of `dpunet.privacy.randomness`
from a generator the caller seeds secretly (the trainer: from the session key and the step). The divisor is
the *expected* batch size q*N, never the realised number of patients: the latter depends on who was sampled and
would itself leak membership.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from dpunet.privacy.randomness import PrivateRandomness, hardened_normal
from dpunet.utils.errors import DpunetError




def noisy_average_gradient(
    summed_grad: Sequence[Tensor],
    noise_multiplier: float,
    clip_norm: float | None,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The DP-SGD gradient estimate of one logical step, as new fp32 tensors.

    Private (`clip_norm` set): (sum + N(0, (noise_multiplier * clip_norm)^2)) / expected_batch_size, also
    when no patient was sampled (then it is pure noise, as the analysis requires). Non-private
    (`clip_norm` None, `noise_multiplier` must be 0): sum / expected_batch_size.
    """
    if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
        raise DpunetError(f"expected batch size q*N must be positive, got {expected_batch_size}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise DpunetError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    if clip_norm is None:
        if noise_multiplier != 0:
            raise DpunetError("noise without a clipping norm has no privacy meaning: set clip_norm or sigma=0")
        std = 0.0
    else:
        if not clip_norm > 0:
            raise DpunetError(f"clip norm must be positive, got {clip_norm}")
        std = float(noise_multiplier) * float(clip_norm)
    if std > 0 and generator is None and summed_grad:
        # never torch's global generator, which a public seed may have set: a fresh one from OS entropy
        generator = PrivateRandomness.secure().torch_generator("noise", 0, summed_grad[0].device)
    out = []
    for g in summed_grad:
        g32 = g.detach().to(torch.float32, copy=True)  # a new tensor: the engine's sums stay untouched
        if std > 0:
            g32.add_(hardened_normal(g32.shape, std, generator, device=g32.device))
        out.append(g32.div_(float(expected_batch_size)))
    return out


def assign_gradients(params: Iterable[nn.Parameter], grads: Sequence[Tensor]) -> None:
    """Set p.grad = grad (cast to the parameter's dtype) for the optimiser step."""
    params = list(params)
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} parameters but {len(grads)} gradients")
    for p, g in zip(params, grads):
        if g.shape != p.shape:
            raise ValueError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        p.grad = g.detach().to(device=p.device, dtype=p.dtype).clone()


def noise_std_on_mean_gradient(noise_multiplier: float, expected_batch_size: float) -> float:
    """Standard deviation of the noise per coordinate of the averaged gradient, in units of C: sigma / (qN).
    The planner compares it with the signal (at most C per patient) to judge whether training can work."""
    if not expected_batch_size > 0:
        raise DpunetError(f"expected batch size q*N must be positive, got {expected_batch_size}")
    return float(noise_multiplier) / float(expected_batch_size)


def noise_norm_on_mean_gradient(noise_multiplier: float, expected_batch_size: float, trained_parameters: int) -> float:
    """Expected norm of the noise on the averaged gradient, in units of C: sigma * sqrt(d) / (qN) for d trained
    parameters. The clipped signal is at most C: large-scale DP-SGD successes run near 1 (De et al. 2022 on
    CIFAR-10: about 1.2); on the real hippocampus data, training from a random initialisation made no progress above
    about 2, while fine-tuning pretrained weights learned at 12-31 (documentation/results.md)."""
    return noise_std_on_mean_gradient(noise_multiplier, expected_batch_size) * math.sqrt(max(0, int(trained_parameters)))
