"""Segmentation networks built from plan data, their named variants, and DP fitness checks.

    net = build_network(plans["configurations"]["2d"]["architecture"], in_channels, num_classes, True)
    spec = apply_preset(planned_spec, "resenc_scalenorm", width_multiplier=2.0)
"""
from dpunet.architectures.registry import NETWORK_CLASSES, build_network, count_parameters, validate_for_dp
from dpunet.architectures.dp_conversion import make_dp_compatible
from dpunet.architectures.monai_nets import MONAI_ARCHITECTURES, MonaiNet, is_monai_arch, monai_has_deep_supervision
from dpunet.architectures.presets import (ARCHITECTURE_PRESETS, BASELINE_AXES, apply_preset, arch_for_configuration,
                                         architecture_names, configuration_for_arch, supervision_levels)
from dpunet.architectures.trainable import TRAINABLE_SUBSETS, select_trainable
from dpunet.architectures.unet import PlainConvUNet, ResidualEncoderUNet, UNetBase, UNetConfig, output_shapes

__all__ = [
    "ARCHITECTURE_PRESETS",
    "BASELINE_AXES",
    "MONAI_ARCHITECTURES",
    "MonaiNet",
    "NETWORK_CLASSES",
    "PlainConvUNet",
    "ResidualEncoderUNet",
    "TRAINABLE_SUBSETS",
    "UNetBase",
    "UNetConfig",
    "apply_preset",
    "arch_for_configuration",
    "architecture_names",
    "is_monai_arch",
    "make_dp_compatible",
    "monai_has_deep_supervision",
    "select_trainable",
    "supervision_levels",
    "build_network",
    "configuration_for_arch",
    "count_parameters",
    "output_shapes",
    "validate_for_dp",
]
