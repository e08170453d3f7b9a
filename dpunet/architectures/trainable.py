"""Which parameters DP-SGD updates.

The Gaussian noise DP-SGD adds has the same standard deviation on every trained coordinate, so its norm grows
with the square root of the number of trained parameters while the clipped signal does not. Training a small,
well-chosen subset (biases and normalisation affines, as in DP-BiTFiT, Bu et al. 2022, plus the 1x1 heads) of
a randomly initialised network trades capacity for a much better signal-to-noise ratio. The frozen weights are
a function of the seed only, never of data, so freezing them costs no privacy.
"""
from __future__ import annotations

from torch import nn

from dpunet.architectures.registry import count_parameters

NORM_TYPES = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm)


def _is_bias_norm_or_head(module_name: str, module: nn.Module, param_name: str) -> bool:
    if param_name == "bias" or isinstance(module, NORM_TYPES):
        return True
    if type(module).__name__.endswith("Norm"):  # ScaleNorm and other affine norms of dpunet's blocks
        return True
    return module_name.startswith("decoder.heads.")


TRAINABLE_SUBSETS = {
    "all": lambda module_name, module, param_name: True,
    "bias_norm_head": _is_bias_norm_or_head,
}


def select_trainable(model: nn.Module, subset: str) -> int:
    """Freeze every parameter outside `subset`; returns the number of trained parameters."""
    if subset not in TRAINABLE_SUBSETS:
        raise ValueError(f"unknown trainable subset {subset!r}; choose one of {sorted(TRAINABLE_SUBSETS)}")
    keep = TRAINABLE_SUBSETS[subset]
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            param.requires_grad_(keep(module_name, module, param_name))
    return count_parameters(model)
