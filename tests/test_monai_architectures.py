"""MONAI networks under `--arch NAME` (issue 11, first slice): each builds in its dimensions from a plan, is
fit for DP after the one conversion (no BatchNorm, no running statistics, no in-place modules), the per-patient
clipped sums of the functorch engine equal the per-patient reference loop, and a MONAI network trains end to
end and is rebuilt from its release file. Tiny widths and patches keep the file fast."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dpunet.architectures import (MONAI_ARCHITECTURES, MonaiNet, apply_preset, arch_for_configuration,
                                  build_network, count_parameters, validate_for_dp)
from dpunet.architectures.monai_nets import adapt_patch_size
from dpunet.architectures.dp_conversion import largest_divisor_at_most, make_dp_compatible
from dpunet.privacy.engines import PatientBatch, make_engine
from dpunet.training.loss import SegmentationLoss
from dpunet.utils.errors import DpunetError
from tests.conftest import plan_synthetic_task
from tests.test_engines import assert_close

NUM_CLASSES = 3

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("single_thread")]



def plan_arch(dim: int) -> dict:
    """A small planned U-Net entry: anisotropic first stride in 3D, as the planner makes for thick slices."""
    kernels = [[3, 3]] * 3 if dim == 2 else [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1], [2, 2], [2, 2]] if dim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    return {"class_name": "PlainConvUNet", "kwargs": {
        "dim": dim, "n_stages": 3, "features_per_stage": [16, 32, 64], "kernel_sizes": kernels,
        "strides": strides, "n_conv_per_stage": [2] * 3, "n_conv_per_stage_decoder": [2] * 2}}


# (name, dim) -> (patch, width): the smallest patch the architecture's divisibility allows, tiny widths
CASES = {
    ("monai_unet", 2): ([16, 16], 0.25), ("monai_unet", 3): ([8, 16, 16], 0.25),
    ("basic_unet", 2): ([32, 32], 0.125), ("basic_unet", 3): ([32, 32, 32], 0.0625),
    ("unetpp", 2): ([32, 32], 0.125), ("unetpp", 3): ([32, 32, 32], 0.0625),
    ("attention_unet", 2): ([16, 16], 0.25), ("attention_unet", 3): ([8, 16, 16], 0.25),
    ("segresnet", 2): ([16, 16], 0.5), ("segresnet", 3): ([16, 16, 16], 0.5),
    ("dynunet", 2): ([16, 16], 0.25), ("dynunet", 3): ([8, 16, 16], 0.25),
    ("vnet", 3): ([32, 32, 32], 1.0),
    ("unetr", 2): ([32, 32], 0.0625), ("unetr", 3): ([32, 32, 32], 0.0625),
    ("flexible_unet", 2): ([64, 64], 0.125), ("flexible_unet", 3): ([64, 64, 64], 0.125),
    ("swin_unetr", 2): ([64, 32], 0.5), ("swin_unetr", 3): ([64, 32, 32], 0.5),
}


def build(name: str, dim: int, dtype=torch.float32) -> tuple[nn.Module, list[int]]:
    patch, width = CASES[(name, dim)]
    torch.manual_seed(0)
    spec = apply_preset(plan_arch(dim), name, width, patch)
    return build_network(spec, 1, NUM_CLASSES, False).to(dtype), patch


def test_every_name_has_build_cases_in_its_dims():
    covered = {n for n, _ in CASES}
    assert covered == set(MONAI_ARCHITECTURES)
    for (name, dim) in CASES:
        assert dim in MONAI_ARCHITECTURES[name].dims


@pytest.mark.parametrize("name,dim", sorted(CASES), ids=[f"{n}-{d}d" for n, d in sorted(CASES)])
def test_builds_fit_for_dp_without_batchnorm(name, dim):
    net, patch = build(name, dim)
    assert validate_for_dp(net) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "track_running_stats", False) or getattr(m, "inplace", False) for m in net.modules())
    assert net.deep_supervision is False and count_parameters(net) > 0
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, *patch))
    assert isinstance(out, torch.Tensor) and out.shape == (1, NUM_CLASSES, *patch)


def test_refusals_name_the_constraint():
    with pytest.raises(DpunetError, match="3D only"):
        apply_preset(plan_arch(2), "vnet", 1.0, [32, 32])
    with pytest.raises(DpunetError, match=r"divisible by \[16, 16\].*too small"):
        apply_preset(plan_arch(2), "unetr", 0.0625, [8, 8], image_size=[8, 8])
    with pytest.raises(DpunetError, match="patch size"):
        apply_preset(plan_arch(2), "monai_unet", 1.0)
    with pytest.raises(DpunetError, match="without deep supervision"):
        build_network(apply_preset(plan_arch(2), "monai_unet", 0.25, [16, 16]), 1, NUM_CLASSES, True)


# ------------------------------------------------------------------------------------ patch adaptation
# (patch, divisor, median image size, expected): worked out by hand from the rule (round up within the image,
# else down but not below the divisor; a one-voxel bottleneck grows the axis with the most room up to twice
# the image)
ADAPTATIONS = [
    ([10, 32, 32], [16] * 3, [10, 32, 32], [16, 32, 32]),  # the synthetic 3D task: 10 cannot round down
    ([40, 56, 40], [16] * 3, [36, 50, 35], [32, 48, 32]),  # hippocampus-like: up would leave the image
    ([24, 32], [16, 16], None, [32, 32]),  # no image size known: round up
    ([20, 20], [8, 8], [100, 100], [24, 24]),
    ([33, 64], [32, 32], [40, 64], [32, 64]),
    ([32, 32], [32, 32], [80, 40], [64, 32]),  # one-voxel bottleneck: the axis with room grows
    ([56, 40], [32, 32], [50, 35], [64, 32]),  # hippocampus 2d, SwinUNETR: 64 of 100 = twice 50
    ([10, 32, 32], [32] * 3, [10, 32, 32], [32, 32, 64]),  # tie in room: the last axis grows
    ([16, 16, 16], [16] * 3, None, [16, 16, 32]),
    ([8, 16, 16], [1, 4, 4], [8, 20, 20], [8, 16, 16]),  # already fitting: unchanged
]


@pytest.mark.parametrize("patch,divisor,image,expected", ADAPTATIONS)
def test_patch_adaptation_finds_the_nearest_fitting_patch(patch, divisor, image, expected):
    got, reason = adapt_patch_size("net", patch, divisor, image)
    assert got == expected
    assert all(g % d == 0 and g >= d for g, d in zip(got, divisor))
    assert math.prod(g // d for g, d in zip(got, divisor)) >= 2
    assert (reason == "") == (got == patch)
    if reason:
        assert str(divisor) in reason and str(patch) in reason and str(expected) in reason


def test_the_spec_and_configuration_carry_the_adapted_patch():
    from dpunet.training.augmentation import PatchAugmenter, default_augmentation_params

    config = {"architecture": plan_arch(3), "patch_size": [10, 32, 32], "median_shape": [10.0, 32.0, 32.0],
              "patients_per_micro_batch": 6, "batch_size": 12, "dp": {"patches_per_patient": 2},
              "augmentation": default_augmentation_params([10, 32, 32], 3)}
    spec, adapted = arch_for_configuration(config, "unetr", 0.0625)
    assert spec["patch_size"] == [16, 32, 32] and spec["patch_size_adapted_from"] == [10, 32, 32]
    assert "divisible by [16, 16, 16]" in spec["patch_size_adapted_because"]
    assert spec["kwargs"]["monai_kwargs"]["img_size"] == [16, 32, 32]  # UNETR is built for the adapted patch
    assert adapted["patch_size"] == [16, 32, 32] and adapted["patch_size_planned"] == [10, 32, 32]
    assert config["patch_size"] == [10, 32, 32]  # the plan itself is untouched
    # 6 patients of 10x32x32 patches -> floor(6 * 10 / 16) = 3 of 16x32x32
    assert adapted["patients_per_micro_batch"] == 3 and adapted["batch_size"] == 6
    augmenter = PatchAugmenter(adapted["augmentation"])
    assert augmenter.patch_size == [16, 32, 32]
    assert augmenter.source_size == default_augmentation_params([16, 32, 32], 3)["source_patch_size"]
    # a fitting patch leaves the configuration as it is (the same object)
    spec, same = arch_for_configuration(config, "monai_unet", 0.25)
    assert same is config and spec["patch_size"] == [10, 32, 32] and "patch_size_adapted_from" not in spec


# ------------------------------------------------------------------------------------------- conversion
class _Unfixable(nn.Module):
    """Own parameter and a buffer, no Opacus grad sampler: nothing per-sample can be made of it here."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x):
        return x * (self.weight * self.scale)[None, :, None, None]


