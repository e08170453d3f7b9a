"""The classic families under `--arch` (issue 11): DeepLabV3+, FPN, PSPNet and LinkNet on dpunet's ResNet-style
encoder, in 2D and 3D. Each builds from a plan at tiny width, keeps the input's spatial shape, is fit for DP (no
BatchNorm, no running statistics, no in-place modules), follows its paper's structure (strides, dilations,
branches), and the clipped per-patient sums of the fast, functorch and opacus_hooks engines equal the per-patient
reference loop in float64 with K = 2 patches per patient and clipping active. One FPN trains end to end in 2D, is
rebuilt from its release file and predicts NIfTI files in the input geometry; dpunet_bench_engine runs a LinkNet."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpunet.architectures import apply_preset, architecture_names, build_network, count_parameters, validate_for_dp
from dpunet.architectures.classic_nets import CLASSIC_ARCHITECTURES, classic_spec, encoder_strides, is_classic_arch
from dpunet.privacy.engines import PatientBatch, make_engine
from dpunet.training.loss import SegmentationLoss
from dpunet.utils.errors import DpunetError
from tests.conftest import plan_synthetic_task
from tests.test_engines import assert_close

NUM_CLASSES = 3
NAMES = sorted(CLASSIC_ARCHITECTURES)
WIDTH = 0.125  # encoder channels 8, 8, 8, 16, 32
PATCH = {2: [32, 32], 3: [8, 16, 16]}

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("single_thread")]


def plan_arch(dim: int) -> dict:
    """A planned U-Net entry; in 3D a first stride that spares the thick axis, as the planner makes."""
    strides = [[1, 1], [2, 2], [2, 2]] if dim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    return {"class_name": "PlainConvUNet", "kwargs": {
        "dim": dim, "n_stages": 3, "features_per_stage": [16, 32, 64], "kernel_sizes": [[3] * dim] * 3,
        "strides": strides, "n_conv_per_stage": [2] * 3, "n_conv_per_stage_decoder": [2] * 2}}


def build(name: str, dim: int, dtype=torch.float64, **spec_options) -> nn.Module:
    torch.manual_seed(0)
    if spec_options:
        spec = classic_spec(name, plan_arch(dim), PATCH[dim], WIDTH, **spec_options)
    else:
        spec = apply_preset(plan_arch(dim), name, WIDTH, PATCH[dim])
    return build_network(spec, 1, NUM_CLASSES, False).to(dtype)


CASES = [(n, d) for n in NAMES for d in (2, 3)]
IDS = [f"{n}-{d}d" for n, d in CASES]


# ------------------------------------------------------------------------------------------- build, shapes
def test_names_are_registered_everywhere():
    assert NAMES == ["deeplabv3plus", "fpn", "linknet", "pspnet"]
    assert set(NAMES) <= set(architecture_names()) and all(is_classic_arch(n) for n in NAMES)
    assert not is_classic_arch("unet") and not is_classic_arch("monai_unet")


@pytest.mark.parametrize("name,dim", CASES, ids=IDS)
def test_builds_fit_for_dp_and_keeps_the_input_shape(name, dim):
    net = build(name, dim, torch.float32)
    assert validate_for_dp(net) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "track_running_stats", False) or getattr(m, "inplace", False) or
                   getattr(m, "running_mean", None) is not None for m in net.modules())
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
    assert net.deep_supervision is False and count_parameters(net) > 0
    assert net.classifier.out_channels == NUM_CLASSES and net.classifier.kernel_size == (1,) * dim  # the head
    # the per-sample norm: GroupNorm with groups dividing channels (tiny width: 8 channels, 8 groups)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    x = torch.randn(2, 1, *PATCH[dim])
    out = net.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES, *PATCH[dim])
    # no sample mixing: the first sample's output does not depend on the second sample
    x2 = x.clone()
    x2[1] = torch.randn(1, *PATCH[dim])
    assert torch.allclose(net(x2)[0], out[0], atol=1e-6)


def test_spec_round_trips_through_json_and_rebuilds_the_same_network():
    import json

    for dim in (2, 3):
        spec = apply_preset(plan_arch(dim), "deeplabv3plus", 0.25, PATCH[dim])
        assert spec["preset"] == "deeplabv3plus" and spec["width_multiplier"] == 0.25
        again = json.loads(json.dumps(spec))
        torch.manual_seed(1)
        a = build_network(spec, 2, 4, False)
        b = build_network(again, 2, 4, False)
        b.load_state_dict(a.state_dict())  # same structure, every key
        x = torch.randn(1, 2, *PATCH[dim])
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_width_scales_every_channel_in_multiples_of_the_groups():
    narrow = classic_spec("fpn", plan_arch(2), [64, 64], 0.25)["kwargs"]
    wide = classic_spec("fpn", plan_arch(2), [64, 64], 1.0)["kwargs"]
    assert wide["encoder_channels"] == [32, 32, 64, 128, 256]  # ResNet-18's channels halved
    assert narrow["encoder_channels"] == [8, 8, 16, 32, 64]
    assert (narrow["fpn_channels"], narrow["head_channels"]) == (32, 16)
    assert classic_spec("fpn", plan_arch(2), [64, 64], 0.3)["kwargs"]["encoder_channels"] == [8, 8, 16, 40, 80]
    p_narrow = count_parameters(build_network(classic_spec("fpn", plan_arch(2), [64, 64], 0.25), 1, 3, False))
    p_wide = count_parameters(build_network(classic_spec("fpn", plan_arch(2), [64, 64], 1.0), 1, 3, False))
    assert 10 < p_wide / p_narrow < 17  # convolution weights grow with the square of the width


# ---------------------------------------------------------------------------- strides, dilation, structure
def test_per_axis_strides_follow_the_plan_then_halve_even_axes_down_to_two():
    # hippocampus 3d_fullres-like patch, no planned strides: 40 -> 20 -> 10 -> 5 (odd: stops), 56 -> 7
    assert encoder_strides([40, 56, 40]) == [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2
    # small anisotropic patch with the plan's strides: the thick axis waits for the plan's second stage
    assert encoder_strides([8, 16, 16], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]) == \
        [[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1]]
    assert encoder_strides([64, 64]) == [[2, 2]] * 5  # 64 -> 2: ResNet's output stride 32
    spec = classic_spec("linknet", plan_arch(3), [8, 16, 16], WIDTH)["kwargs"]
    assert spec["required_divisor"] == [4, 8, 8]


@pytest.mark.parametrize("name,output_stride", [("deeplabv3plus", 16), ("pspnet", 8)])
def test_dilated_encoders_keep_their_output_stride(name, output_stride):
    kwargs = classic_spec(name, plan_arch(2), [64, 64], WIDTH)["kwargs"]
    keep = int(math.log2(output_stride))
    assert kwargs["strides"][:keep] == [[2, 2]] * keep and kwargs["strides"][keep:] == [[1, 1]] * (5 - keep)
    # each removed stride multiplies the dilation of the stages after it (Chen et al. 2017)
    assert kwargs["dilations"][keep:] == [[2 ** (i + 1)] * 2 for i in range(5 - keep)]
    net = build_network(classic_spec(name, plan_arch(2), [64, 64], WIDTH), 1, NUM_CLASSES, False)
    levels = net.encoder(torch.randn(1, 1, 64, 64))
    assert [list(t.shape[2:]) for t in levels] == [[64 // 2 ** min(i + 1, keep)] * 2 for i in range(5)]
    assert list(levels[-1].shape[2:]) == [64 // output_stride] * 2


def test_deeplab_aspp_rates_and_decoder_skip_and_psp_bins():
    kwargs = classic_spec("deeplabv3plus", plan_arch(2), [256, 256], 1.0)["kwargs"]
    assert kwargs["aspp_rates"] == [[6, 6], [12, 12], [15, 15]]  # (6, 12, 18) capped at the 16x16 map minus 1
    net = build_network(classic_spec("deeplabv3plus", plan_arch(2), [64, 64], WIDTH), 1, NUM_CLASSES, False)
    assert len(net.aspp) == 4 and net.low_level[0].in_channels == net.channels[1]  # + image pooling branch
    assert kwargs["output_stride"] == 16
    # the denser variant: two strides become dilations 2 and 4, the rates double (12, 24, 36; capped at 31)
    os8 = classic_spec("deeplabv3plus", plan_arch(2), [256, 256], 1.0, output_stride=8)["kwargs"]
    assert os8["output_stride"] == 8 and os8["strides"][3:] == [[1, 1]] * 2 and os8["dilations"][3:] == [[2, 2], [4, 4]]
    assert os8["aspp_rates"] == [[12, 12], [24, 24], [31, 31]]
    deep = build_network(classic_spec("linknet", plan_arch(2), [64, 64], WIDTH, blocks_per_stage=(3, 4, 6, 3)),
                         1, NUM_CLASSES, False)  # ResNet-34's depth
    assert [len(stage) for stage in deep.encoder.stages] == [3, 4, 6, 3]
    psp = classic_spec("pspnet", plan_arch(2), [128, 128], WIDTH)["kwargs"]
    assert psp["bins"] == [[1, 1], [2, 2], [3, 3], [6, 6]]
    small = classic_spec("pspnet", plan_arch(3), [8, 16, 16], WIDTH)["kwargs"]
    assert small["bins"][-1] == [2, 2, 2]  # capped at the 2x2x2 map


def test_refusals_name_the_constraint():
    with pytest.raises(DpunetError, match="patch size"):
        apply_preset(plan_arch(2), "fpn", 1.0)
    with pytest.raises(DpunetError, match="halved twice"):
        apply_preset(plan_arch(2), "pspnet", 1.0, [6, 6])
    one_voxel = {"class_name": "PlainConvUNet", "kwargs": {"dim": 2, "strides": [[1, 1], [2, 1], [2, 1]]}}
    with pytest.raises(DpunetError, match="single voxel"):
        apply_preset(one_voxel, "linknet", 1.0, [4, 1])
    with pytest.raises(DpunetError, match="2D and 3D"):
        classic_spec("fpn", {"class_name": "x", "kwargs": {}}, [16], 1.0)
    with pytest.raises(DpunetError, match="unknown DP norm"):
        classic_spec("fpn", plan_arch(2), [32, 32], 1.0, dp_norm="batch")
    with pytest.raises(DpunetError, match="--output-stride 8: --arch fpn has no dilated encoder"):
        classic_spec("fpn", plan_arch(2), [32, 32], 1.0, output_stride=8)
    with pytest.raises(DpunetError, match="--output-stride must be one of 8, 16, got 4"):
        classic_spec("deeplabv3plus", plan_arch(2), [32, 32], 1.0, output_stride=4)
    with pytest.raises(DpunetError, match="4 positive counts"):
        classic_spec("linknet", plan_arch(2), [32, 32], 1.0, blocks_per_stage=(2, 2, 2))
    with pytest.raises(DpunetError, match="at least 1"):
        classic_spec("fpn", plan_arch(2), [32, 32], 1.0, num_groups=0)
    with pytest.raises(DpunetError, match="without deep supervision"):
        build_network(apply_preset(plan_arch(2), "fpn", WIDTH, [32, 32]), 1, NUM_CLASSES, True)
    net = build("fpn", 2, torch.float32)
    with pytest.raises(DpunetError, match=r"divisor \[16, 16\]"):
        net(torch.randn(1, 1, 24, 32))


# ------------------------------------------------------------------------ per-patient gradients (float64)
def _batch(patch: list[int], seed: int, patients: int = 2, k: int = 2) -> PatientBatch:
    g = torch.Generator().manual_seed(seed)
    return PatientBatch(torch.randn(patients, k, 1, *patch, generator=g, dtype=torch.float64),
                        [torch.randint(0, NUM_CLASSES, (patients, k, 1, *patch), generator=g)])


def _summed(net, batch, loss, engine_name, clip_norm=1e-3, described: list | None = None):
    engine = make_engine(engine_name, net, loss, clip_norm)
    try:
        stats = engine.accumulate(batch)
        if described is not None:
            described.append(engine.describe())
        return [g.clone() for g in engine.summed_grad], stats
    finally:
        engine.close()


def _check_engines(net: nn.Module, patch: list[int], seed: int) -> None:
    net.train()
    loss = SegmentationLoss(NUM_CLASSES, patches_per_patient=2)
    batch = _batch(patch, seed)
    ref, ref_stats = _summed(net, batch, loss, "reference_loop")
    assert ref_stats.num_clipped == 2  # clipping active for both patients
    described: list = []
    for engine in ("fast", "functorch", "opacus_hooks"):  # no in-place tensor ops: Opacus' hooks work too
        got, stats = _summed(net, batch, loss, engine, described=described if engine == "fast" else None)
        assert_close(got, ref)
        assert torch.allclose(stats.grad_norms, ref_stats.grad_norms, rtol=1e-5)
    # the fast engine's own rules cover every layer with parameters (no generic vmap/loop fallback): dilated
    # convs are convs, and pooling and interpolation own no parameters
    layers = described[0]["layers"]
    assert layers and {layer["strategy"] for layer in layers} <= {"instantiate", "ghost"}
    assert {layer["kind"] for layer in layers} <= {"Conv2d", "Conv3d", "ConvTranspose2d", "ConvTranspose3d",
                                                   "GroupNorm", "InstanceNorm2d", "InstanceNorm3d"}


@pytest.mark.parametrize("name,dim", CASES, ids=IDS)
def test_engines_clipped_sums_equal_reference_loop(name, dim):
    _check_engines(build(name, dim), PATCH[dim], seed=1)


def test_instance_norm_option_and_its_per_patient_sums():
    net = build("deeplabv3plus", 3, dp_norm="instance")
    assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())
    inst = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert inst and all(m.affine and not m.track_running_stats for m in inst)
    assert validate_for_dp(net) == []
    _check_engines(net, PATCH[3], seed=2)


# -------------------------------------------------------------------------------------------- end to end
def test_train_fpn_2d_end_to_end_rebuild_from_release_and_predict(tmp_path, use_roots, capsys):
    from dpunet.dataset.io import read_image, read_label
    from dpunet.inference.predictor import load_fold_model, predict_folder
    from dpunet.training import cli as train_cli

    roots = use_roots(plan_synthetic_task(tmp_path, "-c", "2d", "--width", str(WIDTH), "--steps", "2",
                                          "--patients-per-step", "3", "--patches-per-patient", "2"))
    with pytest.raises(SystemExit) as done:
        train_cli.main(["990", "0", "--eps", "8", "-c", "2d", "--arch", "fpn", "--init-from", "none",
                        "--engine", "fast", "--no-validation", "--no-augmentation", "--device", "cpu",
                        "--patients-per-micro-batch", "2"])
    assert done.value.code == 0, capsys.readouterr().err[-2000:]
    assert "trains without deep supervision" in capsys.readouterr().err
    releases = sorted((roots["results"] / "Task990_Synthetic3D").glob("fpn__2d__eps8*/fold_0/release"))
    assert len(releases) == 1
    fold_model = load_fold_model(releases[0] / "model_release.pt")
    net = fold_model.network
    assert type(net).__name__ == "FPN" and net.deep_supervision is False and not net.training
    patch = fold_model.plan_configuration["patch_size"]
    with torch.no_grad():
        out = net(torch.randn(1, 1, *patch))
    assert out.shape == (1, fold_model.num_classes, *patch) and torch.isfinite(out).all()

    # predict from the run under its default name (the run's name may carry its non-default options)
    run = releases[0].parents[1]
    if run.name != "fpn__2d__eps8":
        run.rename(run.with_name("fpn__2d__eps8"))
    images = roots["raw"] / "Task990_Synthetic3D" / "imagesTs"
    out_dir = tmp_path / "pred"
    predict_folder(images, out_dir, "990", "2d", [0], 8.0, arch="fpn", use_mirroring=False, num_processes=0,
                   progress=False)
    inputs = sorted(images.glob("*.nii.gz"))
    assert inputs
    for path in inputs:
        image, g_in = read_image(path)
        seg, g_out = read_label(out_dir / path.name.replace("_0000", ""))
        assert g_in.matches(g_out) == [] and seg.shape == image.shape[1:]


def test_dpunet_archs_rows_name_the_paper_dims_parameters_and_engines():
    from dpunet.architectures.cli import default_configuration, describe

    for name in NAMES:
        row = describe(name, default_configuration(3), 1, NUM_CLASSES, WIDTH, False)
        assert row["source"] == CLASSIC_ARCHITECTURES[name].paper and row["dims"] == "2D/3D"
        params = count_parameters(build_network(classic_spec(name, default_configuration(3)["architecture"],
                                                             [64, 64, 64], WIDTH), 1, NUM_CLASSES, False))
        assert row["params"] == f"{params:,}" and "functorch: yes" in row["engines"]
    assert "2017" in CLASSIC_ARCHITECTURES["pspnet"].paper and "Chen" in CLASSIC_ARCHITECTURES["deeplabv3plus"].paper


def test_random_image_pretraining_runs_a_classic_network_without_deep_supervision(tmp_path):
    from dpunet.pretraining.pretrain import PretrainingConfig, pretrain_on_public_data

    plan_config = {"architecture": plan_arch(3), "patch_size": PATCH[3]}
    cfg = PretrainingConfig(arch="pspnet", width=WIDTH, steps=2, batch_size=2)  # deep_supervision=True
    out = tmp_path / "pre.pt"
    summary = pretrain_on_public_data(plan_config, 1, NUM_CLASSES, cfg, out, "TaskTest")
    assert out.is_file() and summary["steps"] == 2
    state = torch.load(out, weights_only=True)
    assert state["architecture"]["class_name"] == "PSPNet"
    rebuilt = build_network(state["architecture"], 1, NUM_CLASSES, False)
    rebuilt.load_state_dict(state["weights"])


# ------------------------------------------------------------------------------------- dpunet_bench_engine
def test_bench_engine_runs_a_classic_arch_with_a_single_output(monkeypatch, capsys):
    from dpunet.benchmark import engine_bench

    tiny = engine_bench.BenchNet("3D 8x16x16 b2", 3, (8, 16, 16), 2, (8, 16))
    monkeypatch.setitem(engine_bench.PRESETS, "cpu", [tiny])
    with pytest.raises(SystemExit) as done:
        engine_bench.main(["--device", "cpu", "--preset", "cpu", "--arch", "linknet", "--width", str(WIDTH),
                           "--steps", "1", "--warmup", "0", "--extra-k", "0", "--methods", "fast", "--threads", "1"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| linknet 3D 8x16x16 b2")]
    assert len(rows) == 2 and "non-private" in rows[0] and "dpunet fast" in rows[1]
    assert "failed" not in out
    params = count_parameters(build_network(classic_spec("linknet", tiny.architecture(), [8, 16, 16], WIDTH),
                                            1, 3, False))
    assert f"| {params / 1e6:.2f}M |" in rows[1]
    with pytest.raises(SystemExit) as refused:
        engine_bench.main(["--arch", "fpn", "--output", "perf.md"])
    assert refused.value.code == 2 and "without --output" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- real hippocampus plans
@pytest.mark.slow
@pytest.mark.shared
def test_hippocampus_plans_every_classic_arch_engines_equal_reference(tmp_path, monkeypatch, hippocampus_dir):
    """The acceptance check of issue 11 on the real plans (hippocampus 2d 56x40 and 3d_fullres 40x56x40, width
    0.125): every name builds, keeps the patch shape, and one DP step's clipped per-patient sums of fast and
    functorch equal the reference loop (float64, K = 2, clipping active)."""
    from dpunet.pipeline import cli as plan_and_preprocess
    from dpunet.utils.files import load_json

    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"DPUNET_{key.upper()}", str(tmp_path / key))
    (tmp_path / "raw" / "Task04_Hippocampus").symlink_to(hippocampus_dir)
    with pytest.raises(SystemExit) as done:
        plan_and_preprocess.main(["-t", "4", "-c", "2d", "3d_fullres", "--no-verify", "--no-preprocess", "-np", "1"])
    assert done.value.code == 0
    plans = load_json(tmp_path / "preprocessed" / "Task04_Hippocampus" / "dpunet_plans.json")["configurations"]
    for configuration in ("2d", "3d_fullres"):
        pc = plans[configuration]
        for name in NAMES:
            torch.manual_seed(0)
            spec = apply_preset(pc["architecture"], name, WIDTH, pc["patch_size"])
            net = build_network(spec, 1, NUM_CLASSES, False).to(torch.float64)
            assert validate_for_dp(net) == []
            with torch.no_grad():
                out = net(torch.zeros(1, 1, *pc["patch_size"], dtype=torch.float64))
            assert out.shape == (1, NUM_CLASSES, *pc["patch_size"])
            _check_engines(net, pc["patch_size"], seed=4)
