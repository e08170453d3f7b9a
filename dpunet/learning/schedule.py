"""Optimisers and learning-rate schedules, chosen by name from the plan or the command line."""
from __future__ import annotations

import math

import torch

from dpunet.utils.errors import DpunetError

OPTIMIZERS = ("sgd", "adam", "adamw", "nadam")
SCHEDULES = ("constant", "cosine", "poly")


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=weight_decay)
    raise DpunetError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warm-up, then the schedule."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "poly":
        return (1 - min(1.0, progress)) ** 0.9
    raise DpunetError(f"unknown lr schedule '{schedule}' (known: {', '.join(SCHEDULES)})")