def test_conversion_replaces_batchnorm_and_inplace_and_refuses_the_rest():
    net = nn.Sequential(nn.Conv2d(1, 12, 3), nn.BatchNorm2d(12), nn.ReLU(inplace=True), nn.Dropout(0.0),
                        nn.Conv3d(12, 4, 1), nn.InstanceNorm3d(4, track_running_stats=True))
    fixed = make_dp_compatible(net, num_groups=8)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 6 == largest_divisor_at_most(12, 8)
    assert fixed[2].inplace is False and isinstance(fixed[3], nn.Identity)
    assert not fixed[5].track_running_stats and fixed[5].affine
    assert validate_for_dp(fixed) == []
    inst = make_dp_compatible(nn.Sequential(nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4)), norm="instance")
    assert isinstance(inst[1], nn.InstanceNorm3d) and inst[1].affine and not inst[1].track_running_stats
    # a floating-point buffer in a module without an Opacus rule may be a state of the data: refused
    with pytest.raises(DpunetError, match=r"_Unfixable has buffers \(scale\)"):
        make_dp_compatible(nn.Sequential(nn.Conv2d(1, 2, 1), _Unfixable()))


# ------------------------------------------------------------------------ per-patient gradients (float64)
def _batch(patch: list[int], seed: int, patients: int = 2, k: int = 2) -> PatientBatch:
    g = torch.Generator().manual_seed(seed)
    return PatientBatch(torch.randn(patients, k, 1, *patch, generator=g, dtype=torch.float64),
                        [torch.randint(0, NUM_CLASSES, (patients, k, 1, *patch), generator=g)])


