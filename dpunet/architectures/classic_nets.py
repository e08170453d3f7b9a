"""Classic segmentation families MONAI lacks, written for dpunet in 2D and 3D on one ResNet-style encoder.

    --arch deeplabv3plus  DeepLabV3+ (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution for
                          Semantic Image Segmentation", ECCV): ASPP (1x1, three atrous 3x3, image pooling) on
                          an encoder of output stride 16 (or 8), decoder with a low-level skip at stride 4
    --arch fpn            FPN (Lin et al. 2017, "Feature Pyramid Networks for Object Detection", CVPR) with
                          the semantic-segmentation head of Panoptic FPN (Kirillov et al. 2019, "Panoptic
                          Feature Pyramid Networks", CVPR)
    --arch pspnet         PSPNet (Zhao et al. 2017, "Pyramid Scene Parsing Network", CVPR): pyramid pooling
                          module with bins 1, 2, 3, 6 on a dilated encoder of output stride 8
    --arch linknet        LinkNet (Chaurasia & Culurciello 2017, "LinkNet: Exploiting Encoder Representations
                          for Efficient Semantic Segmentation", VCIP): decoder blocks added to encoder levels

The encoder (`ResNetEncoder`) is ResNet-18-like (He et al. 2016: basic residual blocks, 2 per stage, a stem
and a max pool before the first stage; ResNet-34's 3, 4, 6, 3 with --encoder-depth 34) at half ResNet's
channels at width 1 (32, 32, 64, 128, 256), with a 3x3 stem instead of 7x7 (medical patches are small; a 7x7x7 stem would dominate 3D cost). DP fitness: a
per-sample norm (GroupNorm by default, InstanceNorm without running statistics by option), ReLU with
inplace=False, no BatchNorm, no dropout. Branches that act on a globally pooled (single-voxel) map, ASPP's
image pooling and PSPNet's bin-1 pyramid level, use a conv with bias and no norm: a per-sample norm over one
voxel is degenerate (InstanceNorm refuses it), and the papers' BatchNorm there is not per-sample.

Per-axis strides: the encoder has 5 reductions (stem, max pool, stages 2-4). Level i takes the plan's U-Net
stride of stage i+1 where the plan has one (the planner already chose them from the spacing and patch), then
halves an axis while it is even and stays >= 2 voxels; an axis that cannot be halved keeps stride 1, so no
axis falls below one voxel. The spec records the strides, the dilations that replace removed strides
(DeepLabV3+ and PSPNet), and the patch divisor they need. Everything needed to rebuild a network sits in the
spec's kwargs:

    {"class_name": "DeepLabV3Plus", "kwargs": {"name": "deeplabv3plus", "dim": 3, "strides": [...], ...},
     "preset": "deeplabv3plus", "width_multiplier": 1.0}

All four give one output (no deep supervision) at the input's spatial size: DeepLabV3+, FPN and PSPNet
interpolate (bi/trilinear) back up as in their papers; LinkNet's transposed convolutions restore it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpunet.architectures.dp_conversion import DP_NORMS, largest_divisor_at_most
from dpunet.utils.errors import DpunetError, warn

LEVELS = 5  # stem, max pool (+ stage 1), stages 2, 3, 4
ENCODER_CHANNELS = (32, 32, 64, 128, 256)  # ResNet-18's (64, 64, 128, 256, 512) halved
BLOCKS_PER_STAGE = (2, 2, 2, 2)  # ResNet-18
# --encoder-depth: the ResNet whose basic blocks per stage the encoder has (He et al. 2016, table 1)
ENCODER_DEPTHS = {18: BLOCKS_PER_STAGE, 34: (3, 4, 6, 3)}
DEFAULT_ENCODER_DEPTH = 18
OUTPUT_STRIDES = (8, 16)  # --output-stride of the dilated families
ASPP_RATES = (6, 12, 18)  # at output stride 16; doubled at 8 (Chen et al. 2017/2018)
PSP_BINS = (1, 2, 3, 6)

PerAxis = list[int]


# ------------------------------------------------------------------------------------------ building blocks
def _norm_factory(dim: int, dp_norm: str, num_groups: int) -> Callable[[int], nn.Module]:
    if dp_norm not in DP_NORMS:
        raise DpunetError(f"unknown DP norm {dp_norm!r} for a classic network; known: {', '.join(DP_NORMS)}")
    if dp_norm == "instance":
        cls = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
        return lambda c: cls(c, affine=True, track_running_stats=False)
    return lambda c: nn.GroupNorm(largest_divisor_at_most(c, num_groups), c)


def _conv(dim: int, cin: int, cout: int, kernel: int, stride: Sequence[int] | int = 1,
          dilation: Sequence[int] | int = 1, bias: bool = False) -> nn.Module:
    """A 'same' convolution (odd kernel): padding dilation * (kernel - 1) / 2 per axis."""
    stride = [stride] * dim if isinstance(stride, int) else list(stride)
    dilation = [dilation] * dim if isinstance(dilation, int) else list(dilation)
    padding = [d * (kernel - 1) // 2 for d in dilation]
    cls = nn.Conv2d if dim == 2 else nn.Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)


def _conv_norm_relu(dim: int, cin: int, cout: int, kernel: int, norm: Callable[[int], nn.Module],
                    stride: Sequence[int] | int = 1, dilation: Sequence[int] | int = 1) -> nn.Sequential:
    return nn.Sequential(_conv(dim, cin, cout, kernel, stride, dilation), norm(cout), nn.ReLU(inplace=False))


def _upsample(x: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """`x` resized to `size`: "linear" is bilinear in 2D and trilinear in 3D (align_corners=False)."""
    if list(x.shape[2:]) == list(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=list(size), mode="nearest")
    return F.interpolate(x, size=list(size), mode="bilinear" if x.dim() == 4 else "trilinear", align_corners=False)


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): two 3x3 convs with norms, identity or 1x1 projection shortcut."""

    def __init__(self, dim: int, cin: int, cout: int, stride: Sequence[int], dilation: Sequence[int],
                 norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = _conv(dim, cin, cout, 3, stride, dilation)
        self.norm1 = norm(cout)
        self.conv2 = _conv(dim, cout, cout, 3, 1, dilation)
        self.norm2 = norm(cout)
        self.relu = nn.ReLU(inplace=False)
        needs_projection = cin != cout or any(s != 1 for s in stride)
        self.shortcut = nn.Sequential(_conv(dim, cin, cout, 1, stride), norm(cout)) if needs_projection \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-style encoder returning the 5 levels' features [L0 (stem), L1 .. L4] (He et al. 2016).

    L0: 3x3 conv (stride strides[0]); L1: max pool (strides[1]) then stage 1; L2..L4: stages whose first block
    has strides[i]. `dilations[i]` (per axis) dilates stage i's 3x3 convs where DeepLab/PSPNet replaced its
    stride (Yu & Koltun 2016; Chen et al. 2017)."""

    def __init__(self, dim: int, in_channels: int, channels: Sequence[int], blocks: Sequence[int],
                 strides: Sequence[PerAxis], dilations: Sequence[PerAxis], norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.stem = _conv_norm_relu(dim, in_channels, channels[0], 3, norm, strides[0])
        pool_kernel = [3 if s > 1 else 1 for s in strides[1]]
        pool_cls = nn.MaxPool2d if dim == 2 else nn.MaxPool3d
        self.pool = pool_cls(pool_kernel, stride=list(strides[1]), padding=[k // 2 for k in pool_kernel]) \
            if any(s > 1 for s in strides[1]) else nn.Identity()
        self.stages = nn.ModuleList()
        for i in range(1, LEVELS):
            stride = [1] * dim if i == 1 else list(strides[i])
            cin = channels[i - 1]
            stage = [BasicBlock(dim, cin if b == 0 else channels[i], channels[i], stride if b == 0 else [1] * dim,
                                dilations[i], norm) for b in range(int(blocks[i - 1]))]
            self.stages.append(nn.Sequential(*stage))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [self.stem(x)]
        y = self.pool(levels[0])
        for stage in self.stages:
            y = stage(y)
            levels.append(y)
        return levels


class ClassicSegmenter(nn.Module):
    """What the four families share: the encoder, the norm, a single output, the patch constraint."""

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool, name: str, dim: int,
                 strides: Sequence[PerAxis], dilations: Sequence[PerAxis], encoder_channels: Sequence[int],
                 blocks_per_stage: Sequence[int], dp_norm: str = "group", num_groups: int = 8,
                 required_divisor: Sequence[int] | None = None) -> None:
        super().__init__()
        if deep_supervision:
            raise DpunetError(f"--arch {name} trains without deep supervision in dpunet; build it with "
                              "deep_supervision=False")
        if int(dim) not in (2, 3):
            raise DpunetError(f"--arch {name} exists in 2D and 3D only, got dim {dim}")
        self.name, self.dim = name, int(dim)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.deep_supervision = False
        self.required_divisor = [int(d) for d in (required_divisor or [1] * self.dim)]
        self.channels = [int(c) for c in encoder_channels]
        self.norm = _norm_factory(self.dim, dp_norm, int(num_groups))
        self.encoder = ResNetEncoder(self.dim, self.in_channels, self.channels, blocks_per_stage, strides,
                                     dilations, self.norm)

    def _check_input(self, x: torch.Tensor) -> None:
        bad = [a for a, (s, d) in enumerate(zip(x.shape[2:], self.required_divisor)) if s % d]
        if bad:
            raise DpunetError(f"--arch {self.name}: input of spatial shape {list(x.shape[2:])} is not divisible "
                              f"by the network's per-axis divisor {self.required_divisor} (axes {bad})")


class DeepLabV3Plus(ClassicSegmenter):
    """DeepLabV3+ (Chen et al. 2018, ECCV): encoder at output stride 16 or 8 (strides replaced by dilation),
    ASPP (Chen et al. 2017: a 1x1 branch, three atrous 3x3 branches, image-level pooling, 1x1 projection),
    decoder: the ASPP output up-sampled to the low-level features (stage 1, stride 4) reduced by a 1x1 conv,
    concatenated, two 3x3 convs, a 1x1 classifier, up-sampled to the input. Plain (not depthwise-separable)
    convolutions, as in the paper's ResNet variant. Per-axis ASPP rates are capped at the feature size minus
    one: a larger rate only reaches zero padding (and pads a 3D map to many times its size)."""

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool, aspp_rates: Sequence[PerAxis],
                 aspp_channels: int, low_level_channels: int, decoder_channels: int, output_stride: int = 16,
                 **common: Any) -> None:
        super().__init__(in_channels, num_classes, deep_supervision, **common)
        d, norm, c = self.dim, self.norm, self.channels
        self.output_stride = int(output_stride)
        self.aspp = nn.ModuleList([_conv_norm_relu(d, c[4], aspp_channels, 1, norm)] +
                                  [_conv_norm_relu(d, c[4], aspp_channels, 3, norm, 1, r) for r in aspp_rates])
        self.image_pool = nn.Sequential(_conv(d, c[4], aspp_channels, 1, bias=True), nn.ReLU(inplace=False))
        self.project = _conv_norm_relu(d, aspp_channels * (len(aspp_rates) + 2), aspp_channels, 1, norm)
        self.low_level = _conv_norm_relu(d, c[1], low_level_channels, 1, norm)
        self.decoder = nn.Sequential(_conv_norm_relu(d, aspp_channels + low_level_channels, decoder_channels, 3, norm),
                                     _conv_norm_relu(d, decoder_channels, decoder_channels, 3, norm))
        self.classifier = _conv(d, decoder_channels, self.num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        levels = self.encoder(x)
        top = levels[4]
        pooled = self.image_pool(top.mean(dim=tuple(range(2, top.dim())), keepdim=True))
        branches = [b(top) for b in self.aspp] + [pooled.expand(-1, -1, *top.shape[2:])]
        y = self.project(torch.cat(branches, dim=1))
        low = self.low_level(levels[1])
        y = self.decoder(torch.cat([_upsample(y, low.shape[2:]), low], dim=1))
        return _upsample(self.classifier(y), x.shape[2:])


class FPN(ClassicSegmenter):
    """FPN (Lin et al. 2017, CVPR) with Panoptic FPN's semantic head (Kirillov et al. 2019, CVPR).

    Pyramid: 1x1 laterals on stages 1-4 (C2..C5), top-down pathway by nearest up-sampling and addition, a 3x3
    conv on each merged map (P2..P5). Head: each P_k goes through 3x3 conv + norm + ReLU + bilinear 2x blocks
    until it reaches P2's scale (P2 gets one conv, no up-sampling), the four maps are summed, a 1x1 conv
    classifies, and the logits are up-sampled to the input (4x in the paper)."""

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool, fpn_channels: int,
                 head_channels: int, **common: Any) -> None:
        super().__init__(in_channels, num_classes, deep_supervision, **common)
        d, norm, c = self.dim, self.norm, self.channels
        self.laterals = nn.ModuleList([_conv(d, c[i], fpn_channels, 1, bias=True) for i in range(1, LEVELS)])
        self.smooth = nn.ModuleList([_conv(d, fpn_channels, fpn_channels, 3, bias=True) for _ in range(1, LEVELS)])
        # head branch of P_{k+2} (k = 0..3): max(1, k) conv blocks, each but P2's followed by 2x up-sampling
        self.head = nn.ModuleList([
            nn.ModuleList([_conv_norm_relu(d, fpn_channels if j == 0 else head_channels, head_channels, 3, norm)
                           for j in range(max(1, k))]) for k in range(LEVELS - 1)])
        self.classifier = _conv(d, head_channels, self.num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        feats = self.encoder(x)[1:]  # C2..C5
        merged = [self.laterals[-1](feats[-1])]
        for k in range(len(feats) - 2, -1, -1):
            up = _upsample(merged[0], feats[k].shape[2:], "nearest")
            merged.insert(0, self.laterals[k](feats[k]) + up)
        pyramid = [s(p) for s, p in zip(self.smooth, merged)]  # P2..P5
        total = None
        for k, (branch, p) in enumerate(zip(self.head, pyramid)):
            y = p
            for j, block in enumerate(branch):
                y = block(y)
                if k > 0:  # up one level per block, back to P2's scale after k blocks
                    y = _upsample(y, pyramid[k - j - 1].shape[2:])
            total = y if total is None else total + y
        return _upsample(self.classifier(total), x.shape[2:])


class PSPNet(ClassicSegmenter):
    """PSPNet (Zhao et al. 2017, CVPR): a dilated encoder of output stride 8, the pyramid pooling module
    (average pooling to bins 1, 2, 3, 6 per axis, capped at the feature size; a 1x1 conv to 1/4 of the
    channels per level; up-sampled and concatenated with the features), a 3x3 conv + norm + ReLU, a 1x1
    classifier, up-sampled to the input. The paper's auxiliary loss and dropout are left out (one output;
    dropout would make the engines' per-patient sums differ by their random masks)."""

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool, bins: Sequence[PerAxis],
                 head_channels: int, **common: Any) -> None:
        super().__init__(in_channels, num_classes, deep_supervision, **common)
        d, norm, c = self.dim, self.norm, self.channels
        branch_channels = max(1, c[4] // len(bins))
        self.bins = [list(map(int, b)) for b in bins]
        self.branches = nn.ModuleList([
            nn.Sequential(_conv(d, c[4], branch_channels, 1, bias=True), nn.ReLU(inplace=False))
            for _ in self.bins])
        self.bottleneck = _conv_norm_relu(d, c[4] + branch_channels * len(bins), head_channels, 3, norm)
        self.classifier = _conv(d, head_channels, self.num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        top = self.encoder(x)[4]
        pool = F.adaptive_avg_pool2d if self.dim == 2 else F.adaptive_avg_pool3d
        pyramid = [top] + [_upsample(branch(pool(top, b)), top.shape[2:])
                           for branch, b in zip(self.branches, self.bins)]
        y = self.bottleneck(torch.cat(pyramid, dim=1))
        return _upsample(self.classifier(y), x.shape[2:])


class LinkNetDecoderBlock(nn.Module):
    """LinkNet's decoder block (Chaurasia & Culurciello 2017): 1x1 conv m -> m/4, 3x3 full (transposed)
    convolution m/4 -> m/4 up-sampling by `stride` per axis, 1x1 conv m/4 -> n, each with norm and ReLU."""

    def __init__(self, dim: int, cin: int, cout: int, stride: Sequence[int], norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        mid = max(1, cin // 4)
        tconv = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
        self.reduce = _conv_norm_relu(dim, cin, mid, 1, norm)
        self.up = nn.Sequential(tconv(mid, mid, 3, stride=list(stride), padding=1,
                                      output_padding=[s - 1 for s in stride], bias=False),
                                norm(mid), nn.ReLU(inplace=False))
        self.expand = _conv_norm_relu(dim, mid, cout, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.up(self.reduce(x)))


class LinkNet(ClassicSegmenter):
    """LinkNet (Chaurasia & Culurciello 2017, VCIP): decoder block i maps level i to level i-1's channels and
    resolution and is added to encoder level i-1 (the "link"); a final block (3x3 full convolution back up by
    the stem's stride, a 3x3 conv, a 1x1 classifier, in place of the paper's 2x2 full convolution because the
    stem here reduces once) gives the input's resolution exactly."""

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool, **common: Any) -> None:
        super().__init__(in_channels, num_classes, deep_supervision, **common)
        d, norm, c = self.dim, self.norm, self.channels
        strides = common["strides"]
        self.decoders = nn.ModuleList([LinkNetDecoderBlock(d, c[i], c[i - 1], strides[i], norm)
                                       for i in range(1, LEVELS)])
        half = max(1, c[0] // 2)
        tconv = nn.ConvTranspose2d if d == 2 else nn.ConvTranspose3d
        self.final = nn.Sequential(
            tconv(c[0], half, 3, stride=list(strides[0]), padding=1, output_padding=[s - 1 for s in strides[0]],
                  bias=False), norm(half), nn.ReLU(inplace=False),
            _conv_norm_relu(d, half, half, 3, norm))
        self.classifier = _conv(d, half, self.num_classes, 1, bias=True)  # named as in the other families

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        levels = self.encoder(x)
        y = levels[4]
        for i in range(LEVELS - 1, 0, -1):
            y = self.decoders[i - 1](y) + levels[i - 1]
        return self.classifier(self.final(y))


# ------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ClassicArch:
    """One `--arch` name of a classic family."""
    class_name: str
    network: type[ClassicSegmenter]
    paper: str  # the source dpunet_archs lists
    description: str
    output_stride: int | None  # levels beyond it use dilation instead of stride (None: full stride 32)


CLASSIC_ARCHITECTURES: dict[str, ClassicArch] = {
    "deeplabv3plus": ClassicArch("DeepLabV3Plus", DeepLabV3Plus, "Chen et al. 2018",
                                 "DeepLabV3+: ASPP, output stride 16, decoder with a stride-4 skip", 16),
    "fpn": ClassicArch("FPN", FPN, "Lin 2017 + Kirillov 2019",
                       "FPN with Panoptic FPN's semantic-segmentation head", None),
    "pspnet": ClassicArch("PSPNet", PSPNet, "Zhao et al. 2017",
                          "PSPNet: pyramid pooling (bins 1, 2, 3, 6), dilated encoder of output stride 8", 8),
    "linknet": ClassicArch("LinkNet", LinkNet, "Chaurasia & Culurciello 2017",
                           "LinkNet: decoder blocks added to the encoder levels", None),
}


def is_classic_arch(name: str) -> bool:
    return name in CLASSIC_ARCHITECTURES


def default_output_stride(name: str) -> int | None:
    """The output stride `--arch name` has without --output-stride (None: not a dilated classic family)."""
    entry = CLASSIC_ARCHITECTURES.get(name)
    return entry.output_stride if entry else None


def _dilated_names() -> str:
    return ", ".join(n for n, e in CLASSIC_ARCHITECTURES.items() if e.output_stride)


def classic_encoder_options(name: str, output_stride: int | None = None,
                            encoder_depth: int = DEFAULT_ENCODER_DEPTH) -> tuple[int | None, tuple[int, ...]]:
    """(output stride, blocks per stage) that `--arch name` is built with for `--output-stride` (None: the
    family's own) and `--encoder-depth` (18 or 34: ResNet-18- or ResNet-34-like). Both options shape the
    encoder of the classic families only, and --output-stride that of the dilated ones only (deeplabv3plus,
    pspnet); any other use is refused with a DpunetError naming the option."""
    if encoder_depth not in ENCODER_DEPTHS:
        raise DpunetError(f"--encoder-depth must be one of {', '.join(map(str, ENCODER_DEPTHS))} (a ResNet-18- or "
                          f"ResNet-34-like encoder), got {encoder_depth!r}")
    if output_stride is not None and output_stride not in OUTPUT_STRIDES:
        raise DpunetError(f"--output-stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got "
                          f"{output_stride!r}")
    if name not in CLASSIC_ARCHITECTURES:
        given = [o for o, v, d in (("--output-stride", output_stride, None),
                                   ("--encoder-depth", encoder_depth, DEFAULT_ENCODER_DEPTH)) if v != d]
        if given:
            verb = "shape" if len(given) > 1 else "shapes"
            raise DpunetError(f"{' and '.join(given)} {verb} the encoder of the classic families "
                              f"({', '.join(CLASSIC_ARCHITECTURES)}); --arch {name} is not one of them")
        return None, BLOCKS_PER_STAGE
    entry = CLASSIC_ARCHITECTURES[name]
    if output_stride is not None and entry.output_stride is None:
        raise DpunetError(f"--output-stride {output_stride}: --arch {name} has no dilated encoder (it keeps every "
                          f"stride); the option exists for the dilated families {_dilated_names()} only")
    return output_stride or entry.output_stride, ENCODER_DEPTHS[encoder_depth]


def _scale(channels: Sequence[int], width: float, multiple: int) -> list[int]:
    """Channels times the width, rounded to a positive multiple of `multiple` (GroupNorm's group count)."""
    return [max(multiple, int(round(c * width / multiple)) * multiple) for c in channels]


def encoder_strides(patch: Sequence[int], plan_strides: Sequence[Sequence[int]] | None = None) -> list[PerAxis]:
    """The encoder's 5 per-axis strides for `patch`: the plan's U-Net strides of stages 1.. where it has them
    (the planner chose them from spacing and patch), then 2 on every axis that is even and stays >= 2 voxels."""
    dim = len(patch)
    planned = [[int(v) for v in s] for s in (plan_strides or [])[1:]]
    size, strides = [int(p) for p in patch], []
    for level in range(LEVELS):
        if level < len(planned) and len(planned[level]) == dim and all(s in (1, 2) for s in planned[level]):
            stride = [s if size[a] % s == 0 else 1 for a, s in enumerate(planned[level])]
        else:
            stride = [2 if size[a] % 2 == 0 and size[a] // 2 >= 2 else 1 for a in range(dim)]
        size = [n // s for n, s in zip(size, stride)]
        strides.append(stride)
    return strides


def _dilate(strides: list[PerAxis], output_stride: int | None) -> tuple[list[PerAxis], list[PerAxis]]:
    """(strides, dilations): levels past log2(output_stride) keep stride 1 and dilate their convs by the
    product of the strides removed so far on each axis (Chen et al. 2017)."""
    dim = len(strides[0])
    if output_stride is None:
        return strides, [[1] * dim for _ in strides]
    keep = int(math.log2(output_stride))
    new_strides, dilations, removed = [], [], [1] * dim
    for level, stride in enumerate(strides):
        if level < keep:
            new_strides.append(list(stride))
            dilations.append([1] * dim)
        else:
            removed = [r * s for r, s in zip(removed, stride)]
            new_strides.append([1] * dim)
            dilations.append(list(removed))
    return new_strides, dilations


def _sizes(patch: Sequence[int], strides: Sequence[PerAxis]) -> list[list[int]]:
    sizes, cur = [], list(patch)
    for s in strides:
        cur = [n // v for n, v in zip(cur, s)]
        sizes.append(cur)
    return sizes


def _check_patch(name: str, patch: list[int], divisor: list[int], deepest: list[int]) -> None:
    if any(p < 1 for p in patch):
        raise DpunetError(f"--arch {name}: patch size {patch} has an empty axis")
    bad = [a for a, (p, d) in enumerate(zip(patch, divisor)) if p % d]
    if bad:
        raise DpunetError(f"--arch {name} needs a patch size divisible by {divisor} (per axis); the patch size is "
                          f"{patch} (axes {bad} are not)")
    if max(divisor) < 4:
        raise DpunetError(f"--arch {name} needs a patch with at least one axis that can be halved twice (even, "
                          f"then even again, and at least 8 voxels); the patch size {patch} allows strides "
                          f"{divisor} only")
    if math.prod(deepest) < 2:
        raise DpunetError(f"--arch {name} down-samples the patch {patch} by {divisor} to a single voxel; plan a "
                          f"patch at least twice that size on one axis")


def _family_kwargs(name: str, width: float, multiple: int, sizes: list[list[int]], output_stride: int | None
                   ) -> dict[str, Any]:
    deepest = sizes[-1]
    if name == "deeplabv3plus":
        rates = [r * (16 // output_stride) for r in ASPP_RATES]
        aspp, low, dec = _scale([128, 24, 128], width, multiple)
        return {"aspp_rates": [[max(1, min(r, n - 1)) for n in deepest] for r in rates], "aspp_channels": aspp,
                "low_level_channels": low, "decoder_channels": dec, "output_stride": output_stride}
    if name == "fpn":
        fpn, head = _scale([128, 64], width, multiple)  # the papers' 256 and 128, halved like the encoder
        return {"fpn_channels": fpn, "head_channels": head}
    if name == "pspnet":
        return {"bins": [[min(b, n) for n in deepest] for b in PSP_BINS],
                "head_channels": _scale([128], width, multiple)[0]}
    return {}


def classic_spec(name: str, plan_arch: dict[str, Any], patch_size: Sequence[int] | None, width: float = 1.0,
                 dp_norm: str = "group", num_groups: int = 8, blocks_per_stage: Sequence[int] = BLOCKS_PER_STAGE,
                 output_stride: int | None = None) -> dict[str, Any]:
    """The architecture spec of classic name `name` for a plan ("architecture" entry and patch size).

    `blocks_per_stage`: residual blocks in the encoder's 4 stages, (2, 2, 2, 2) as ResNet-18 or (3, 4, 6, 3) as
    ResNet-34. `output_stride`: 8 or 16 for the dilated families (DeepLabV3+: 16 by default, 8 as the paper's
    denser variant; PSPNet: 8). Refuses (DpunetError) an unknown name or norm, a dimension other than 2/3, a
    missing patch size, a patch the encoder cannot reduce (see `_check_patch`) and options the family lacks."""
    if name not in CLASSIC_ARCHITECTURES:
        raise DpunetError(f"unknown classic architecture {name!r}; known: {', '.join(CLASSIC_ARCHITECTURES)}")
    if dp_norm not in DP_NORMS:
        raise DpunetError(f"unknown DP norm {dp_norm!r}; known: {', '.join(DP_NORMS)}")
    if int(num_groups) < 1:
        raise DpunetError(f"--arch {name}: the GroupNorm group count must be at least 1, got {num_groups}")
    entry = CLASSIC_ARCHITECTURES[name]
    output_stride, _ = classic_encoder_options(name, output_stride)  # refuses a stride the family lacks
    if len(blocks_per_stage) != LEVELS - 1 or any(int(b) < 1 for b in blocks_per_stage):
        raise DpunetError(f"--arch {name}: blocks_per_stage must be {LEVELS - 1} positive counts, got "
                          f"{list(blocks_per_stage)}")
    kwargs = plan_arch.get("kwargs", {}) if isinstance(plan_arch, dict) else {}
    if patch_size is None:
        raise DpunetError(f"--arch {name} is built for a patch size; pass the plan configuration's patch_size")
    patch = [int(p) for p in patch_size]
    dim = int(kwargs.get("dim", len(patch)))
    if dim not in (2, 3) or len(patch) != dim:
        raise DpunetError(f"--arch {name} exists in 2D and 3D; got dim {dim} with patch size {patch}")
    full = encoder_strides(patch, kwargs.get("strides"))
    divisor = [math.prod(s[a] for s in full) for a in range(dim)]
    sizes = _sizes(patch, full)
    _check_patch(name, patch, divisor, sizes[-1])
    strides, dilations = _dilate(full, output_stride)
    multiple = int(num_groups) if dp_norm == "group" else 1
    spec_kwargs = {"name": name, "dim": dim, "strides": strides, "dilations": dilations,
                   "encoder_channels": _scale(ENCODER_CHANNELS, width, multiple),
                   "blocks_per_stage": [int(b) for b in blocks_per_stage], "dp_norm": dp_norm,
                   "num_groups": int(num_groups), "required_divisor": divisor}
    spec_kwargs.update(_family_kwargs(name, width, multiple, _sizes(patch, strides), output_stride))
    if output_stride != entry.output_stride:
        _warn_if_same_network(name, plan_arch, patch, width, dp_norm, num_groups, blocks_per_stage, output_stride,
                              spec_kwargs)
    return {"class_name": entry.class_name, "kwargs": spec_kwargs, "preset": name, "width_multiplier": float(width)}


def _warn_if_same_network(name: str, plan_arch: dict[str, Any], patch: list[int], width: float, dp_norm: str,
                          num_groups: int, blocks_per_stage: Sequence[int], output_stride: int | None,
                          kwargs: dict[str, Any]) -> None:
    # a patch the encoder reduces by 8 at most has no stride to trade for dilation at either output stride (the
    # hippocampus plans): say so rather than let a run believe it tested the other stride
    default = classic_spec(name, plan_arch, patch, width, dp_norm, num_groups, blocks_per_stage)["kwargs"]
    if {**default, "output_stride": None} == {**kwargs, "output_stride": None}:
        warn(f"--output-stride {output_stride} builds the same --arch {name} as its default "
             f"{CLASSIC_ARCHITECTURES[name].output_stride} for the patch {patch}: the encoder reduces it by "
             f"{kwargs['required_divisor']} in all, so no stride is traded for dilation")


def _register() -> None:
    # build_network finds the classic specs (plans, release files) through the registry's table
    from dpunet.architectures.registry import NETWORK_CLASSES

    for entry in CLASSIC_ARCHITECTURES.values():
        NETWORK_CLASSES[entry.class_name] = entry.network


_register()
