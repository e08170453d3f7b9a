"""Non-private pretraining of a task's planned network on public data: images of random processes, or synthetic
brain MR images from the public MNI152 template (dpunet.pretraining.sources; no patient data).

The network is the one the plan describes (with the same --arch and --width the DP run will use), built for
the task's channels and classes; the plan is derived from image headers only, so nothing here touches private
pixels. The checkpoint records what it was trained on, and `dpunet_train --init-from` copies it into the DP
run and lists it in the privacy report.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import dpunet
from dpunet.architectures import (arch_for_configuration, build_network, is_monai_arch, monai_has_deep_supervision,
                                  supervision_levels)
from dpunet.architectures.classic_nets import DEFAULT_ENCODER_DEPTH, default_output_stride, is_classic_arch
from dpunet.paths import results_root
from dpunet.pretraining.sources import RANDOM_IMAGES, public_source
from dpunet.learning.checkpoint import save_checkpoint
from dpunet.learning.loss import SegmentationLoss, deep_supervision_weights, loss_on_labelled_images
from dpunet.learning.schedule import lr_factor, make_optimizer



@dataclass
class PretrainingConfig:
    """Defaults for plans made before pretraining existed; the plan's training block overrides them."""
    arch: str = "unet"
    width: float = 1.0
    steps: int = 1500
    batch_size: int = 32
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    deep_supervision: bool = True
    seed: int = 0
    device: str = "cpu"
    # the per-sample norm replacing BatchNorm in converted networks (dpunet_train --dp-norm, --norm-groups)
    dp_norm: str = "group"
    norm_groups: int = 8
    # the classic families' encoder (dpunet_train --output-stride, None: the family's own; --encoder-depth)
    output_stride: int | None = None
    encoder_depth: int = DEFAULT_ENCODER_DEPTH
    # what the network is pretrained on: a name in dpunet.pretraining.sources.PUBLIC_SOURCES
    source: str = RANDOM_IMAGES


def _encoder_suffix(cfg: PretrainingConfig) -> str:
    # another output stride or depth is another network (depth: other tensors; stride: the same tensors, dilated)
    stride = "" if cfg.output_stride in (None, default_output_stride(cfg.arch)) else \
        f"__output-stride{cfg.output_stride}"
    depth = "" if cfg.encoder_depth == DEFAULT_ENCODER_DEPTH else f"__encoder-depth{cfg.encoder_depth}"
    return stride + depth


def pretrained_checkpoint_path(task_name: str, configuration: str, cfg: PretrainingConfig) -> Path:
    """Where the checkpoint of this pretraining lives: one per (task, configuration, network, steps, seed), so
    every fold and every epsilon of a task starts from the same public weights."""
    # GroupNorm and InstanceNorm weights have the same names and shapes: a non-default norm gets its own file
    norm = "" if (cfg.dp_norm, cfg.norm_groups) == ("group", 8) else \
        "__norm-instance" if cfg.dp_norm == "instance" else f"__norm-group{cfg.norm_groups}"
    name = (f"{cfg.arch}__{configuration}__width{cfg.width:g}{norm}{_encoder_suffix(cfg)}__{cfg.source}"
            f"__steps{cfg.steps}__seed{cfg.seed}.pt")
    return results_root() / task_name / "pretrained" / name


def pretrain_on_public_data(plan_config: dict[str, Any], num_channels: int, num_classes: int,
                            cfg: PretrainingConfig, output: Path, task_name: str) -> dict[str, Any]:
    """Train the planned network on `cfg.source`'s images for `cfg.steps` steps; write the checkpoint to
    `output` (atomically) and return a summary (losses at the start and the end)."""
    make_batch, description = public_source(cfg.source, "pretraining source").load_batches()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    # the patch the network is built for (a MONAI network may adapt the plan's, as dpunet_train does)
    arch, plan_config = arch_for_configuration(plan_config, cfg.arch, cfg.width, cfg.dp_norm, cfg.norm_groups,
                                               cfg.output_stride, cfg.encoder_depth)
    patch = plan_config["patch_size"]
    # MONAI networks other than DynUNet and the classic families give one output (as in dpunet_train)
    deep_supervision = cfg.deep_supervision and not ((is_monai_arch(cfg.arch) and not monai_has_deep_supervision(
        cfg.arch)) or is_classic_arch(cfg.arch))
    model = build_network(arch, num_channels, num_classes, deep_supervision).to(cfg.device)
    n_out, strides = supervision_levels(arch, deep_supervision, len(patch))
    loss_fn = SegmentationLoss(num_classes, None, deep_supervision_weights(n_out))
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate, 0.9, 0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg.steps), desc=f"pretrain on {cfg.source}", unit="step"):
        data, seg = make_batch(rng, cfg.batch_size, patch, num_channels, num_classes)
        loss = loss_on_labelled_images(loss_fn, model, torch.from_numpy(data).to(cfg.device),
                                       torch.from_numpy(seg).long(), strides, n_out).mean()
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(step, cfg.steps, cfg.warmup_steps, "cosine")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    summary = {"steps": cfg.steps, "seconds": time.perf_counter() - t0,
               "loss_first_20_steps": float(np.mean(losses[:20])), "loss_last_20_steps": float(np.mean(losses[-20:]))}
    save_checkpoint({
        "dpunet_version": dpunet.__version__,
        "weights": model.state_dict(),
        "architecture": arch,
        "num_classes": num_classes,
        "num_channels": num_channels,
        "public_source": description.format(seed=cfg.seed),
        "config": {"task": f"{cfg.source} for {task_name}", "configuration": "pretraining", **asdict(cfg)},
        "pretraining_summary": summary,
    }, output)
    return summary