ENGINE_CASES = [("monai_unet", 2), ("monai_unet", 3), ("segresnet", 3), ("attention_unet", 2),
                ("basic_unet", 3), ("dynunet", 3), ("swin_unetr", 2)]
SLOW_ENGINE_CASES = {("basic_unet", 3)}  # 15 s on one thread


@pytest.mark.parametrize("name,dim", [pytest.param(n, d, marks=pytest.mark.slow) if (n, d) in SLOW_ENGINE_CASES
                                      else (n, d) for n, d in ENGINE_CASES],
                         ids=[f"{n}-{d}d" for n, d in ENGINE_CASES])
def test_functorch_and_fast_clipped_sums_equal_reference_loop(name, dim):
    net, patch = build(name, dim, torch.float64)
    net.train()
    loss = SegmentationLoss(NUM_CLASSES, patches_per_patient=2)
    batch = _batch(patch, seed=1)
    ref, ref_stats = _summed(net, batch, loss, "reference_loop")
    assert ref_stats.num_clipped == 2  # clipping active
    for engine in ("functorch", "fast"):  # fast: what "auto" picked for every MONAI name it timed
        got, stats = _summed(net, batch, loss, engine)
        assert_close(got, ref)
        assert torch.allclose(stats.grad_norms, ref_stats.grad_norms, rtol=1e-5)


