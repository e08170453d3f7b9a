"""Named architecture variants (`--arch NAME`): each one changes one axis of the planned network.

A preset keeps the plan's topology (stages, kernels, strides, convs per stage, features) and sets the
architecture axes of the design brief (section 5). Every preset except "planned" starts from the same
baseline (plain U-Net, GroupNorm(8), LeakyReLU(0.01), strided-conv down-sampling, transposed-conv
up-sampling, no weight standardisation) and changes what its name says, so that comparing a preset with
"unet" isolates that axis.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

from dpunet.architectures.classic_nets import (CLASSIC_ARCHITECTURES, DEFAULT_ENCODER_DEPTH, classic_encoder_options,
                                               classic_spec)
from dpunet.architectures.monai_nets import (MONAI_ARCHITECTURES, MONAI_CLASS_NAME, monai_deep_supervision_outputs,
                                          monai_spec)
from dpunet.utils.errors import DpunetError

BASELINE_AXES: dict[str, Any] = {
    "norm": "GroupNorm",
    "norm_kwargs": {"num_groups": 8, "eps": 1e-5, "affine": True},
    "nonlin": "LeakyReLU",
    "nonlin_kwargs": {"negative_slope": 0.01},
    "downsampling": "strided_conv",
    "upsampling": "transposed_conv",
    "weight_standardization": False,
}

# kwargs only ResidualEncoderUNet understands; dropped when a preset switches to the plain U-Net
RESIDUAL_ONLY_KWARGS = ("scale_norm", "scale_norm_groups")


def _preset(class_name: str | None, description: str, **changes: Any) -> dict[str, Any]:
    kwargs = copy.deepcopy(BASELINE_AXES) if class_name is not None else {}
    kwargs.update(changes)
    return {"class_name": class_name, "kwargs": kwargs, "description": description}


def _gn(groups: int) -> dict[str, Any]:
    return {"num_groups": groups, "eps": 1e-5, "affine": True}


ARCHITECTURE_PRESETS: dict[str, dict[str, Any]] = {
    "planned": _preset(None, "the plan's architecture unchanged (only the width multiplier applies)"),
    "unet": _preset("PlainConvUNet", "baseline: nnU-Net topology with GroupNorm(8) and LeakyReLU"),
    "unet_in": _preset("PlainConvUNet", "norm axis: InstanceNorm (affine, no running stats), nnU-Net's own norm",
                       norm="InstanceNorm", norm_kwargs={"eps": 1e-5, "affine": True}),
    "unet_gn16": _preset("PlainConvUNet", "norm axis: GroupNorm with 16 groups", norm_kwargs=_gn(16)),
    "unet_gn32": _preset("PlainConvUNet", "norm axis: GroupNorm with 32 groups", norm_kwargs=_gn(32)),
    "unet_ws": _preset("PlainConvUNet", "weight-standardised convolutions (with GroupNorm(8))",
                       weight_standardization=True),
    "unet_mish": _preset("PlainConvUNet", "activation axis: Mish (smooth)", nonlin="Mish", nonlin_kwargs={}),
    "unet_selu": _preset("PlainConvUNet", "activation axis: SELU (smooth, self-normalising)",
                         nonlin="SELU", nonlin_kwargs={}),
    "unet_maxpool": _preset("PlainConvUNet", "down-sampling axis: max pooling, then stride-1 convs",
                            downsampling="maxpool"),
    "unet_selu_maxpool": _preset("PlainConvUNet", "SmoothNet-inspired pair: SELU and max pooling",
                                 nonlin="SELU", nonlin_kwargs={}, downsampling="maxpool"),
    "unet_nearest": _preset("PlainConvUNet", "up-sampling axis: nearest up-sampling + 1x1 conv",
                            upsampling="nearest_conv"),
    "resenc": _preset("ResidualEncoderUNet", "residual encoder without ScaleNorm (ablation of resenc_scalenorm)",
                      scale_norm=False),
    "resenc_scalenorm": _preset("ResidualEncoderUNet", "residual encoder with ScaleNorm after each residual "
                                "addition and skip concatenation (Klause et al. 2022)", scale_norm=True),
}


def _convs_to_blocks(n_conv: list[int]) -> list[int]:
    # a residual block holds two convs: keep the number of encoder convs (not blocks) comparable
    return [max(1, math.ceil(int(c) / 2)) for c in n_conv]


def _blocks_to_convs(n_blocks: list[int]) -> list[int]:
    return [2 * int(b) for b in n_blocks]


def scale_features(features: list[int], width_multiplier: float, divisor: int) -> list[int]:
    """Features times the multiplier, rounded to a positive multiple of `divisor`."""
    return [max(divisor, int(round(f * width_multiplier / divisor)) * divisor) for f in features]


def architecture_names() -> list[str]:
    """Every `--arch` name: the U-Net presets, the MONAI networks, then the classic families (classic_nets)."""
    return [*ARCHITECTURE_PRESETS, *MONAI_ARCHITECTURES, *CLASSIC_ARCHITECTURES]


def apply_preset(arch_spec: dict[str, Any], preset: str, width_multiplier: float = 1.0,
                 patch_size: Sequence[int] | None = None, image_size: Sequence[float] | None = None,
                 dp_norm: str = "group", num_groups: int = 8, output_stride: int | None = None,
                 encoder_depth: int = DEFAULT_ENCODER_DEPTH) -> dict[str, Any]:
    """A new architecture spec: the planned `arch_spec` with the preset's axes and widened features.

    A MONAI name (dpunet.architectures.monai_nets) gives a "MonaiNet" spec built from the plan's topology and
    `patch_size` (required for those names: some of them are built for one input size); a patch size the
    network cannot take is adapted (within `image_size`, the configuration's median image size, when given)
    and the spec's "patch_size" says which one it is built for (`configuration_for_arch`).
    `dp_norm` ("group" or "instance") and `num_groups` choose the per-sample norm that replaces BatchNorm in
    the converted networks (MONAI, classic families); dpunet's U-Nets choose their norm by preset name and
    refuse other values. `output_stride` (8 or 16; None: the family's own) and `encoder_depth` (18 or 34)
    shape the classic families' encoder (`classic_encoder_options`); every other name refuses them.

    Switching between the plain and the residual U-Net maps convs per stage to residual blocks per stage
    (ceil(convs/2); a block holds two convs) and back (2 per block). The features are multiplied by
    `width_multiplier` and kept divisible by GroupNorm's group count. The result records "preset" and
    "width_multiplier" next to class_name and kwargs."""
    if preset not in architecture_names():
        raise DpunetError(f"unknown architecture {preset!r}; known: {', '.join(architecture_names())}")
    if not isinstance(arch_spec, dict) or "class_name" not in arch_spec or "kwargs" not in arch_spec:
        raise DpunetError(f"architecture spec must have 'class_name' and 'kwargs', got {arch_spec!r}")
    if not (isinstance(width_multiplier, (int, float)) and math.isfinite(width_multiplier) and width_multiplier > 0):
        raise DpunetError(f"width multiplier must be a positive number, got {width_multiplier!r}")
    output_stride, blocks = classic_encoder_options(preset, output_stride, encoder_depth)
    if preset in MONAI_ARCHITECTURES:
        return monai_spec(preset, arch_spec, patch_size, float(width_multiplier), dp_norm, num_groups,
                          image_size=image_size)

    if preset in CLASSIC_ARCHITECTURES:  # DeepLabV3+, FPN, PSPNet, LinkNet: built for the plan's patch size
        return classic_spec(preset, arch_spec, patch_size, float(width_multiplier), dp_norm, num_groups, blocks,
                            output_stride)

    if (dp_norm, int(num_groups)) != ("group", 8):
        raise DpunetError(f"--dp-norm/--norm-groups choose the norm that replaces BatchNorm in converted networks "
                          f"(MONAI, classic families); --arch {preset} is a dpunet U-Net, whose norm is chosen by "
                          f"name (e.g. unet_in: InstanceNorm, unet_gn16/unet_gn32: GroupNorm with 16/32 groups)")
    entry = ARCHITECTURE_PRESETS[preset]
    old_class = arch_spec["class_name"]
    new_class = entry["class_name"] or old_class
    kwargs = copy.deepcopy(arch_spec["kwargs"])
    if old_class != new_class:
        if "n_conv_per_stage" in kwargs:
            if new_class == "ResidualEncoderUNet":
                kwargs["n_conv_per_stage"] = _convs_to_blocks(kwargs["n_conv_per_stage"])
            elif old_class == "ResidualEncoderUNet":
                kwargs["n_conv_per_stage"] = _blocks_to_convs(kwargs["n_conv_per_stage"])
        if new_class != "ResidualEncoderUNet":
            for k in RESIDUAL_ONLY_KWARGS:
                kwargs.pop(k, None)
    kwargs.update(copy.deepcopy(entry["kwargs"]))

    if width_multiplier != 1.0:
        if "features_per_stage" not in kwargs:
            raise DpunetError("architecture spec has no features_per_stage to scale")
        divisor = int(kwargs.get("norm_kwargs", {}).get("num_groups", 8)) if kwargs.get(
            "norm", "GroupNorm") == "GroupNorm" else 1
        kwargs["features_per_stage"] = scale_features(kwargs["features_per_stage"], width_multiplier, divisor)
    return {"class_name": new_class, "kwargs": kwargs, "preset": preset, "width_multiplier": float(width_multiplier)}


def configuration_image_size(plan_config: dict[str, Any]) -> list[float] | None:
    """The median image size of a plan configuration in its patch's axes (2D: the last two), when recorded."""
    median = plan_config.get("median_shape")
    dim = len(plan_config["patch_size"])
    return None if not median or len(median) < dim else [float(v) for v in median[-dim:]]


def arch_for_configuration(plan_config: dict[str, Any], preset: str, width_multiplier: float = 1.0,
                           dp_norm: str = "group", num_groups: int = 8, output_stride: int | None = None,
                           encoder_depth: int = DEFAULT_ENCODER_DEPTH) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture spec, plan configuration it trains and predicts with) of `preset` for a plan
    configuration: the configuration is `plan_config` itself, or a copy with the spec's adapted patch size
    (`configuration_for_arch`)."""
    spec = apply_preset(plan_config["architecture"], preset, width_multiplier, plan_config["patch_size"],
                        configuration_image_size(plan_config), dp_norm, num_groups, output_stride, encoder_depth)
    return spec, configuration_for_arch(plan_config, spec)


def configuration_for_arch(plan_config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """`plan_config` when the spec is built for its patch size, else a copy for the spec's "patch_size":
    the patch, the augmentation's patch (its source patch is recomputed from it when the sampler starts) and
    the memory model's patients per micro-batch (activations grow with the voxels of a patch: the plan's
    number scaled down by the voxel ratio, at least 1; never scaled up). It records "patch_size_planned"."""
    patch = spec.get("patch_size")
    planned = [int(p) for p in plan_config["patch_size"]]
    if patch is None or [int(p) for p in patch] == planned:
        return plan_config
    patch = [int(p) for p in patch]
    config = copy.deepcopy(plan_config)
    config["patch_size"] = patch
    config["patch_size_planned"] = planned
    if isinstance(config.get("augmentation"), dict):
        config["augmentation"]["patch_size"] = patch
        config["augmentation"].pop("source_patch_size", None)
    if config.get("patients_per_micro_batch"):
        ratio = math.prod(planned) / math.prod(patch)
        per_micro = max(1, min(int(config["patients_per_micro_batch"]),
                               int(config["patients_per_micro_batch"] * ratio)))
        config["patients_per_micro_batch"] = per_micro
        if config.get("batch_size") and config.get("dp"):
            config["batch_size"] = per_micro * int(config["dp"]["patches_per_patient"])
    return config


def supervision_levels(spec: dict[str, Any], deep_supervision: bool, dim: int) -> tuple[int, list[list[int]]]:
    """(outputs the network built from `spec` gives in training, per-stage strides whose cumulative products
    down-sample the targets, for `downsample_seg_for_deep_supervision(seg, strides, outputs)`).

    dpunet's U-Nets with deep supervision: n_stages - 1 outputs at the plan's strides. DynUNet (MONAI): the
    same number of outputs, every one at full resolution (MONAI interpolates its heads up), so unit strides.
    Without deep supervision: one full-resolution output."""
    ones = [1] * int(dim)
    if not deep_supervision:
        return 1, [ones, ones]
    if spec.get("class_name") == MONAI_CLASS_NAME:
        n = monai_deep_supervision_outputs(spec)
        return n, [ones] * (n + 1)
    strides = [[int(v) for v in s] for s in spec["kwargs"]["strides"]]
    return len(strides) - 1, strides
