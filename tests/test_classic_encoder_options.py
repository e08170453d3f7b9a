"""`--output-stride {8,16}` and `--encoder-depth {18,34}` (issue 11): the classic families' encoder on the command
line. The options reach the built network (strides, dilations, blocks per stage, parameter count against a count
by hand), anything else refuses them naming the option, a non-default value names its own random-image
pretraining file, they are stored in the run configuration and fixed on --continue."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dpunet.architectures import apply_preset, arch_for_configuration, build_network, count_parameters
from dpunet.architectures.classic_nets import classic_encoder_options
from dpunet.pretraining.pretrain import PretrainingConfig, pretrained_checkpoint_path
from dpunet.training.config import merge_plan_and_options
from dpunet.utils.errors import DpunetError
from tests.conftest import plan_synthetic_task

NUM_CLASSES = 3
WIDTH = 0.125  # encoder channels 8, 8, 8, 16, 32 (multiples of the 8 groups)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("single_thread")]


def plan_config(dim: int = 2, patch: int = 64) -> dict:
    """A planned configuration (architecture entry, patch size) with plain stride-2 stages."""
    arch = {"class_name": "PlainConvUNet", "kwargs": {
        "dim": dim, "n_stages": 3, "features_per_stage": [16, 32, 64], "kernel_sizes": [[3] * dim] * 3,
        "strides": [[1] * dim] + [[2] * dim] * 2, "n_conv_per_stage": [2] * 3, "n_conv_per_stage_decoder": [2] * 2}}
    return {"architecture": arch, "patch_size": [patch] * dim, "dim": dim}


def basic_block_parameters(channels: int, dim: int) -> int:
    """An identity-shortcut basic block by hand: two bias-free 3^dim convs, two GroupNorms (weight and bias)."""
    return 2 * channels * channels * 3 ** dim + 2 * 2 * channels


# ------------------------------------------------------------------------------------- the built network
@pytest.mark.parametrize("name,default", [("deeplabv3plus", 16), ("pspnet", 8)])
def test_output_stride_reaches_strides_dilations_and_feature_maps(name, default):
    for output_stride in (None, 8, 16):
        spec, _ = arch_for_configuration(plan_config(), name, WIDTH, output_stride=output_stride)
        stride = output_stride or default
        kept = {8: 3, 16: 4}[stride]  # 64 -> 32 -> 16 -> 8 (-> 4): log2 of the output stride
        kwargs = spec["kwargs"]
        assert kwargs["strides"] == [[2, 2]] * kept + [[1, 1]] * (5 - kept)
        assert kwargs["dilations"] == [[1, 1]] * kept + [[2 ** (i + 1)] * 2 for i in range(5 - kept)]
        net = build_network(spec, 1, NUM_CLASSES, False)
        with torch.no_grad():
            top = net.encoder(torch.randn(1, 1, 64, 64))[-1]
        assert list(top.shape[2:]) == [64 // stride] * 2
        if name == "deeplabv3plus":
            assert kwargs["output_stride"] == stride
            # the ASPP rates double at output stride 8 (Chen et al.), capped at the deepest map minus 1
            assert kwargs["aspp_rates"] == [[min(r * 16 // stride, 64 // stride - 1)] * 2 for r in (6, 12, 18)]


@pytest.mark.parametrize("name,other", [("deeplabv3plus", 8), ("pspnet", 16)])
def test_a_patch_without_a_stride_to_trade_warns_that_the_option_changes_nothing(name, other, capsys):
    # 16x16: the encoder halves 16 -> 8 -> 4 -> 2 and stops (stride 8 in all), as on the hippocampus plans
    small = [apply_preset(plan_config(2, 16)["architecture"], name, WIDTH, [16, 16], output_stride=s)["kwargs"]
             for s in (None, other)]
    assert {**small[0], "output_stride": 0} == {**small[1], "output_stride": 0}  # the same network
    assert f"--output-stride {other} builds the same --arch {name}" in capsys.readouterr().err
    large = [apply_preset(plan_config(2, 64)["architecture"], name, WIDTH, [64, 64], output_stride=s)["kwargs"]
             for s in (None, other)]
    assert large[0]["strides"] != large[1]["strides"] and "dpunet warning" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["deeplabv3plus", "fpn", "pspnet", "linknet"])
@pytest.mark.parametrize("dim", [2, 3])
def test_encoder_depth_34_adds_resnet34s_blocks(name, dim):
    patch = 64 if dim == 2 else 16
    nets = {}
    for depth in (18, 34):
        spec = apply_preset(plan_config(dim, patch)["architecture"], name, WIDTH, [patch] * dim,
                            encoder_depth=depth)
        nets[depth] = build_network(spec, 1, NUM_CLASSES, False)
        assert spec["kwargs"]["blocks_per_stage"] == ([2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3])
    assert [len(stage) for stage in nets[34].encoder.stages] == [3, 4, 6, 3]
    # 1, 2, 4 and 1 extra identity blocks on stages of 8, 8, 16 and 32 channels; everything else is the same
    extra = sum(n * basic_block_parameters(c, dim) for n, c in zip((1, 2, 4, 1), (8, 8, 16, 32)))
    assert count_parameters(nets[34]) - count_parameters(nets[18]) == extra
    x = torch.randn(1, 1, *[patch] * dim)
    with torch.no_grad():
        assert nets[34](x).shape == (1, NUM_CLASSES, *[patch] * dim)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("name,options,message", [
    ("unet", {"output_stride": 8}, "--output-stride shapes the encoder of the classic families"),
    ("unet", {"encoder_depth": 34}, "--encoder-depth shapes the encoder of the classic families"),
    ("resenc", {"output_stride": 16, "encoder_depth": 34}, "--output-stride and --encoder-depth shape"),
    ("monai_unet", {"encoder_depth": 34}, "--arch monai_unet is not one of them"),
    ("fpn", {"output_stride": 8}, "--output-stride 8: --arch fpn has no dilated encoder"),
    ("linknet", {"output_stride": 16}, "--output-stride 16: --arch linknet has no dilated encoder"),
    ("deeplabv3plus", {"output_stride": 32}, "--output-stride must be one of 8, 16"),
    ("pspnet", {"encoder_depth": 50}, "--encoder-depth must be one of 18, 34"),
])
def test_refusals_name_the_option(name, options, message, tmp_path):
    from dpunet.pretraining.pretrain import pretrain_on_public_data

    with pytest.raises(DpunetError, match=message):
        apply_preset(plan_config()["architecture"], name, WIDTH, [64, 64], **options)
    with pytest.raises(DpunetError, match=message):  # the training configuration refuses before reading data
        merge_plan_and_options({"dp": {"delta": 1e-5, "steps": 2, "patches_per_patient": 2, "clip_norm": 1.0},
                                "training": {}},
                               {"task": "T", "configuration": "2d", "fold": "0", "arch": name, **options})
    with pytest.raises(DpunetError, match=message):  # dpunet_pretrain, before its first step
        pretrain_on_public_data(plan_config(), 1, NUM_CLASSES, PretrainingConfig(arch=name, width=WIDTH, steps=1,
                                                                                  batch_size=1, **options),
                                  tmp_path / "pretrained.pt", "T")
    assert not (tmp_path / "pretrained.pt").exists()


def test_defaults_are_the_families_own_and_recorded_in_the_training_config():
    plan = {"dp": {"delta": 1e-5, "steps": 2, "patches_per_patient": 2, "clip_norm": 1.0}, "training": {}}
    base = {"task": "T", "configuration": "2d", "fold": "0"}
    assert classic_encoder_options("deeplabv3plus") == (16, (2, 2, 2, 2))
    assert classic_encoder_options("pspnet", None, 34) == (8, (3, 4, 6, 3))
    assert classic_encoder_options("fpn") == (None, (2, 2, 2, 2))
    for arch, stride in (("deeplabv3plus", 16), ("pspnet", 8), ("fpn", None), ("unet", None)):
        cfg = merge_plan_and_options(plan, {**base, "arch": arch})
        assert (cfg.output_stride, cfg.encoder_depth) == (stride, 18)
    cfg = merge_plan_and_options(plan, {**base, "arch": "pspnet", "output_stride": 16, "encoder_depth": 34})
    assert cfg.to_dict()["output_stride"] == 16 and cfg.to_dict()["encoder_depth"] == 34


def test_a_non_default_encoder_names_its_own_pretraining_file():
    from dpunet.pretraining.cli import network_options

    def path(**options):
        return pretrained_checkpoint_path("T", "2d", PretrainingConfig(arch="deeplabv3plus", **options)).name

    default = path()
    assert path(output_stride=16) == default  # the family's own stride is the same network
    assert path(output_stride=8) != default and "__output-stride8__" in path(output_stride=8)
    assert path(encoder_depth=34) != default and "__encoder-depth34__" in path(encoder_depth=34)
    assert len({default, path(output_stride=8), path(encoder_depth=34), path(output_stride=8, encoder_depth=34),
                path(dp_norm="instance", encoder_depth=34)}) == 5
    psp = pretrained_checkpoint_path("T", "2d", PretrainingConfig(arch="pspnet", output_stride=8)).name
    assert psp == pretrained_checkpoint_path("T", "2d", PretrainingConfig(arch="pspnet")).name
    assert "__output-stride16__" in pretrained_checkpoint_path("T", "2d", PretrainingConfig(arch="pspnet",
                                                                                          output_stride=16)).name
    # dpunet_pretrain's suggested dpunet_train command repeats the network options
    assert network_options(PretrainingConfig(arch="pspnet", output_stride=16, encoder_depth=34)) == \
        " --output-stride 16 --encoder-depth 34"
    assert network_options(PretrainingConfig(arch="pspnet")) == ""


def test_command_line_parsers_take_the_options():
    from dpunet.pretraining import cli as pretrain_cli
    from dpunet.training import cli as train_cli

    args = train_cli.build_parser().parse_args(["4", "0", "--eps", "8", "--output-stride", "8",
                                                "--encoder-depth", "34"])
    assert (args.output_stride, args.encoder_depth) == (8, 34)
    args = train_cli.build_parser().parse_args(["4", "0", "--eps", "8"])
    assert (args.output_stride, args.encoder_depth) == (None, None)  # None: the plan's / family's default
    args = pretrain_cli.build_parser().parse_args(["4", "--arch", "pspnet", "--output-stride", "16"])
    assert (args.output_stride, args.encoder_depth) == (16, 18)
    for parser, argv in ((train_cli.build_parser(), ["4", "0", "--eps", "8", "--output-stride", "4"]),
                         (pretrain_cli.build_parser(), ["4", "--encoder-depth", "50"])):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ end to end
def test_stored_with_the_run_and_fixed_on_continue(tmp_path, use_roots, capsys):
    from dpunet.inference.predictor import load_fold_model
    from dpunet.training import cli as train_cli
    from dpunet.training.trainer import load_training_inputs

    roots = use_roots(plan_synthetic_task(tmp_path, "-c", "2d", "--width", str(WIDTH), "--steps", "2",
                                          "--patients-per-step", "3", "--patches-per-patient", "2"))
    common = ["990", "0", "--eps", "8", "-c", "2d", "--arch", "deeplabv3plus", "--init-from", "none",
              "--engine", "fast", "--no-validation", "--no-augmentation", "--device", "cpu",
              "--patients-per-micro-batch", "2"]

    def train(*extra: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as done:
            train_cli.main([*common, *extra])
        return done.value.code, capsys.readouterr().err

    code, err = train("--output-stride", "8", "--encoder-depth", "34")
    assert code == 0, err[-2000:]
    [release] = (roots["results"] / "Task990_Synthetic3D").glob("deeplabv3plus__2d__eps8*/fold_0/release")
    run_config = json.loads((release.parent / "private" / "run_config.json").read_text())
    assert (run_config["training_config"]["output_stride"], run_config["training_config"]["encoder_depth"]) == (8, 34)
    kwargs = run_config["architecture"]["kwargs"]
    assert kwargs["output_stride"] == 8 and kwargs["blocks_per_stage"] == [3, 4, 6, 3]
    # the plan's full encoder strides (FPN keeps them all): levels 3 and 4 trade theirs for dilations
    _, _, planned, _, _ = load_training_inputs("990", "2d")
    full = arch_for_configuration(planned, "fpn", WIDTH)[0]["kwargs"]["strides"]
    assert kwargs["strides"] == full[:3] + [[1, 1]] * 2
    assert kwargs["dilations"] == [[1, 1]] * 3 + [full[3], [a * b for a, b in zip(full[3], full[4])]]
    net = load_fold_model(release / "model_release.pt").network  # rebuilt from the release file's spec
    assert [len(stage) for stage in net.encoder.stages] == [3, 4, 6, 3]
    dilated = [m for m in net.encoder.stages[3].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert dilated and all(list(m.dilation) == kwargs["dilations"][4] for m in dilated)

    # --continue with another value: refused, naming the option and both values
    code, err = train("--output-stride", "16", "--encoder-depth", "34", "--continue")
    assert code == 2 and "changed model or optimiser (output_stride: 8 -> 16)" in err
    code, err = train("--output-stride", "8", "--continue")
    assert code == 2 and "changed model or optimiser (encoder_depth: 34 -> 18)" in err
    # not part of the run folder's name: a run differing only in them needs its own --run-tag
    code, err = train("--output-stride", "16")
    assert code == 2 and "already holds a run" in err
    # refused for a U-Net on the command line, before anything is trained
    code, err = train("--arch", "unet", "--output-stride", "8")
    assert code == 2 and "--output-stride shapes the encoder of the classic families" in err


def test_bench_engine_builds_the_encoder_it_is_asked_for(monkeypatch, capsys):
    """dpunet_bench_engine --output-stride/--encoder-depth benchmark the network dpunet_train would build."""
    from dpunet.benchmark import engine_bench

    tiny = engine_bench.BenchNet("2D 32x32 b2", 2, (32, 32), 2, (8, 16, 32, 64))
    monkeypatch.setitem(engine_bench.PRESETS, "cpu", [tiny])
    with pytest.raises(SystemExit) as done:
        engine_bench.main(["--device", "cpu", "--preset", "cpu", "--arch", "deeplabv3plus", "--width", "0.125",
                           "--output-stride", "8", "--encoder-depth", "34", "--steps", "1", "--warmup", "0",
                           "--extra-k", "0", "--methods", "fast", "--threads", "1"])
    assert done.value.code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| deeplabv3plus os8 r34")]
    assert len(rows) == 2
    expected = apply_preset(tiny.architecture(), "deeplabv3plus", 0.125, [32, 32], output_stride=8, encoder_depth=34)
    default = apply_preset(tiny.architecture(), "deeplabv3plus", 0.125, [32, 32])
    params = count_parameters(build_network(expected, 1, 3, False))
    assert params != count_parameters(build_network(default, 1, 3, False))  # depth 34 has more blocks
    assert f"| {params / 1e6:.2f}M |" in rows[1]