def test_swin_unetr_index_buffers_are_constants_for_fast_and_functorch_and_refused_by_opacus():
    """SwinUNETR's WindowAttention owns the relative position bias table (a parameter) and its index (an
    integer buffer). The index is a constant: validation accepts it for the functorch and fast engines, a DP
    step leaves it as it was, and the opacus_hooks engine (whose functorch fallback refuses modules with
    buffers) is refused by name, before training and when it is built."""
    net, patch = build("swin_unetr", 2, torch.float64)
    assert validate_for_dp(net) == [] == validate_for_dp(net, "fast") == validate_for_dp(net, "functorch")
    problems = validate_for_dp(net, "opacus_hooks")
    assert problems and all("WindowAttention has constant index buffers (relative_position_index)" in p
                            and "--engine fast or functorch" in p for p in problems)
    before = {n: b.clone() for n, b in net.named_buffers()}
    assert before and all(not b.is_floating_point() for b in before.values())
    loss = SegmentationLoss(NUM_CLASSES, patches_per_patient=2)
    batch = _batch(patch, seed=4)
    _summed(net.train(), batch, loss, "fast")
    assert all(torch.equal(before[n], b) for n, b in net.named_buffers())
    with pytest.raises(ValueError, match="not compatible"):
        _summed(net, batch, loss, "opacus_hooks")


@pytest.mark.slow
def test_swin_unetr_3d_fast_and_functorch_equal_reference_loop():
    """3D SwinUNETR at a tiny size (feature size 12, window 4, one block per stage; ~2 min on one CPU
    thread): MONAI's class with smaller arguments, the smallest patch with a 2-voxel bottleneck."""
    torch.manual_seed(0)
    net = MonaiNet(1, NUM_CLASSES, False, "swin_unetr", "SwinUNETR", 3,
                   {"feature_size": 12, "window_size": 4, "depths": (1, 1, 1, 1)}).to(torch.float64).train()
    assert validate_for_dp(net) == []
    loss = SegmentationLoss(NUM_CLASSES, patches_per_patient=2)
    batch = _batch([64, 32, 32], seed=5)
    ref, ref_stats = _summed(net, batch, loss, "reference_loop")
    assert ref_stats.num_clipped == 2
    for engine in ("functorch", "fast"):
        got, stats = _summed(net, batch, loss, engine)
        assert_close(got, ref)
        assert torch.allclose(stats.grad_norms, ref_stats.grad_norms, rtol=1e-5)


def test_dynunet_deep_supervision_sums_equal_reference_loop_and_eval_gives_the_main_head():
    """DynUNet with MONAI's deep supervision: in training a list of n_stages - 1 full-resolution outputs (main
    first) that dpunet's loss weighs as for its U-Net (targets at full resolution); the fast and functorch
    engines equal the reference loop on it; eval mode gives the main output only."""
    from dpunet.architectures import supervision_levels
    from dpunet.training.loss import deep_supervision_weights, downsample_seg_for_deep_supervision

    arch = plan_arch(2)
    arch["kwargs"].update(n_stages=4, features_per_stage=[8, 16, 32, 32], kernel_sizes=[[3, 3]] * 4,
                          strides=[[1, 1], [2, 2], [2, 2], [2, 2]])
    torch.manual_seed(0)
    spec = apply_preset(arch, "dynunet", 0.5, [16, 16])
    net = build_network(spec, 1, NUM_CLASSES, True).to(torch.float64)
    n_out, strides = supervision_levels(spec, True, 2)
    assert n_out == 3 and strides == [[1, 1]] * 4  # every head at full resolution
    weights = deep_supervision_weights(n_out)
    assert weights[1] > 0  # a head really enters the loss
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        outs = net.train()(x)
        assert isinstance(outs, list) and len(outs) == 3
        assert all(o.shape == (2, NUM_CLASSES, 16, 16) for o in outs)
        assert not torch.allclose(outs[0], outs[1])
        torch.testing.assert_close(net.eval()(x), outs[0])  # no batch statistics: train = eval maths
        net.deep_supervision = False
        torch.testing.assert_close(net.train()(x), outs[0])
        net.deep_supervision = True
    net.train()
    loss = SegmentationLoss(NUM_CLASSES, deep_supervision_weights=weights, patches_per_patient=2)
    g = torch.Generator().manual_seed(6)
    seg = torch.randint(0, NUM_CLASSES, (2, 2, 1, 16, 16), generator=g)
    batch = PatientBatch(torch.randn(2, 2, 1, 16, 16, generator=g, dtype=torch.float64),
                         downsample_seg_for_deep_supervision(seg, strides, n_out))
    ref, ref_stats = _summed(net, batch, loss, "reference_loop")
    assert ref_stats.num_clipped == 2
    # the head next to the main output has weight 1/3 and is trained; the lowest has weight 0, as in dpunet
    head = [i for i, (n, _) in enumerate(net.named_parameters()) if "deep_supervision_heads.0." in n]
    assert head and all(ref[i].abs().sum() > 0 for i in head)
    for engine in ("functorch", "fast"):
        got, stats = _summed(net, batch, loss, engine)
        assert_close(got, ref)
        assert torch.allclose(stats.grad_norms, ref_stats.grad_norms, rtol=1e-5)
    with pytest.raises(DpunetError, match="without deep supervision"):
        build_network(apply_preset(plan_arch(2), "attention_unet", 0.25, [16, 16]), 1, NUM_CLASSES, True)


