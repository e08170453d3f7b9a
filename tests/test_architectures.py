"""Networks built from plan data: shapes, DP fitness, per-sample gradients (torch.func and Opacus) against a
per-sample loop, independence of samples, presets, and that a network actually learns."""
from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dpunet.architectures import (
    ARCHITECTURE_PRESETS,
    apply_preset,
    build_network,
    count_parameters,
    select_trainable,
    validate_for_dp,
)
from dpunet.architectures.building_blocks import NearestUpsample, WSConv2d, clipped_num_groups
from dpunet.learning.loss import SegmentationLoss, downsample_seg_for_deep_supervision
from dpunet.utils.errors import DpunetError
from tests.conftest import shared_path

PRESETS = list(ARCHITECTURE_PRESETS)
NUM_CLASSES = 3


def small_spec(dim: int, features=(4, 8, 16)) -> dict:
    n = len(features)
    return {"class_name": "PlainConvUNet", "kwargs": {
        "dim": dim, "n_stages": n, "features_per_stage": list(features),
        "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
        "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1)}}


def small_net(preset: str, dim: int, deep_supervision: bool = True, in_channels: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(apply_preset(small_spec(dim), preset), in_channels, NUM_CLASSES, deep_supervision)


def flat_grad_rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b))
    den = math.sqrt(sum(float((b[k] ** 2).sum()) for k in b))
    return num / den


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_with_expected_outputs_and_passes_dp_checks(preset, dim):
    from opacus.validators import ModuleValidator

    net = small_net(preset, dim)
    x = torch.randn(2, 2, *[16] * dim)
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 2  # n_stages - 1, highest resolution first
    assert [tuple(o.shape) for o in outputs] == [(2, NUM_CLASSES, *[16] * dim), (2, NUM_CLASSES, *[8] * dim)]
    assert ModuleValidator.validate(net, strict=False) == []
    assert validate_for_dp(net) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    assert len(list(net.buffers())) == 0
    # without deep supervision: one tensor at the input's resolution; the spec is plain JSON
    single = small_net(preset, dim, deep_supervision=False)
    assert tuple(single(x).shape) == (2, NUM_CLASSES, *[16] * dim)
    json.dumps(apply_preset(small_spec(dim), preset))


def test_output_sizes_follow_cumulative_anisotropic_strides():
    spec = {"class_name": "PlainConvUNet", "kwargs": {
        "dim": 3, "n_stages": 4, "features_per_stage": [4, 8, 8, 16],
        "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
        "n_conv_per_stage": [1, 1, 1, 1], "n_conv_per_stage_decoder": [1, 1, 1]}}
    net = build_network(spec, 1, 2, True)
    outputs = net(torch.randn(1, 1, 4, 24, 16))
    assert [tuple(o.shape[2:]) for o in outputs] == [(4, 24, 16), (4, 12, 8), (2, 6, 4)]
    assert net.output_strides == [[1, 1, 1], [1, 2, 2], [2, 4, 4]]
    targets = downsample_seg_for_deep_supervision(torch.zeros(1, 1, 4, 24, 16), spec["kwargs"]["strides"])
    assert [t.shape[2:] for t in targets] == [o.shape[2:] for o in outputs]
    with pytest.raises(DpunetError, match="not divisible"):
        net(torch.randn(1, 1, 4, 20, 16))


@pytest.mark.parametrize("preset,dim", [(p, 2) for p in PRESETS] + [("unet", 3), ("unet_in", 3),
                                                                       ("resenc_scalenorm", 3)])
def test_vmap_per_patient_gradients_equal_a_loop(preset, dim):
    """functional_call + vmap + grad over patients, each with K patches, equals one backward per patient."""
    B, K = 3, 2
    net = small_net(preset, dim, in_channels=1).double()
    loss = SegmentationLoss(NUM_CLASSES, ignore_label=NUM_CLASSES)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, K, 1, *[16] * dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES + 1, (B, K, 1, *[16] * dim), generator=g)
    ys = downsample_seg_for_deep_supervision(y, net.cfg.strides)
    params = {k: p.detach() for k, p in net.named_parameters()}

    def patient_loss(p, xb, yb):
        return loss(functional_call(net, p, (xb,)), yb).mean()

    per_patient = vmap(grad(patient_loss), in_dims=(None, 0, 0))(params, x, ys)
    for b in range(B):
        net.zero_grad()
        patient_loss(dict(net.named_parameters()), x[b], [t[b] for t in ys]).backward()
        loop = {k: p.grad for k, p in net.named_parameters()}
        assert flat_grad_rel_error({k: v[b] for k, v in per_patient.items()}, loop) < 1e-9


