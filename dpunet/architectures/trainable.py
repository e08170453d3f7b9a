"""Which parameters DP-SGD updates.

The Gaussian noise DP-SGD adds has the same standard deviation on every trained coordinate, so its norm grows
with the square root of the number of trained parameters while the clipped signal does not. Training a small,
well-chosen subset (biases and normalisation affines, as in DP-BiTFiT, Bu et al. 2022, plus the 1x1 heads) of
a network trades capacity for a much better signal-to-noise ratio. `decoder` keeps more capacity: everything
outside the encoder (`stem`, `encoder`) is trained, and of the encoder only its biases and norms (decoder-only
fine-tuning of a pretrained encoder, common in segmentation transfer learning). The frozen weights are the
public start (pretrained on public data, or seeded), never a function of private data, so freezing them costs
no privacy.
"""
from __future__ import annotations

from torch import nn

from dpunet.architectures.registry import count_parameters
from dpunet.utils.errors import DpunetError

NORM_TYPES = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm)
# MONAI classes whose deep-supervision heads are trained alongside the final conv (module names under MonaiNet)
MONAI_EXTRA_HEADS = {"DynUNet": ("net.output_block", "net.deep_supervision_heads")}


def _output_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return None


def head_module_names(model: nn.Module) -> set[str]:
    """Names of the modules that map features to class logits (the "head" of `--trainable bias_norm_head`).

    dpunet's U-Nets: their 1x1 heads (`decoder.heads.*`, one per deep-supervision level). Any other network
    with a `num_classes` attribute (the classic families' `classifier`, a MONAI network's final conv): the last
    registered convolution or linear layer with `num_classes` outputs, since every one of these networks
    builds its output layer last; DynUNet's deep-supervision heads are added by name (they are built after
    its output block)."""
    names = {n for n, _ in model.named_modules() if n.startswith("decoder.heads.")}
    if names:
        return names
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        return names
    final = [n for n, m in model.named_modules() if _output_channels(m) == int(num_classes)]
    names.update(final[-1:])
    extra = MONAI_EXTRA_HEADS.get(type(getattr(model, "net", None)).__name__, ())
    names.update(n for n, _ in model.named_modules() if any(n == p or n.startswith(p + ".") for p in extra))
    return names


def _is_bias_norm_or_head(module_name: str, module: nn.Module, param_name: str, heads: set[str]) -> bool:
    if param_name == "bias" or isinstance(module, NORM_TYPES):
        return True
    if type(module).__name__.endswith("Norm"):  # ScaleNorm and other affine norms of dpunet's blocks
        return True
    return module_name in heads


# top-level submodules that make up the encoder (the residual U-Nets run a stem before their `encoder`)
ENCODER_MODULES = ("stem", "encoder")


def _is_decoder_bias_or_norm(module_name: str, module: nn.Module, param_name: str, heads: set[str]) -> bool:
    # the encoder keeps the public pretrained features; its biases and norm affines stay free to re-centre them
    in_encoder = any(module_name == m or module_name.startswith(m + ".") for m in ENCODER_MODULES)
    return not in_encoder or _is_bias_norm_or_head(module_name, module, param_name, heads)


TRAINABLE_SUBSETS = {
    "all": lambda module_name, module, param_name, heads: True,
    "bias_norm_head": _is_bias_norm_or_head,
    "decoder": _is_decoder_bias_or_norm,
    # the 1x1 heads alone: a linear probe of the (public) features, e.g. the first phase of --probe-steps
    "head": lambda module_name, module, param_name, heads: module_name in heads,
}
# subsets defined by a named submodule, which only some networks have
SUBSETS_NEEDING_MODULE = {"decoder": "encoder"}


def select_trainable(model: nn.Module, subset: str) -> int:
    """Freeze every parameter outside `subset`; returns the number of trained parameters."""
    if subset not in TRAINABLE_SUBSETS:
        raise ValueError(f"unknown trainable subset {subset!r}; choose one of {sorted(TRAINABLE_SUBSETS)}")
    needed = SUBSETS_NEEDING_MODULE.get(subset)
    if needed is not None and needed not in dict(model.named_modules()):
        raise DpunetError(f"--trainable {subset} needs a network with an {needed!r} submodule (dpunet's U-Net "
                          f"presets and the classic families have one); {type(model).__name__} has none: use 'all' "
                          f"or 'bias_norm_head'")
    keep = TRAINABLE_SUBSETS[subset]
    heads = head_module_names(model)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            param.requires_grad_(keep(module_name, module, param_name, heads))
    return count_parameters(model)
