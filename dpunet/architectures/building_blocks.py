"""Layers the U-Nets are made of, every one of them safe for per-sample gradients.

Rules every block here keeps (see documentation/architectures.md):
- normalisation is per sample (GroupNorm, or InstanceNorm without running statistics); never BatchNorm,
  which mixes the samples of a batch and so breaks both the DP guarantee and per-sample gradients;
- activations are never in-place (Opacus' backward hooks and torch.func need the pre-activation tensors);
- no module holds buffers (Opacus' functorch fallback refuses modules with buffers);
- a module that owns parameters and is not a plain torch layer (the weight-standardised conv) is a leaf, so
  Opacus' GradSampleModule computes its per-sample gradients with its functorch fallback.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dpunet.utils.errors import DpunetError

CONV_TYPES: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONV_TYPES: dict[int, type[nn.Module]] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MAXPOOL_TYPES: dict[int, type[nn.Module]] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
INSTANCE_NORM_TYPES: dict[int, type[nn.Module]] = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}

NONLINEARITIES: dict[str, type[nn.Module]] = {
    "LeakyReLU": nn.LeakyReLU,
    "Mish": nn.Mish,
    "SELU": nn.SELU,
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
}
NORMS = ("GroupNorm", "InstanceNorm")


def clipped_num_groups(num_channels: int, num_groups: int) -> int:
    """The largest group count <= num_groups that divides num_channels (GroupNorm needs a divisor)."""
    for g in range(min(num_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def make_norm(norm: str, norm_kwargs: dict[str, Any], num_channels: int, dim: int) -> nn.Module:
    """A per-sample normalisation layer: GroupNorm(num_groups clipped to divide channels) or InstanceNorm
    with affine parameters and without running statistics."""
    kwargs = dict(norm_kwargs)
    if norm == "GroupNorm":
        num_groups = clipped_num_groups(num_channels, int(kwargs.pop("num_groups", 8)))
        return nn.GroupNorm(num_groups, num_channels, **kwargs)
    if norm == "InstanceNorm":
        kwargs.pop("num_groups", None)
        if kwargs.get("track_running_stats") or kwargs.get("affine") is False:
            raise DpunetError(
                "InstanceNorm must have affine=True and track_running_stats=False under DP, "
                f"got norm_kwargs {norm_kwargs}"
            )
        kwargs.update(affine=True, track_running_stats=False)
        return INSTANCE_NORM_TYPES[dim](num_channels, **kwargs)
    raise DpunetError(f"unknown norm {norm!r}; known: {', '.join(NORMS)} (BatchNorm is not allowed under DP)")


def make_nonlin(nonlin: str, nonlin_kwargs: dict[str, Any]) -> nn.Module:
    """An activation module, never in-place."""
    if nonlin not in NONLINEARITIES:
        raise DpunetError(f"unknown nonlin {nonlin!r}; known: {', '.join(NONLINEARITIES)}")
    if nonlin_kwargs.get("inplace"):
        raise DpunetError(f"nonlin {nonlin} with inplace=True: in-place activations break per-sample gradients")
    kwargs = {k: v for k, v in nonlin_kwargs.items() if k != "inplace"}
    if nonlin in ("LeakyReLU", "Mish", "SELU", "ReLU"):
        kwargs["inplace"] = False
    return NONLINEARITIES[nonlin](**kwargs)


def _standardize(weight: Tensor, eps: float) -> Tensor:
    """Zero mean and unit variance of each output filter (over input channels and kernel positions)."""
    reduce_dims = tuple(range(1, weight.ndim))
    mean = weight.mean(dim=reduce_dims, keepdim=True)
    var = weight.var(dim=reduce_dims, keepdim=True, unbiased=False)
    return (weight - mean) * torch.rsqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output filter in every forward (Qiao et al. 2019).

    Opacus has no grad sampler for this type, so GradSampleModule treats it as a leaf and uses its functorch
    fallback, which differentiates through the standardisation; torch.func engines do the same natively."""

    def __init__(self, *args: Any, ws_eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _standardize(self.weight, self.ws_eps), self.bias)


class WSConv3d(nn.Conv3d):
    """Conv3d whose weight is standardised per output filter in every forward (see WSConv2d)."""

    def __init__(self, *args: Any, ws_eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _standardize(self.weight, self.ws_eps), self.bias)


WS_CONV_TYPES: dict[int, type[nn.Module]] = {2: WSConv2d, 3: WSConv3d}


