"""One mechanism that makes any nn.Module fit for per-sample-gradient DP-SGD, or says why it cannot.

`make_dp_compatible(model)` rewrites, in place:
- every BatchNorm -> GroupNorm (groups: the largest divisor of the channels <= `num_groups`) or, by option,
  InstanceNorm (affine, no running statistics): BatchNorm mixes the samples of a batch and keeps running
  statistics of private data;
- InstanceNorm with running statistics -> the same InstanceNorm without them (a data-dependent state updated
  outside DP-SGD);
- in-place activations -> `inplace=False` (they overwrite tensors that per-sample gradient hooks captured);
- dropout with p == 0 -> Identity (it computes nothing, and random ops need care under vmap);
then lets Opacus' `ModuleValidator.fix` repair what it knows beyond that, and checks the result with
`validate_for_dp`. Whatever is still unfit raises a DpunetError naming the module.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from dpunet.architectures.registry import validate_for_dp
from dpunet.utils.errors import DpunetError

DP_NORMS = ("group", "instance")


def largest_divisor_at_most(channels: int, limit: int) -> int:
    """The largest divisor of `channels` that is <= `limit` (at least 1)."""
    for g in range(min(int(limit), int(channels)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _instance_norm(dim: int, channels: int, eps: float) -> nn.Module:
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
    return cls(channels, eps=eps, affine=True, track_running_stats=False)


def _batchnorm_dim(m: nn.Module) -> int:
    for dim, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(m, cls):
            return dim
    return 0  # SyncBatchNorm and other _BatchNorm subclasses: the input's dimension is not known


def _per_sample_norm(m: nn.modules.batchnorm._BatchNorm, norm: str, num_groups: int) -> nn.Module:
    """The per-sample replacement of one BatchNorm (its affine parameters start as BatchNorm's do: 1 and 0)."""
    channels = int(m.num_features)
    if norm == "instance":
        dim = _batchnorm_dim(m)
        if dim == 0:
            raise DpunetError(f"{type(m).__name__}: cannot tell its spatial dimension for InstanceNorm; "
                              "use the group norm option")
        return _instance_norm(dim, channels, m.eps)
    return nn.GroupNorm(largest_divisor_at_most(channels, num_groups), channels, eps=m.eps, affine=True)


def _replacement(m: nn.Module, norm: str, num_groups: int) -> nn.Module | None:
    """The module that replaces `m`, or None to keep it."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _per_sample_norm(m, norm, num_groups)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
        dim = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(type(m), 0)
        if dim:
            return _instance_norm(dim, int(m.num_features), m.eps)
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0:
        return nn.Identity()
    return None


def _replace_modules(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every child for which `make` returns a module (recursively); returns how many were replaced."""
    count = 0
    for name, child in list(model.named_children()):
        new = make(child)
        if new is not None:
            setattr(model, name, new)
            count += 1
        else:
            count += _replace_modules(child, make)
    return count


def make_dp_compatible(model: nn.Module, norm: str = "group", num_groups: int = 8) -> nn.Module:
    """`model`, rewritten in place to be fit for per-sample gradients (see the module docstring), and
    returned; raises DpunetError listing what could not be made per-sample."""
    from opacus.validators import ModuleValidator

    if norm not in DP_NORMS:
        raise DpunetError(f"unknown DP norm {norm!r}; known: {', '.join(DP_NORMS)}")
    if num_groups < 1:
        raise DpunetError(f"num_groups must be at least 1, got {num_groups}")
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise DpunetError("the model itself is a BatchNorm: nothing to segment with")
    _replace_modules(model, lambda m: _replacement(m, norm, num_groups))
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    # Opacus knows a few more fixes (e.g. LSTM -> DPLSTM); it returns a new model only when it changed one
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    problems = validate_for_dp(model)
    if problems:
        raise DpunetError("cannot make the network per-sample for DP-SGD:\n  " + "\n  ".join(problems))
    return model
