"""Build a network from its plan entry ({"class_name": ..., "kwargs": {...}}) and check it for DP-SGD."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpunet.architectures.unet import PlainConvUNet, ResidualEncoderUNet, UNetBase
from dpunet.utils.errors import DpunetError

# MonaiNet (dpunet.architectures.monai_nets) adds itself here when the package is imported
NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    "PlainConvUNet": PlainConvUNet,
    "ResidualEncoderUNet": ResidualEncoderUNet,
}


def build_network(arch: dict[str, Any], in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """The network a plan's "architecture" entry describes, freshly initialised.

    With deep supervision the forward returns a list of logits, highest resolution first (n_stages - 1 of
    them); otherwise one tensor of logits at the input's resolution."""
    if not isinstance(arch, dict) or "class_name" not in arch:
        raise DpunetError(f"architecture spec must be a dict with 'class_name' and 'kwargs', got {arch!r}")
    name = arch["class_name"]
    if name not in NETWORK_CLASSES:
        raise DpunetError(f"unknown architecture class_name {name!r}; known: {', '.join(NETWORK_CLASSES)}")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise DpunetError(f"architecture kwargs must be a dict, got {type(kwargs).__name__}")
    return NETWORK_CLASSES[name](int(in_channels), int(num_classes), bool(deep_supervision), **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (those DP-SGD clips and noises)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# engines that differentiate modules without an Opacus per-layer rule through Opacus' functorch fallback, which
# refuses any module that owns both parameters and buffers
OPACUS_ENGINES = ("opacus_hooks",)


def is_constant_index_buffer(buffer: torch.Tensor) -> bool:
    """An integer or boolean buffer: a lookup index or mask fixed at construction (SwinUNETR's relative
    position index), not a statistic of the data (those are floating point, like BatchNorm's running mean)."""
    return not (buffer.is_floating_point() or buffer.is_complex())


def validate_for_dp(model: nn.Module, engine: str | None = None) -> list[str]:
    """Problems that make a model unfit for per-sample-gradient DP training; empty when it is fit.

    Runs Opacus' ModuleValidator (in training mode, whatever mode the model is in) and adds checks it does not
    make on its own: any BatchNorm (it mixes samples), running statistics (a data-dependent state updated
    outside DP-SGD), in-place activations (they break Opacus' backward hooks), and floating-point buffers in
    modules with their own parameters and no Opacus rule (a state that may depend on data).

    Constant index buffers (integer or boolean, e.g. SwinUNETR's relative position index) in such modules are
    fine for the functorch and fast engines (they differentiate the parameters only and read buffers as
    constants); with `engine` "opacus_hooks" they are a problem too, because Opacus' functorch fallback refuses
    any module that owns buffers ("auto" skips that engine when it fails)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    problems: list[str] = []
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        problems += [f"opacus: {e}" for e in ModuleValidator.validate(model, strict=False)]
    finally:
        for m, training in modes.items():
            m.training = training

    for name, m in model.named_modules():
        where = name or type(model).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{where}: {type(m).__name__} mixes the samples of a batch; use GroupNorm or "
                            "InstanceNorm")
        if getattr(m, "track_running_stats", False) or getattr(m, "running_mean", None) is not None:
            problems.append(f"{where}: {type(m).__name__} keeps running statistics of private data")
        if getattr(m, "inplace", False):
            problems.append(f"{where}: {type(m).__name__} is in-place; per-sample gradient hooks need "
                            "inplace=False")
        has_own_params = any(p.requires_grad for p in m.parameters(recurse=False))
        if not has_own_params or type(m) in GradSampleModule.GRAD_SAMPLERS:
            continue
        buffers = dict(m.named_buffers(recurse=False))
        states = [b for b, t in buffers.items() if not is_constant_index_buffer(t)]
        if states:
            problems.append(f"{where}: {type(m).__name__} has buffers ({', '.join(states)}), which Opacus' "
                            "functorch fallback refuses")
        elif buffers and engine in OPACUS_ENGINES:
            problems.append(f"{where}: {type(m).__name__} has constant index buffers ({', '.join(buffers)}), "
                            f"which Opacus' functorch fallback (--engine {engine}) refuses; use --engine fast or "
                            "functorch")
    return problems