class LayerFactory:
    """Builds the convs, norms and activations of one network from its architecture options."""

    def __init__(
        self,
        dim: int,
        conv_bias: bool,
        norm: str,
        norm_kwargs: dict[str, Any],
        nonlin: str,
        nonlin_kwargs: dict[str, Any],
        weight_standardization: bool,
    ) -> None:
        self.dim = dim
        self.conv_bias = conv_bias
        self.norm_name = norm
        self.norm_kwargs = norm_kwargs
        self.nonlin_name = nonlin
        self.nonlin_kwargs = nonlin_kwargs
        self.weight_standardization = weight_standardization

    def conv(self, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]) -> nn.Module:
        conv_type = WS_CONV_TYPES[self.dim] if self.weight_standardization else CONV_TYPES[self.dim]
        return conv_type(
            in_ch, out_ch, tuple(kernel), stride=tuple(stride),
            padding=tuple(k // 2 for k in kernel), bias=self.conv_bias,
        )

    def plain_conv(self, in_ch: int, out_ch: int, kernel: Sequence[int]) -> nn.Module:
        """An ordinary (never weight-standardised) conv with bias: heads, projections, up-sampling convs."""
        return CONV_TYPES[self.dim](in_ch, out_ch, tuple(kernel), padding=tuple(k // 2 for k in kernel))

    def norm(self, num_channels: int) -> nn.Module:
        return make_norm(self.norm_name, self.norm_kwargs, num_channels, self.dim)

    def nonlin(self) -> nn.Module:
        return make_nonlin(self.nonlin_name, self.nonlin_kwargs)


class ConvNormNonlin(nn.Sequential):
    """conv -> norm -> nonlin, the nnU-Net unit."""

    def __init__(self, layers: LayerFactory, in_ch: int, out_ch: int, kernel: Sequence[int],
                 stride: Sequence[int]) -> None:
        super().__init__(layers.conv(in_ch, out_ch, kernel, stride), layers.norm(out_ch), layers.nonlin())


class StackedConvs(nn.Sequential):
    """n ConvNormNonlin units; only the first may be strided."""

    def __init__(self, layers: LayerFactory, n: int, in_ch: int, out_ch: int, kernel: Sequence[int],
                 first_stride: Sequence[int]) -> None:
        ones = [1] * len(kernel)
        super().__init__(*[
            ConvNormNonlin(layers, in_ch if i == 0 else out_ch, out_ch, kernel, first_stride if i == 0 else ones)
            for i in range(n)
        ])


def is_identity_stride(stride: Sequence[int]) -> bool:
    return all(int(s) == 1 for s in stride)


class Downsample(nn.Module):
    """Max pooling with the stage's stride (kernel = stride), or nothing for a stride of one."""

    def __init__(self, dim: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.pool = None if is_identity_stride(stride) else MAXPOOL_TYPES[dim](tuple(stride), tuple(stride))

    def forward(self, x: Tensor) -> Tensor:
        return x if self.pool is None else self.pool(x)


class NearestUpsample(nn.Module):
    """Nearest-neighbour up-sampling by an integer factor per axis (repeat_interleave: exact and vmap-safe)."""

    def __init__(self, scale: Sequence[int]) -> None:
        super().__init__()
        self.scale = tuple(int(s) for s in scale)

    def forward(self, x: Tensor) -> Tensor:
        spatial_start = x.ndim - len(self.scale)
        for axis, s in enumerate(self.scale):
            if s != 1:
                x = x.repeat_interleave(s, dim=spatial_start + axis)
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def make_upsampling(kind: str, layers: LayerFactory, in_ch: int, out_ch: int, stride: Sequence[int]) -> nn.Module:
    """transposed_conv: ConvTranspose with kernel = stride; nearest_conv: nearest up-sampling + 1x1 conv."""
    if kind == "transposed_conv":
        return TRANSPOSED_CONV_TYPES[layers.dim](in_ch, out_ch, tuple(stride), stride=tuple(stride), bias=True)
    if kind == "nearest_conv":
        return nn.Sequential(NearestUpsample(stride), layers.plain_conv(in_ch, out_ch, [1] * layers.dim))
    raise DpunetError(f"unknown upsampling {kind!r}; known: transposed_conv, nearest_conv")


def scale_norm(num_channels: int, num_groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    """ScaleNorm (Klause et al. 2022): a per-sample normalisation placed after a residual addition or a skip
    concatenation, here a GroupNorm with the group count clipped to divide the channels. A plain GroupNorm
    instance, so Opacus computes its per-sample gradients with its GroupNorm grad sampler."""
    return nn.GroupNorm(clipped_num_groups(num_channels, num_groups), num_channels, eps=eps, affine=True)


class ResidualBlock(nn.Module):
    """Basic residual block (nnU-Net's BasicBlockD): conv-norm-nonlin-conv-norm plus a shortcut that average-
    pools (for a stride) and projects with a 1x1 conv + norm (for a channel change); then, optionally, a
    ScaleNorm on the sum, then the nonlinearity."""

    def __init__(self, layers: LayerFactory, in_ch: int, out_ch: int, kernel: Sequence[int],
                 stride: Sequence[int], scale_norm_groups: int | None) -> None:
        super().__init__()
        ones = [1] * len(kernel)
        self.conv1 = ConvNormNonlin(layers, in_ch, out_ch, kernel, stride)
        self.conv2 = nn.Sequential(layers.conv(out_ch, out_ch, kernel, ones), layers.norm(out_ch))
        shortcut: list[nn.Module] = []
        if not is_identity_stride(stride):
            pool = nn.AvgPool2d if layers.dim == 2 else nn.AvgPool3d
            shortcut.append(pool(tuple(stride), tuple(stride)))
        if in_ch != out_ch:
            shortcut += [CONV_TYPES[layers.dim](in_ch, out_ch, 1, bias=False), layers.norm(out_ch)]
        self.shortcut = nn.Sequential(*shortcut)
        eps = float(layers.norm_kwargs.get("eps", 1e-5))
        self.scale_norm = scale_norm(out_ch, scale_norm_groups, eps) if scale_norm_groups else nn.Identity()
        self.nonlin = layers.nonlin()

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin(self.scale_norm(self.conv2(self.conv1(x)) + self.shortcut(x)))


def init_weights(module: nn.Module, nonlin: str, negative_slope: float = 1e-2) -> None:
    """He init (nnU-Net's InitWeights_He(1e-2)) for convs; LeCun init for SELU so that it self-normalises."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            if nonlin == "SELU":
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            else:
                nn.init.kaiming_normal_(m.weight, a=negative_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