def _summed(net, batch, loss, engine_name, clip_norm=1e-3):
    """(clipped per-patient sum, stats) of one engine; like tests.test_engines.summed, with dpunet's loss."""
    engine = make_engine(engine_name, net, loss, clip_norm)
    try:
        stats = engine.accumulate(batch)
        return [g.clone() for g in engine.summed_grad], stats
    finally:
        engine.close()


def test_opacus_issue_671_monai_3d_unet_through_dpunet_engines():
    """Opacus #671: MONAI 3D networks stopped Opacus' optimiser with parameters that had no per-sample
    gradient. dpunet's Opacus engine and its functorch engine give MONAI's 3D UNet (PReLU, residual units)
    the reference loop's sums; a network whose forward adds in place (SegResNet) makes the Opacus engine
    fail loudly (then `auto` uses another engine), never silently wrong."""
    net, patch = build("monai_unet", 3, torch.float64)
    net.train()
    loss = SegmentationLoss(NUM_CLASSES, patches_per_patient=2)
    batch = _batch(patch, seed=2)
    ref, _ = _summed(net, batch, loss, "reference_loop")
    for engine in ("functorch", "opacus_hooks"):
        got, _ = _summed(net, batch, loss, engine)
        assert_close(got, ref)
    seg, seg_patch = build("segresnet", 3, torch.float64)
    with pytest.raises((RuntimeError, ValueError)):
        _summed(seg.train(), _batch(seg_patch, seed=3), loss, "opacus_hooks")


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow  # the unetr and dynunet runs below cover the same path in the default suite
def test_train_monai_unet_end_to_end_and_rebuild_from_release(tmp_path, use_roots, capsys):
    from dpunet.inference.predictor import load_fold_model
    from dpunet.training import cli as train_cli

    roots = use_roots(plan_synthetic_task(tmp_path, "-c", "3d_fullres", "--width", "0.25", "--steps", "2",
                                          "--patients-per-step", "3", "--patches-per-patient", "2"))
    with pytest.raises(SystemExit) as done:
        train_cli.main(["990", "0", "--eps", "8", "-c", "3d_fullres", "--arch", "monai_unet", "--init-from", "none",
                        "--engine", "functorch", "--no-validation", "--no-augmentation", "--device", "cpu",
                        "--patients-per-micro-batch", "2"])
    assert done.value.code == 0, capsys.readouterr().err[-2000:]
    assert "trains without deep supervision" in capsys.readouterr().err
    release = roots["results"] / "Task990_Synthetic3D" / "monai_unet__3d_fullres__eps8__init-none" / "fold_0" / "release"
    model_path = release / "model_release.pt"
    assert model_path.is_file()
    fold_model = load_fold_model(model_path)
    net = fold_model.network
    assert type(net).__name__ == "MonaiNet" and net.deep_supervision is False and not net.training
    patch = fold_model.plan_configuration["patch_size"]
    with torch.no_grad():
        out = net(torch.randn(1, 1, *patch))
    assert out.shape == (1, fold_model.num_classes, *patch) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def synthetic_3d(tmp_path_factory):
    """The synthetic task planned in 3D: its patch (10, 32, 32) fits neither UNETR nor BasicUNet (16)."""
    return plan_synthetic_task(tmp_path_factory.mktemp("adapt"), "-c", "3d_fullres", "--width", "0.25", "--steps",
                               "1", "--patients-per-step", "3", "--patches-per-patient", "2")