@pytest.mark.parametrize("preset", PRESETS)
def test_opacus_grad_sample_module_gives_per_sample_gradients(preset):
    from opacus import GradSampleModule

    net = small_net(preset, 2, in_channels=1).double()
    loss = SegmentationLoss(NUM_CLASSES, ignore_label=None)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64)
    ys = downsample_seg_for_deep_supervision(torch.randint(0, NUM_CLASSES, (3, 1, 16, 16), generator=g),
                                             net.cfg.strides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(net, loss_reduction="sum")
    loss(gsm(x), ys).sum().backward()
    samples = {k: p.grad_sample.detach().clone() for k, p in net.named_parameters()}
    gsm._close()
    for i in range(3):
        net.zero_grad()
        loss(net(x[i:i + 1]), [t[i:i + 1] for t in ys]).sum().backward()
        loop = {k: p.grad for k, p in net.named_parameters()}
        assert flat_grad_rel_error({k: v[i] for k, v in samples.items()}, loop) < 1e-9


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_output_of_a_sample_depends_on_that_sample_only(preset, dim):
    net = small_net(preset, dim)
    x = torch.randn(3, 2, *[16] * dim, requires_grad=True)
    outputs = net(x)
    (g,) = torch.autograd.grad(sum(o[0].sum() for o in outputs), x)
    assert torch.count_nonzero(g[1:]) == 0 and torch.count_nonzero(g[0]) > 0
    with torch.no_grad():
        changed = x.detach().clone()
        changed[1:] = torch.randn_like(changed[1:]) * 5
        torch.testing.assert_close(net(changed)[0][0], outputs[0][0].detach(), rtol=1e-5, atol=1e-6)


def test_plain_unet_matches_nnunet_reference_plan_parameter_count():
    """The nnU-Net v2 3d_fullres plan for Task04, rebuilt; parameters counted by an independent formula."""
    plans = json.loads(shared_path("reference", "nnunetv2_Task04_Hippocampus", "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    ak = cfg["architecture"]["arch_kwargs"]
    spec = {"class_name": "PlainConvUNet", "kwargs": {
        "dim": 3, "n_stages": ak["n_stages"], "features_per_stage": ak["features_per_stage"],
        "kernel_sizes": ak["kernel_sizes"], "strides": ak["strides"], "n_conv_per_stage": ak["n_conv_per_stage"],
        "n_conv_per_stage_decoder": ak["n_conv_per_stage_decoder"], "conv_bias": ak["conv_bias"],
        "norm": "InstanceNorm", "norm_kwargs": {"eps": 1e-5, "affine": True}}}
    net = build_network(spec, 1, 3, True)

    f, k, s, n = ak["features_per_stage"], ak["kernel_sizes"], ak["strides"], ak["n_stages"]
    conv = lambda i, o, ks: i * o * int(np.prod(ks)) + o + 2 * o  # weight + bias + InstanceNorm affine
    expected, prev = 0, 1
    for st in range(n):
        for c in range(ak["n_conv_per_stage"][st]):
            expected += conv(prev if c == 0 else f[st], f[st], k[st])
        prev = f[st]
    for d in range(1, n):
        below, skip = f[n - d], f[n - d - 1]
        expected += below * skip * int(np.prod(s[n - d])) + skip  # transposed conv
        for c in range(ak["n_conv_per_stage_decoder"][d - 1]):
            expected += conv(2 * skip if c == 0 else skip, skip, k[n - d - 1])
        expected += skip * 3 + 3  # 1x1 head
    assert count_parameters(net) == expected

    # the plan's patch goes through (a narrow copy, to stay fast) with the expected output sizes
    narrow = build_network(apply_preset(spec, "planned", width_multiplier=0.125), 1, 3, True)
    outputs = narrow(torch.randn(1, 1, *cfg["patch_size"]))
    assert [list(o.shape[2:]) for o in outputs] == [[p // (2 ** i) for p in cfg["patch_size"]] for i in range(3)]


def test_group_norm_groups_are_clipped_to_divide_channels():
    assert [clipped_num_groups(c, 8) for c in (4, 8, 12, 20, 7, 64)] == [4, 8, 6, 5, 7, 8]
    net = small_net("unet_gn32", 2)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert {(m.num_channels, m.num_groups) for m in norms} >= {(4, 4), (8, 8), (16, 16)}


def test_preset_axes_are_present_in_the_built_networks():
    def types(preset):
        return {type(m) for m in small_net(preset, 2).modules()}

    assert nn.InstanceNorm2d in types("unet_in") and nn.GroupNorm not in types("unet_in")
    assert WSConv2d in types("unet_ws") and WSConv2d not in types("unet")
    assert nn.Mish in types("unet_mish") and nn.LeakyReLU not in types("unet_mish")
    assert {nn.SELU, nn.MaxPool2d} <= types("unet_selu_maxpool")
    assert NearestUpsample in types("unet_nearest") and nn.ConvTranspose2d not in types("unet_nearest")
    # max pooling replaces strided convs
    assert all(m.stride == (1, 1) for m in small_net("unet_maxpool", 2).modules() if isinstance(m, nn.Conv2d))
    # ScaleNorm: a GroupNorm after every residual addition and every skip concatenation
    resenc_sn, resenc = small_net("resenc_scalenorm", 2), small_net("resenc", 2)
    blocks = [m for m in resenc_sn.encoder.modules() if hasattr(m, "scale_norm")]
    assert blocks and all(isinstance(b.scale_norm, nn.GroupNorm) for b in blocks)
    assert all(isinstance(n, nn.GroupNorm) and n.num_channels == 2 * f
               for n, f in zip(resenc_sn.decoder.concat_norms, [8, 4]))
    assert all(isinstance(n, nn.Identity) for n in resenc.decoder.concat_norms)
    assert not any(isinstance(m, nn.GroupNorm) for b in resenc.encoder.modules() if hasattr(b, "scale_norm")
                   for m in b.scale_norm.modules())


def test_weight_standardised_conv_uses_standardised_weights():
    conv = WSConv2d(3, 5, 3, padding=1, ws_eps=1e-12)
    x = torch.randn(2, 3, 8, 8)
    w = conv.weight.detach().numpy().reshape(5, -1)
    w_std = ((w - w.mean(1, keepdims=True)) / np.sqrt(w.var(1, keepdims=True) + conv.ws_eps)).reshape(5, 3, 3, 3)
    expected = F.conv2d(x, torch.from_numpy(w_std), conv.bias.detach(), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    # scaling a filter does not change the output: the point of standardisation
    with torch.no_grad():
        conv.weight.mul_(7.0)
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)


def test_apply_preset_and_width_multiplier():
    planned = small_spec(2, features=(32, 64, 128))
    before = copy.deepcopy(planned)
    wide = apply_preset(planned, "unet_gn16", width_multiplier=1.5)
    assert planned == before  # a new spec, the input untouched
    assert wide["kwargs"]["features_per_stage"] == [48, 96, 192]
    assert all(f % 16 == 0 for f in wide["kwargs"]["features_per_stage"])
    assert apply_preset(planned, "unet", 0.3)["kwargs"]["features_per_stage"] == [8, 16, 40]
    assert apply_preset(planned, "unet_in", 0.3)["kwargs"]["features_per_stage"] == [10, 19, 38]
    assert wide["preset"] == "unet_gn16" and wide["width_multiplier"] == 1.5
    # plain <-> residual: two convs make one residual block
    res = apply_preset(planned, "resenc_scalenorm")
    assert res["class_name"] == "ResidualEncoderUNet" and res["kwargs"]["n_conv_per_stage"] == [1, 1, 1]
    back = apply_preset(res, "unet")
    assert back["kwargs"]["n_conv_per_stage"] == [2, 2, 2] and "scale_norm" not in back["kwargs"]
    assert apply_preset(res, "planned")["class_name"] == "ResidualEncoderUNet"
    build_network(back, 1, 2, True)
    with pytest.raises(DpunetError, match="unet_ws"):
        apply_preset(planned, "no_such_preset")
    with pytest.raises(DpunetError, match="width multiplier"):
        apply_preset(planned, "unet", width_multiplier=0)


def test_bad_specs_raise_user_errors():
    spec = small_spec(2)
    with pytest.raises(DpunetError, match="PlainConvUNet"):
        build_network({**spec, "class_name": "Nope"}, 1, 2, True)
    for change, match in [({"norm": "BatchNorm"}, "BatchNorm"), ({"nonlin_kwargs": {"inplace": True}}, "in-place"),
                          ({"strides": [[2, 2], [2, 2], [2, 2]]}, "strides\\[0\\]"),
                          ({"features_per_stage": [4, 8]}, "features_per_stage"), ({"colour": 1}, "unknown"),
                          ({"downsampling": "avgpool"}, "downsampling")]:
        with pytest.raises(DpunetError, match=match):
            build_network({"class_name": "PlainConvUNet", "kwargs": {**spec["kwargs"], **change}}, 1, 2, True)
    no_ds = build_network(spec, 1, 2, False)
    with pytest.raises(DpunetError, match="deep-supervision"):
        no_ds.deep_supervision = True


def test_validate_for_dp_flags_unfit_models():
    bad = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    problems = "\n".join(validate_for_dp(bad.eval()))
    assert "BatchNorm2d" in problems and "in-place" in problems and "running statistics" in problems
    assert "opacus" in problems
    assert not bad.training  # the mode is restored


def test_deep_supervision_switch_gives_the_full_resolution_output():
    net = small_net("unet", 2)
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        full = net(x)[0]
        net.deep_supervision = False
        torch.testing.assert_close(net(x), full)


def _disc_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    cy, cx = torch.randint(8, 24, (2, n, 1, 1), generator=g)
    r = torch.randint(4, 8, (n, 1, 1), generator=g)
    label = (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2).long().unsqueeze(1)
    return label.float() + 0.7 * torch.randn(n, 1, 32, 32, generator=g), label


def test_network_and_loss_learn_a_synthetic_segmentation():
    """30 SGD steps on noisy discs: the loss on a held-out batch drops and the discs are found."""
    torch.manual_seed(0)
    net = build_network(apply_preset(small_spec(2), "unet"), 1, 2, True)
    loss = SegmentationLoss(2, ignore_label=None)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    x_val, y_val = _disc_batch(8, g)
    ys_val = downsample_seg_for_deep_supervision(y_val, net.cfg.strides)
    with torch.no_grad():
        before = loss(net(x_val), ys_val).mean().item()
    for _ in range(30):
        x, y = _disc_batch(4, g)
        step_loss = loss(net(x), downsample_seg_for_deep_supervision(y, net.cfg.strides)).mean()
        opt.zero_grad()
        step_loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss(net(x_val), ys_val).mean().item()
        pred = net(x_val)[0].argmax(1)
    dice = 2 * ((pred == 1) & (y_val[:, 0] == 1)).sum().item() / ((pred == 1).sum().item() + y_val.sum().item())
    assert after < 0.4 * before
    assert dice > 0.7


@pytest.mark.parametrize("preset", ["unet", "unet_ws", "resenc_scalenorm", "unet_nearest"])
def test_bias_norm_head_subset_trains_biases_norms_and_heads_only(preset):
    model = small_net(preset, 2)
    trained = select_trainable(model, "bias_norm_head")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            is_norm = "norm" in type(module).__name__.lower()
            expected = pname == "bias" or is_norm or name.startswith("decoder.heads.")
            assert (full in names) == expected, full
    assert any(n.startswith("decoder.heads.") and n.endswith("weight") for n in names)
    assert trained < 0.2 * sum(p.numel() for p in model.parameters())
    assert select_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown trainable subset"):
        select_trainable(model, "everything")
