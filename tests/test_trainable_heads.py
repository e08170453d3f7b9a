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
from dpunet.utils.errors import DpunetError

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


def _weight_layers(net: nn.Module) -> set[str]:
    return {n for n, m in net.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


@pytest.mark.parametrize("name", ["unet", "resenc_scalenorm"] + sorted(CLASSIC_ARCHITECTURES))
def test_decoder_subset_freezes_the_weights_a_forward_runs_first(name):
    """Oracle: a forward runs the encoder before anything else, so the frozen weight layers must be exactly a
    prefix of the execution order, and the trained ones the rest."""
    torch.manual_seed(0)
    spec = apply_preset(plan_arch(2), name, 0.125, [32, 32])
    net = build_network(spec, 1, NUM_CLASSES, False)
    layers = _weight_layers(net)
    executed: list[str] = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: executed.append(n))
               for n, m in net.named_modules() if n in layers]
    with torch.no_grad():
        net(torch.randn(1, 1, 32, 32))
    for h in handles:
        h.remove()
    order = list(dict.fromkeys(executed))
    assert set(order) == layers
    trained = select_trainable(net, "decoder")
    frozen = [n for n in order if not net.get_submodule(n).weight.requires_grad]
    assert frozen and frozen == order[:len(frozen)]
    assert all(p.requires_grad for n, p in net.named_parameters() if n.endswith(".bias"))
    assert 0.05 * sum(p.numel() for p in net.parameters()) < trained < sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", ["segresnet", "monai_unet"])
def test_decoder_subset_refuses_networks_without_an_encoder_module(name):
    spec = apply_preset(plan_arch(2), name, 0.125, [32, 32])
    net = build_network(spec, 1, NUM_CLASSES, False)
    with pytest.raises(DpunetError, match="--trainable decoder needs a network with an 'encoder' submodule"):
        select_trainable(net, "decoder")


@pytest.mark.parametrize("name", ["unet", "dynunet", "segresnet", "deeplabv3plus"])
def test_head_subset_trains_exactly_the_executed_class_outputs(name):
    """`--trainable head` / `--probe-trainable head`: weights and biases of the class-output layers, nothing else."""
    torch.manual_seed(0)
    spec = apply_preset(plan_arch(2), name, 0.125, [32, 32])
    patch = spec.get("patch_size") or [32, 32]
    deep_supervision = name in ("unet", "dynunet")
    net = build_network(spec, 1, NUM_CLASSES, deep_supervision)
    executed = _executed_class_convs(net, torch.randn(1, 1, *patch))
    expected = set(executed) if deep_supervision else {executed[-1]}
    trained = select_trainable(net, "head")
    owners = {n for n, m in net.named_modules() for p in m.parameters(recurse=False) if p.requires_grad}
    assert owners == expected
    assert trained == sum(p.numel() for n in expected for p in net.get_submodule(n).parameters(recurse=False))
