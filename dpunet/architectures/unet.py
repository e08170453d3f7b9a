"""The U-Nets a plan can name: nnU-Net's plain U-Net and a residual-encoder U-Net with ScaleNorm.

Both are built from the architecture kwargs stored in dpunet_plans.json (see documentation/architectures.md)
and share one decoder: per decoder stage an up-sampling to the skip's resolution, concatenation with the
skip, optionally a ScaleNorm, then stacked convs and, with deep supervision, a 1x1 head. Outputs are listed
highest resolution first; output i has the input's size divided by the cumulative stride up to stage i.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dpunet.architectures.building_blocks import (
    NONLINEARITIES,
    NORMS,
    ConvNormNonlin,
    Downsample,
    LayerFactory,
    ResidualBlock,
    StackedConvs,
    init_weights,
    make_upsampling,
    scale_norm,
)
from dpunet.utils.errors import DpunetError

DOWNSAMPLING = ("strided_conv", "maxpool")
UPSAMPLING = ("transposed_conv", "nearest_conv")


def _default_norm_kwargs() -> dict[str, Any]:
    return {"num_groups": 8, "eps": 1e-5, "affine": True}


def _default_nonlin_kwargs() -> dict[str, Any]:
    return {"negative_slope": 0.01}


@dataclass
class UNetConfig:
    """The architecture kwargs of a plan, checked. Per-stage lists run from the highest resolution down."""

    dim: int
    n_stages: int
    features_per_stage: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    n_conv_per_stage: list[int]
    n_conv_per_stage_decoder: list[int]
    conv_bias: bool = True
    norm: str = "GroupNorm"
    norm_kwargs: dict[str, Any] = field(default_factory=_default_norm_kwargs)
    nonlin: str = "LeakyReLU"
    nonlin_kwargs: dict[str, Any] = field(default_factory=_default_nonlin_kwargs)
    downsampling: str = "strided_conv"
    upsampling: str = "transposed_conv"
    weight_standardization: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], where: str = "architecture kwargs") -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise DpunetError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise DpunetError(f"{where}: missing option(s) {missing}")
        cfg = cls(**kwargs)
        try:
            cfg._normalise_and_check(where)
        except (TypeError, ValueError) as e:  # e.g. a number where a list belongs
            raise DpunetError(f"{where}: malformed value ({e})") from None
        return cfg

    def _normalise_and_check(self, where: str) -> None:
        def fail(msg: str) -> None:
            raise DpunetError(f"{where}: {msg}")

        if self.dim not in (2, 3):
            fail(f"dim must be 2 or 3, got {self.dim}")
        n = int(self.n_stages)
        if n < 2:
            fail(f"n_stages must be >= 2 (a U-Net needs a down and an up path), got {n}")
        self.n_stages = n

        def per_axis(value: Any, name: str) -> list[int]:
            v = [int(value)] * self.dim if isinstance(value, (int, float)) else [int(x) for x in value]
            if len(v) != self.dim or any(x < 1 for x in v):
                fail(f"{name} must have {self.dim} positive entries, got {value}")
            return v

        for name in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
            if len(getattr(self, name)) != n:
                fail(f"{name} must have n_stages={n} entries, got {getattr(self, name)}")
        if len(self.n_conv_per_stage_decoder) != n - 1:
            fail(f"n_conv_per_stage_decoder must have n_stages-1={n - 1} entries, got {self.n_conv_per_stage_decoder}")
        self.features_per_stage = [int(f) for f in self.features_per_stage]
        if any(f < 1 for f in self.features_per_stage):
            fail(f"features_per_stage must be positive, got {self.features_per_stage}")
        self.kernel_sizes = [per_axis(k, f"kernel_sizes[{i}]") for i, k in enumerate(self.kernel_sizes)]
        if any(k % 2 == 0 for ks in self.kernel_sizes for k in ks):
            fail(f"kernel sizes must be odd (same padding), got {self.kernel_sizes}")
        self.strides = [per_axis(s, f"strides[{i}]") for i, s in enumerate(self.strides)]
        if any(s != 1 for s in self.strides[0]):
            fail(f"strides[0] must be all ones so the highest-resolution output matches the input, "
                 f"got {self.strides[0]}")
        self.n_conv_per_stage = [int(c) for c in self.n_conv_per_stage]
        self.n_conv_per_stage_decoder = [int(c) for c in self.n_conv_per_stage_decoder]
        if any(c < 1 for c in self.n_conv_per_stage + self.n_conv_per_stage_decoder):
            fail("every stage needs at least one conv")
        if self.norm not in NORMS:
            fail(f"unknown norm {self.norm!r}; known: {', '.join(NORMS)} (BatchNorm is not allowed under DP)")
        if self.nonlin not in NONLINEARITIES:
            fail(f"unknown nonlin {self.nonlin!r}; known: {', '.join(NONLINEARITIES)}")
        if self.nonlin_kwargs.get("inplace"):
            fail("nonlin_kwargs has inplace=True: in-place activations break per-sample gradients")
        if self.downsampling not in DOWNSAMPLING:
            fail(f"unknown downsampling {self.downsampling!r}; known: {', '.join(DOWNSAMPLING)}")
        if self.upsampling not in UPSAMPLING:
            fail(f"unknown upsampling {self.upsampling!r}; known: {', '.join(UPSAMPLING)}")
        self.norm_kwargs = dict(self.norm_kwargs)
        self.nonlin_kwargs = dict(self.nonlin_kwargs)

    def layer_factory(self) -> LayerFactory:
        return LayerFactory(self.dim, bool(self.conv_bias), self.norm, self.norm_kwargs, self.nonlin,
                            self.nonlin_kwargs, bool(self.weight_standardization))

    def cumulative_strides(self) -> list[list[int]]:
        """Per stage, the product of strides[0..s] per axis: the down-sampling of that stage's feature map."""
        out, acc = [], [1] * self.dim
        for s in self.strides:
            acc = [a * b for a, b in zip(acc, s)]
            out.append(list(acc))
        return out

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)



