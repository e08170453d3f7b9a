"""`--trainable bias_norm_head` on the MONAI networks and the classic families: besides biases and norms, the
final classifier (DynUNet: every deep-supervision head too) is trained, and no other weight.

Oracle: the head is found here from a real forward, as the last convolution executed that outputs the classes
(the implementation reads the modules' registration order instead)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpunet.architectures import apply_preset, build_network, select_trainable
from dpunet.architectures.classic_nets import CLASSIC_ARCHITECTURES
from dpunet.architectures.monai_nets import MONAI_ARCHITECTURES
from dpunet.architectures.trainable import NORM_TYPES, head_module_names

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("single_thread")]
NUM_CLASSES = 3
NAMES = sorted(MONAI_ARCHITECTURES) + sorted(CLASSIC_ARCHITECTURES)


def plan_arch(dim: int) -> dict:
    return {"class_name": "PlainConvUNet", "kwargs": {
        "dim": dim, "n_stages": 3, "features_per_stage": [16, 32, 64], "kernel_sizes": [[3] * dim] * 3,
        "strides": [[1] * dim, [2] * dim, [2] * dim], "n_conv_per_stage": [2] * 3,
        "n_conv_per_stage_decoder": [2] * 2}}


def _executed_class_convs(net: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers with NUM_CLASSES outputs, in the order a training forward runs them."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: order.append(n))
               for n, m in net.named_modules()
               if getattr(m, "out_channels", getattr(m, "out_features", None)) == NUM_CLASSES
               and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    with torch.no_grad():
        net.train()(x)
    for h in handles:
        h.remove()
    return order


@pytest.mark.parametrize("name", NAMES)
def test_bias_norm_head_trains_the_final_classifier_and_no_other_weight(name):
    dim = 3 if name == "vnet" else 2
    torch.manual_seed(0)
    spec = apply_preset(plan_arch(dim), name, 0.125, [16] * dim if dim == 3 else [32, 32])
    patch = spec.get("patch_size") or ([16] * dim if dim == 3 else [32, 32])
    deep_supervision = name == "dynunet"
    net = build_network(spec, 1, NUM_CLASSES, deep_supervision)
    executed = _executed_class_convs(net, torch.randn(1, 1, *patch))
    expected_heads = set(executed) if deep_supervision else {executed[-1]}
    if deep_supervision:
        assert len(expected_heads) >= 2  # the output block and at least one deep-supervision head
    trained = select_trainable(net, "bias_norm_head")
    total = sum(p.numel() for p in net.parameters())
    assert 0 < trained < total
    trained_weights = {n for n, m in net.named_modules() for pn, p in m.named_parameters(recurse=False)
                       if p.requires_grad and pn != "bias" and not isinstance(m, NORM_TYPES)
                       and not type(m).__name__.endswith("Norm")}
    assert trained_weights == expected_heads
    assert expected_heads <= head_module_names(net)
