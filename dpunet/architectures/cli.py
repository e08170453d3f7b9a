"""dpunet_archs [-t TASK -c CONFIG] [--width W] [--dim 2|3] [--measure-engines]

Lists every `--arch` name: source (dpunet network class or MONAI class), dimensions, trainable parameters,
and per-sample gradient engines. Parameters are counted for the plan's configuration when -t/-c are given,
else for a default configuration: 1 channel, 3 classes, a 4-stage plan (features 32..256, 3x3(x3) kernels,
stride 2) with patch 64x64 (2D) or 64x64x64 (3D), width 1.

Engines: functorch (torch.func) runs any module; opacus_hooks has Opacus' per-layer rules for some layers and
its functorch fallback for the others (listed), and fails on in-place operations inside a forward (e.g.
SegResNet's residual additions). "auto" times fast, functorch and opacus_hooks on shape-only data at training
time and skips those that fail; --measure-engines runs that timing here (1 patient, 2 patches) and reports
its choice.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from dpunet.architectures.classic_nets import CLASSIC_ARCHITECTURES
from dpunet.architectures.monai_nets import MONAI_ARCHITECTURES
from dpunet.architectures.presets import ARCHITECTURE_PRESETS, arch_for_configuration, architecture_names
from dpunet.architectures.registry import build_network, count_parameters, validate_for_dp
from dpunet.utils.errors import DpunetError, cli_entry

DEFAULT_CHANNELS, DEFAULT_CLASSES = 1, 3
DEFAULT_PATCH = {2: [64, 64], 3: [64, 64, 64]}


def default_configuration(dim: int) -> dict[str, Any]:
    """The documented default plan configuration of one dimension (see the module docstring)."""
    n = 4
    arch = {"class_name": "PlainConvUNet", "kwargs": {
        "dim": dim, "n_stages": n, "features_per_stage": [32, 64, 128, 256], "kernel_sizes": [[3] * dim] * n,
        "strides": [[1] * dim] + [[2] * dim] * (n - 1), "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1)}}
    return {"architecture": arch, "patch_size": DEFAULT_PATCH[dim], "dim": dim}


def source_and_dims(name: str, plan_arch: dict[str, Any]) -> tuple[str, str]:
    if name in MONAI_ARCHITECTURES:
        entry = MONAI_ARCHITECTURES[name]
        return f"MONAI {entry.monai_class}", "/".join(f"{d}D" for d in entry.dims)
    if name in CLASSIC_ARCHITECTURES:  # dpunet's own DeepLabV3+, FPN, PSPNet, LinkNet: the source is the paper
        return CLASSIC_ARCHITECTURES[name].paper, "2D/3D"
    class_name = ARCHITECTURE_PRESETS[name]["class_name"] or plan_arch["class_name"]
    return f"dpunet {class_name}", "2D/3D"


def opacus_fallback_layers(model: nn.Module) -> list[str]:
    """Types of the modules with their own trainable parameters that Opacus has no per-layer rule for (its
    functorch fallback computes them)."""
    from opacus.grad_sample import GradSampleModule

    types = {type(m).__name__ for m in model.modules()
             if any(p.requires_grad for p in m.parameters(recurse=False)) and type(m) not in GradSampleModule.GRAD_SAMPLERS}
    return sorted(types)


def measure_auto_engine(model: nn.Module, patch: list[int], channels: int, classes: int) -> str:
    """What "auto" picks for this model on shape-only data (1 patient, 2 patches), and which engines failed."""
    import math

    from dpunet.privacy.engines.base import PatientBatch
    from dpunet.privacy.engines.registry import AUTO_CANDIDATES, benchmark_engines
    from dpunet.learning.loss import SegmentationLoss

    g = torch.Generator().manual_seed(0)
    batch = PatientBatch(torch.randn(1, 2, channels, *patch, generator=g),
                         [torch.randint(0, classes, (1, 2, 1, *patch), generator=g)])
    timings = benchmark_engines(model.train(), SegmentationLoss(classes, patches_per_patient=2), 1.0, batch,
                                names=AUTO_CANDIDATES, repeats=1)
    ok = {k: v for k, v in timings.items() if math.isfinite(v)}
    failed = sorted(set(timings) - set(ok))
    pick = min(ok, key=ok.get) if ok else "none"
    return f"auto -> {pick}" + (f"; failed: {', '.join(failed)}" if failed else "")


def describe(name: str, config: dict[str, Any], channels: int, classes: int, width: float,
             measure: bool) -> dict[str, str]:
    """One row of the listing; a refusal is reported in the row, not raised."""
    source, dims = source_and_dims(name, config["architecture"])
    row = {"name": name, "source": source, "dims": dims, "params": "-", "engines": ""}
    try:
        torch.manual_seed(0)
        spec, config = arch_for_configuration(config, name, width)
        model = build_network(spec, channels, classes, False)
    except DpunetError as e:
        row["engines"] = "refused: " + " ".join(str(e).split())[:160]
        return row
    row["params"] = f"{count_parameters(model):,}"
    fallback = opacus_fallback_layers(model)
    refused = validate_for_dp(model, "opacus_hooks")
    opacus = ("refused (index buffers in " + ", ".join(sorted({p.split(": ")[1].split()[0] for p in refused}))
              + ")") if refused else (f"fallback for {', '.join(fallback)}" if fallback else "native rules")
    row["engines"] = "functorch: yes; opacus_hooks: " + opacus
    if measure:
        row["engines"] += "; " + measure_auto_engine(model, config["patch_size"], channels, classes)
    if "patch_size_adapted_from" in spec:
        row["engines"] += f"; patch {spec['patch_size_adapted_from']} -> {spec['patch_size']}"
    return row


def load_configuration(task: str, configuration: str) -> tuple[dict[str, Any], int, int]:
    """(plan configuration, channels, classes) of a planned task."""
    from dpunet.training.trainer import load_training_inputs

    _, _, plan_config, _, raw_task = load_training_inputs(task, configuration)
    return plan_config, raw_task.num_channels, raw_task.num_classes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpunet_archs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--task", default=None, help="planned task id or name: count at its configuration")
    p.add_argument("-c", "--configuration", default=None, help="plan configuration with -t (default 3d_fullres, "
                                                                "else the first planned)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (1)")
    p.add_argument("--dim", type=int, choices=[2, 3], default=None,
                   help="without -t: only this dimension of the default configuration (default both)")
    p.add_argument("--measure-engines", action="store_true",
                   help="time the engines as 'auto' does (shape-only data; slow for large networks on CPU)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.task is not None:
        from dpunet.training.trainer import load_plans

        planned = load_plans(args.task)[1]["configurations"]
        configuration = args.configuration or ("3d_fullres" if "3d_fullres" in planned else next(iter(planned)))
        config, channels, classes = load_configuration(args.task, configuration)
        setups = [(f"task {args.task}, {configuration}, patch {config['patch_size']}", config)]
    else:
        channels, classes = DEFAULT_CHANNELS, DEFAULT_CLASSES
        setups = [(f"default {d}D configuration, patch {DEFAULT_PATCH[d]}", default_configuration(d))
                  for d in ((args.dim,) if args.dim else (2, 3))]
    for title, config in setups:
        print(f"== {title}, {channels} channel(s), {classes} classes, width {args.width:g}")
        rows = [describe(n, config, channels, classes, args.width, args.measure_engines)
                for n in architecture_names()]
        print(f"{'name':<18} {'source':<30} {'dims':<6} {'parameters':>12}  engines")
        for r in rows:
            print(f"{r['name']:<18} {r['source']:<30} {r['dims']:<6} {r['params']:>12}  {r['engines']}")
    return 0


if __name__ == "__main__":
    main()