@pytest.mark.parametrize("name,width", [("unetr", 0.0625),
                                        pytest.param("basic_unet", 0.0625, marks=pytest.mark.slow)])
def test_adapted_patch_trains_releases_and_predicts_in_the_input_geometry(name, width, synthetic_3d, use_roots,
                                                                          tmp_path, capsys):
    import shutil

    from dpunet.dataset.io import read_image, read_label
    from dpunet.evaluation.cross_validation import run_folder_name
    from dpunet.inference.predictor import load_fold_model, predict_folder
    from dpunet.training import cli as train_cli

    roots = use_roots(synthetic_3d)
    task = roots["results"] / "Task990_Synthetic3D"
    with pytest.raises(SystemExit) as done:
        train_cli.main(["990", "0", "--eps", "8", "-c", "3d_fullres", "--arch", name, "--width", str(width),
                        "--init-from", "none", "--engine", "fast", "--device", "cpu"])
    assert done.value.code == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "patch size adapted: --arch" in out and "validation Dice" in out  # validated with the adapted patch
    [model_path] = task.glob(f"{name}__3d_fullres__*/fold_0/release/model_release.pt")
    fold_model = load_fold_model(model_path)
    assert fold_model.plan_configuration["patch_size"] == [16, 32, 32]
    released = torch.load(model_path, weights_only=True)
    assert released["architecture"]["patch_size"] == [16, 32, 32]
    assert released["architecture"]["patch_size_adapted_from"] == [10, 32, 32]
    # the run folder under the name dpunet_predict finds with its default options
    run_dir = model_path.parents[2]
    canonical = task / run_folder_name(name, "3d_fullres", 8.0)
    if run_dir != canonical:
        shutil.move(run_dir, canonical)
    images = roots["raw"] / "Task990_Synthetic3D" / "imagesTs"
    out = tmp_path / "pred"
    predict_folder(images, out, "990", "3d_fullres", [0], 8.0, arch=name, num_processes=0, use_mirroring=False,
                   device="cpu", progress=False)
    cases = sorted(p.name for p in images.glob("*.nii.gz"))  # MSD names: one file per case
    assert len(cases) == 2
    for case in cases:
        image, g_in = read_image(images / case)
        seg, g_out = read_label(out / case)
        assert g_in.matches(g_out) == [] and seg.shape == image.shape[1:] == g_in.shape


def test_dynunet_trains_with_deep_supervision_and_its_release_predicts_with_the_main_head(synthetic_3d, use_roots,
                                                                                         capsys):
    from dpunet.inference.predictor import load_fold_model
    from dpunet.training import cli as train_cli

    roots = use_roots(synthetic_3d)
    with pytest.raises(SystemExit) as done:
        train_cli.main(["990", "0", "--eps", "8", "-c", "3d_fullres", "--arch", "dynunet", "--width", "0.25",
                        "--init-from", "none", "--engine", "fast", "--no-validation", "--device", "cpu"])
    err = capsys.readouterr().err
    assert done.value.code == 0, err[-2000:]
    assert "without deep supervision" not in err
    [model_path] = (roots["results"] / "Task990_Synthetic3D").glob("dynunet__3d_fullres__*/fold_0/release/"
                                                                    "model_release.pt")
    fold_model = load_fold_model(model_path)
    net = fold_model.network
    assert net.has_deep_supervision_heads and not net.deep_supervision and not net.training
    patch = fold_model.plan_configuration["patch_size"]
    with torch.no_grad():
        out = net(torch.randn(1, 1, *patch))
    assert isinstance(out, torch.Tensor) and out.shape == (1, fold_model.num_classes, *patch)


