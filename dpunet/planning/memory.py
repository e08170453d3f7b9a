"""A static memory model of one DP training micro-batch.

Unlike nnU-Net's, it counts what DP-SGD adds: one instantiated gradient per patient in the micro-batch (the
fast engine and Opacus functorch both hold them), on top of activations, weights, gradients and optimiser
state. It is deliberately simple and conservative; the trainer logs the real peak so the model can be checked.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# tensors kept for backward per conv layer: conv output, norm output, non-linearity output
_TENSORS_PER_CONV = 3
# the trainer's estimate of a built network leaves out backward transients and fragmentation: real CPU steps
# peaked at up to 1.8x it (functorch engine; monai_unet 1.55x, most networks 0.8-1.1x;
# tests/test_memory_estimate.py), so the trainer sizes its micro-batch for the budget divided by this factor
# (plan entry memory_model.safety_factor). Not yet checked on a GPU.
SAFETY_FACTOR = 2.0


def count_unet_parameters(in_channels: int, num_classes: int, features: Sequence[int],
                          kernel_sizes: Sequence[Sequence[int]], n_convs: int = 2) -> int:
    params, prev = 0, in_channels
    for f, k in zip(features, kernel_sizes):
        kv = int(np.prod(k))
        params += (prev * f * kv + f) + (n_convs - 1) * (f * f * kv + f) + 2 * f * n_convs
        prev = f
    for i in range(len(features) - 1, 0, -1):
        hi, lo = features[i], features[i - 1]
        kv = int(np.prod(kernel_sizes[i - 1]))
        params += hi * lo * 8 + lo  # transposed conv (stride ~2 per axis)
        params += (2 * lo * lo * kv + lo) + (n_convs - 1) * (lo * lo * kv + lo) + 2 * lo * n_convs
        params += lo * num_classes + num_classes  # deep-supervision head
    return int(params)


def activation_bytes_per_patch(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                               features: Sequence[int], n_convs: int = 2, bytes_per_value: int = 4) -> int:
    voxels = float(np.prod(patch_size))
    total = 0.0
    for stage, (stride, f) in enumerate(zip(strides, features)):
        voxels /= float(np.prod(stride))
        encoder = n_convs * _TENSORS_PER_CONV * f * voxels
        decoder = 0.0 if stage == len(features) - 1 else (2 * f + n_convs * _TENSORS_PER_CONV * f) * voxels
        total += encoder + decoder
    return int(total * bytes_per_value)


def training_bytes(num_params: int, patients: int, activation_bytes: float,
                   trained_params: int | None = None, bytes_per_value: int = 4) -> int:
    """The accounting of one micro-batch, for any network: weights (all parameters), then for the trained
    ones the summed gradient, two optimiser moments and one instantiated gradient per patient, plus the
    activations the micro-batch's patches keep for backward (`activation_bytes`, already summed)."""
    trained = num_params if trained_params is None else trained_params
    fixed = bytes_per_value * (num_params + 3 * trained)  # weights, summed gradient, two optimiser moments
    per_patient_grads = bytes_per_value * trained * patients
    return int(fixed + per_patient_grads + activation_bytes)


def largest_fitting(bytes_for: Callable[[int], float], budget_bytes: float, cap: int | None = None) -> int:
    """The largest n >= 0 with bytes_for(n) <= budget (bytes_for must grow with n); at most `cap`."""
    n = 0
    while (cap is None or n < cap) and bytes_for(n + 1) <= budget_bytes:
        n += 1
    return n


def micro_batch_bytes(patches: int, patients: int, patch_size, strides, features, num_params: int,
                      n_convs: int = 2, bytes_per_value: int = 4) -> int:
    """Estimated peak bytes for `patches` patches from `patients` patients in one micro-batch."""
    acts = patches * activation_bytes_per_patch(patch_size, strides, features, n_convs, bytes_per_value)
    return training_bytes(num_params, patients, acts)


def patients_per_micro_batch(budget_bytes: float, patches_per_patient: int, patch_size, strides, features,
                             num_params: int, n_convs: int = 2, cap: int | None = None) -> int:
    """How many patients (each with all K patches) fit the budget; 0 when not even one does."""
    return largest_fitting(lambda n: micro_batch_bytes(n * patches_per_patient, n, patch_size, strides, features,
                                                       num_params, n_convs), budget_bytes, cap)