class UNetDecoder(nn.Module):
    """Up-sample, concatenate the skip, (ScaleNorm), stacked convs; a 1x1 head per deep-supervision output."""

    def __init__(self, cfg: UNetConfig, layers: LayerFactory, num_classes: int, deep_supervision: bool,
                 concat_norm_groups: int | None) -> None:
        super().__init__()
        feats, n = cfg.features_per_stage, cfg.n_stages
        ones = [1] * cfg.dim
        eps = float(cfg.norm_kwargs.get("eps", 1e-5))
        self.upsamplers = nn.ModuleList()
        self.concat_norms = nn.ModuleList()
        self.stages = nn.ModuleList()
        # s-th decoder stage counted from the bottom goes from stage n-s to stage n-s-1 of the encoder
        for s in range(1, n):
            below, skip = feats[n - s], feats[n - s - 1]
            self.upsamplers.append(make_upsampling(cfg.upsampling, layers, below, skip, cfg.strides[n - s]))
            self.concat_norms.append(scale_norm(2 * skip, concat_norm_groups, eps) if concat_norm_groups
                                     else nn.Identity())
            self.stages.append(StackedConvs(layers, cfg.n_conv_per_stage_decoder[s - 1], 2 * skip, skip,
                                            cfg.kernel_sizes[n - s - 1], ones))
        # heads only for outputs that are used, so that every parameter gets a gradient (Opacus needs that);
        # heads[-1] is the full-resolution head in both cases
        head_features = [feats[n - s - 1] for s in range(1, n)] if deep_supervision else [feats[0]]
        self.heads = nn.ModuleList([layers.plain_conv(f, num_classes, ones) for f in head_features])
        self.has_deep_supervision_heads = deep_supervision
        self.deep_supervision = deep_supervision

    def forward(self, skips: list[Tensor]) -> Tensor | list[Tensor]:
        x = skips[-1]
        outputs = []
        n_dec = len(self.stages)
        for s in range(n_dec):
            x = self.upsamplers[s](x)
            x = self.concat_norms[s](torch.cat((x, skips[-(s + 2)]), dim=1))
            x = self.stages[s](x)
            if self.deep_supervision:
                outputs.append(self.heads[s](x))
            elif s == n_dec - 1:
                outputs.append(self.heads[-1](x))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]