# ------------------------------------------------------------------------------------------ --dp-norm
def test_dp_norm_option_chooses_the_norm_that_replaces_batchnorm():
    from dpunet.pretraining.pretrain import PretrainingConfig, pretrained_checkpoint_path

    import monai.networks.nets as monai_nets

    def count(net, cls):
        return sum(isinstance(m, cls) for m in net.modules())

    default_spec = apply_preset(plan_arch(2), "attention_unet", 0.25, [16, 16])
    published = monai_nets.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES,
                                         **default_spec["kwargs"]["monai_kwargs"])
    batchnorms, instancenorms = count(published, nn.BatchNorm2d), count(published, nn.InstanceNorm2d)
    assert batchnorms > 0
    default = build_network(default_spec, 1, NUM_CLASSES, False)
    assert count(default, nn.GroupNorm) == batchnorms and count(default, nn.InstanceNorm2d) == instancenorms
    spec = apply_preset(plan_arch(2), "attention_unet", 0.25, [16, 16], dp_norm="instance")
    assert spec["kwargs"]["dp_norm"] == "instance"
    inst = build_network(spec, 1, NUM_CLASSES, False)
    assert count(inst, nn.GroupNorm) == 0 and count(inst, nn.InstanceNorm2d) == batchnorms + instancenorms
    instance = [m for m in inst.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert not any(m.track_running_stats for m in instance)
    assert sum(m.affine for m in instance) >= batchnorms  # the replacements keep BatchNorm's affine parameters
    assert validate_for_dp(inst) == []
    two = build_network(apply_preset(plan_arch(2), "attention_unet", 0.25, [16, 16], num_groups=2), 1,
                        NUM_CLASSES, False)
    groups = [m for m in two.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == batchnorms
    assert all(m.num_groups == largest_divisor_at_most(m.num_channels, 2) for m in groups)
    with pytest.raises(DpunetError, match="unet_in"):
        apply_preset(plan_arch(2), "unet", 1.0, [16, 16], dp_norm="instance")
    with pytest.raises(DpunetError, match="--dp-norm"):
        apply_preset(plan_arch(3), "vnet", 1.0, [32, 32, 32], dp_norm="layer")
    # a pretraining with another norm is another file (same tensor names and shapes, different network)
    assert pretrained_checkpoint_path("T", "2d", PretrainingConfig(arch="attention_unet")) != \
        pretrained_checkpoint_path("T", "2d", PretrainingConfig(arch="attention_unet", dp_norm="instance"))


def test_dp_norm_is_a_training_option_stored_with_the_run(synthetic_3d, use_roots, capsys):
    from dpunet.inference.predictor import load_fold_model
    from dpunet.training import cli as train_cli

    roots = use_roots(synthetic_3d)
    with pytest.raises(SystemExit) as done:
        train_cli.main(["990", "0", "--eps", "8", "-c", "3d_fullres", "--arch", "attention_unet", "--width", "0.25",
                        "--dp-norm", "instance", "--init-from", "none", "--engine", "fast", "--no-validation",
                        "--device", "cpu"])
    assert done.value.code == 0, capsys.readouterr().err[-2000:]
    [model_path] = (roots["results"] / "Task990_Synthetic3D").glob("attention_unet__3d_fullres__*/fold_0/release/"
                                                                    "model_release.pt")
    run_config = json.loads((model_path.parents[1] / "private" / "run_config.json").read_text())
    assert run_config["training_config"]["dp_norm"] == "instance"
    assert run_config["architecture"]["kwargs"]["dp_norm"] == "instance"
    net = load_fold_model(model_path).network  # rebuilt from the release file's spec
    assert any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())
    with pytest.raises(SystemExit) as done:
        train_cli.main(["990", "0", "--eps", "8", "-c", "3d_fullres", "--norm-groups", "0", "--device", "cpu"])
    assert done.value.code == 2 and "--norm-groups must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("name,width", [("unetr", 0.0625), ("dynunet", 0.25)])
def test_bench_engine_runs_an_adapted_patch_and_deep_supervision(name, width, monkeypatch, capsys):
    import dataclasses

    from dpunet.benchmark import engine_bench

    tiny = engine_bench.BenchNet("3D 8x16x16 b2", 3, (8, 16, 16), 2, (8, 16, 32))  # UNETR: patch -> 16x16x16
    monkeypatch.setitem(engine_bench.PRESETS, "cpu", [tiny])
    with pytest.raises(SystemExit) as done:
        engine_bench.main(["--device", "cpu", "--preset", "cpu", "--arch", name, "--width", str(width),
                           "--steps", "1", "--warmup", "0", "--extra-k", "0", "--methods", "fast", "--threads", "1"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(f"| {name} 3D 8x16x16 b2")]
    assert len(rows) == 2 and "failed" not in out
    net = dataclasses.replace(tiny, arch=name, width=width)
    assert net.deep_supervision == (name == "dynunet")  # DynUNet's heads are benchmarked too
    params = count_parameters(build_network(net.spec(), 1, 3, net.deep_supervision))
    assert f"| {params / 1e6:.2f}M |" in rows[1]


# ------------------------------------------------------------------------------------------- dpunet_archs
def test_dpunet_archs_lists_every_name_with_source_dims_parameters_and_engines(capsys):
    from dpunet.architectures import architecture_names
    from dpunet.architectures.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--dim", "2"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert set(rows) == set(architecture_names())
    assert "dpunet PlainConvUNet" in rows["unet"] and "MONAI UNet" in rows["monai_unet"]
    assert "refused" in rows["vnet"] and "3D only" in rows["vnet"]
    assert "opacus_hooks: refused (index buffers in WindowAttention)" in rows["swin_unetr"]
    assert "functorch: yes" in rows["attention_unet"] and "PReLU" in rows["attention_unet"]
    params = int(rows["monai_unet"].split()[4].replace(",", ""))
    assert params > 100_000


def test_random_image_pretraining_runs_a_monai_network_without_deep_supervision(tmp_path):
    from dpunet.pretraining.pretrain import PretrainingConfig, pretrain_on_public_data

    plan_config = {"architecture": plan_arch(2), "patch_size": [16, 16]}
    cfg = PretrainingConfig(arch="attention_unet", width=0.25, steps=2, batch_size=2)  # deep_supervision=True
    out = tmp_path / "pre.pt"
    summary = pretrain_on_public_data(plan_config, 1, NUM_CLASSES, cfg, out, "TaskTest")
    assert out.is_file() and summary["steps"] == 2
    state = torch.load(out, weights_only=True)
    assert state["architecture"]["class_name"] == "MonaiNet"
    rebuilt = build_network(state["architecture"], 1, NUM_CLASSES, False)
    rebuilt.load_state_dict(state["weights"])
    # a patch UNETR cannot take: the pretraining trains on the adapted patch, as dpunet_train does
    plan_config = {"architecture": plan_arch(3), "patch_size": [10, 32, 32], "median_shape": [10, 32, 32]}
    cfg = PretrainingConfig(arch="unetr", width=0.0625, steps=1, batch_size=1)
    pretrain_on_public_data(plan_config, 1, NUM_CLASSES, cfg, out, "TaskTest")
    assert torch.load(out, weights_only=True)["architecture"]["patch_size"] == [16, 32, 32]


def test_engine_auto_selection_on_dynunet_3d_leaves_functorch_usable():
    """The failed quick-study cell: Opacus fails on DynUNet 3d half-way, then functorch (auto's pick) must run."""
    from dpunet.privacy.engines.registry import benchmark_engines

    net, patch = build("dynunet", 3)
    net.train()
    loss = SegmentationLoss(NUM_CLASSES, patches_per_patient=2)
    batch = _batch(patch, seed=3)
    batch = PatientBatch(batch.data.float(), batch.targets)
    timings = benchmark_engines(net, loss, 1.0, batch, repeats=1)
    assert math.isfinite(timings["functorch"]) and math.isfinite(timings["fast"])
    assert not any(m._backward_hooks or m._forward_hooks for m in net.modules())
    engine = make_engine("functorch", net, loss, 1.0)
    assert engine.accumulate(batch).num_patients == 2
    engine.close()