class UNetBase(nn.Module):
    """Common interface: `arch_kwargs`, `deep_supervision` switch, `output_strides`, input-size check."""

    class_name = "UNetBase"

    def __init__(self, cfg: UNetConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise DpunetError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.decoder: UNetDecoder

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return self.cfg.to_kwargs()

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value and not self.decoder.has_deep_supervision_heads:
            raise DpunetError("this network was built without deep-supervision heads; rebuild it with "
                              "deep_supervision=True")
        self.decoder.deep_supervision = bool(value)

    @property
    def output_strides(self) -> list[list[int]]:
        """Cumulative stride of each deep-supervision output, highest resolution first."""
        return self.cfg.cumulative_strides()[: self.cfg.n_stages - 1]

    @property
    def required_divisor(self) -> list[int]:
        """Each spatial size of the input must be a multiple of this (the total down-sampling)."""
        return self.cfg.cumulative_strides()[-1]

    def check_input(self, x: Tensor) -> None:
        # shapes are static (also under vmap and torch.compile), so this check is safe in forward
        spatial = list(x.shape[-self.cfg.dim:])
        divisor = self.required_divisor
        if x.ndim != self.cfg.dim + 2 or x.shape[1] != self.in_channels:
            raise DpunetError(f"{type(self).__name__} expects input (N, {self.in_channels}, "
                              f"{'z, y, x' if self.cfg.dim == 3 else 'y, x'}), got {tuple(x.shape)}")
        if any(s % d for s, d in zip(spatial, divisor)):
            raise DpunetError(f"patch size {spatial} is not divisible by the network's total stride {divisor}")

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, dim={self.cfg.dim}"


class PlainConvUNet(UNetBase):
    """nnU-Net's plain U-Net: per stage n convs (conv-norm-nonlin), the first one strided (or preceded by
    max pooling with downsampling='maxpool')."""

    class_name = "PlainConvUNet"

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool = True, **arch_kwargs: Any) -> None:
        cfg = UNetConfig.from_kwargs(arch_kwargs, where=f"{self.class_name} kwargs")
        super().__init__(cfg, in_channels, num_classes)
        layers = cfg.layer_factory()
        ones = [1] * cfg.dim
        self.encoder = nn.ModuleList()
        prev = in_channels
        for s in range(cfg.n_stages):
            feats, kernel, stride = cfg.features_per_stage[s], cfg.kernel_sizes[s], cfg.strides[s]
            if cfg.downsampling == "maxpool":
                stage = nn.Sequential(Downsample(cfg.dim, stride),
                                      StackedConvs(layers, cfg.n_conv_per_stage[s], prev, feats, kernel, ones))
            else:
                stage = StackedConvs(layers, cfg.n_conv_per_stage[s], prev, feats, kernel, stride)
            self.encoder.append(stage)
            prev = feats
        self.decoder = UNetDecoder(cfg, layers, num_classes, deep_supervision, concat_norm_groups=None)
        init_weights(self, cfg.nonlin, float(cfg.nonlin_kwargs.get("negative_slope", 1e-2)))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self.check_input(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips)


class ResidualEncoderUNet(UNetBase):
    """U-Net with a residual encoder (nnU-Net's ResEnc topology: a conv stem, then per stage
    n_conv_per_stage[s] residual blocks of two convs each) and ScaleNorm (Klause et al. 2022): a per-sample
    GroupNorm after every residual addition and after every skip concatenation in the decoder.

    Extra kwargs: `scale_norm` (default True; False gives the plain residual encoder for ablation) and
    `scale_norm_groups` (default: norm_kwargs' num_groups, else 8)."""

    class_name = "ResidualEncoderUNet"

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool = True,
                 scale_norm: bool = True, scale_norm_groups: int | None = None, **arch_kwargs: Any) -> None:
        cfg = UNetConfig.from_kwargs(arch_kwargs, where=f"{self.class_name} kwargs")
        super().__init__(cfg, in_channels, num_classes)
        if scale_norm_groups is None:
            scale_norm_groups = int(cfg.norm_kwargs.get("num_groups", 8))
        self.scale_norm = bool(scale_norm)
        self.scale_norm_groups = int(scale_norm_groups)
        groups = self.scale_norm_groups if self.scale_norm else None
        layers = cfg.layer_factory()
        ones = [1] * cfg.dim
        self.stem = ConvNormNonlin(layers, in_channels, cfg.features_per_stage[0], cfg.kernel_sizes[0], ones)
        self.encoder = nn.ModuleList()
        prev = cfg.features_per_stage[0]
        for s in range(cfg.n_stages):
            feats, kernel, stride = cfg.features_per_stage[s], cfg.kernel_sizes[s], cfg.strides[s]
            blocks: list[nn.Module] = []
            if cfg.downsampling == "maxpool":
                blocks.append(Downsample(cfg.dim, stride))
                stride = ones
            for b in range(cfg.n_conv_per_stage[s]):
                blocks.append(ResidualBlock(layers, prev if b == 0 else feats, feats, kernel,
                                            stride if b == 0 else ones, groups))
            self.encoder.append(nn.Sequential(*blocks))
            prev = feats
        self.decoder = UNetDecoder(cfg, layers, num_classes, deep_supervision, concat_norm_groups=groups)
        init_weights(self, cfg.nonlin, float(cfg.nonlin_kwargs.get("negative_slope", 1e-2)))

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return {**self.cfg.to_kwargs(), "scale_norm": self.scale_norm, "scale_norm_groups": self.scale_norm_groups}

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self.check_input(x)
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips)


def output_shapes(model: UNetBase, patch_size: Sequence[int]) -> list[list[int]]:
    """Spatial shape of each deep-supervision output for a patch (highest resolution first)."""
    return [[p // s for p, s in zip(patch_size, cs)] for cs in model.output_strides]

