"""Build `dpunet_plans.json` from a fingerprint: per configuration the grid, patch, topology, network (as data),
normalisation, resampling, memory-model batch, augmentation and the DP block."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import dpunet
from dpunet.dataset.msd import TaskInfo
from dpunet.planning import memory
from dpunet.planning.augmentation import default_augmentation_params
from dpunet.planning.dp_plan import (DEFAULTS, default_pretraining_source, plan_dp_block,
                                     training_defaults)
from dpunet.planning.splits import DEFAULT_SPLIT_SCHEME, make_splits
from dpunet.planning.topology import (features_per_stage, fullres_target_spacing, initial_patch_size,
                                      plan_topology)
from dpunet.preprocessing.resampling import ANISOTROPY_THRESHOLD
from dpunet.utils.errors import DpunetError

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


def _augmentation(patch_size: Sequence[int], anisotropic: bool) -> dict[str, Any]:
    return default_augmentation_params(patch_size, len(patch_size), anisotropic=anisotropic)


def _normalisation(fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    schemes = []
    for ch in sorted(fingerprint["intensity"], key=int):
        info = fingerprint["intensity"][ch]
        if info["scheme"] == "ct_window":
            schemes.append({"name": "ct_window", "window": info["window"], "mean": info["mean"], "std": info["std"],
                            "source": info["source"]})
        else:
            schemes.append({"name": "zscore_per_image", "use_nonzero_mask": True})
    return schemes


def _network_and_batch(spacing, median_shape, dim: int, in_channels: int, num_classes: int, options,
                       max_patients: int) -> dict:
    """Patch and topology; shrink the patch until one patient's K patches fit the memory budget."""
    budget = options["gpu_memory_gb"] * 1024 ** 3
    k = options["patches_per_patient"]
    cap = 320 if dim == 3 else 512
    patch = initial_patch_size(spacing, median_shape, 128 if dim == 3 else 1024)
    notes = []
    while True:
        topo = plan_topology(spacing, patch)
        feats = features_per_stage(topo.n_stages, options["base_features"], cap, options["width"])
        n_params = memory.count_unet_parameters(in_channels, num_classes, feats, topo.kernel_sizes)
        fits = memory.patients_per_micro_batch(budget, k, topo.patch_size, topo.strides, feats, n_params, cap=1)
        if fits >= 1 or max(patch) <= 8:
            break
        ratios = np.asarray(topo.patch_size, float) / np.asarray(median_shape, float)
        axis = int(np.argmax(ratios))
        patch[axis] = max(8, patch[axis] - topo.divisor[axis])
        notes.append("patch reduced to fit the memory budget with per-patient gradients")
    per_micro = memory.patients_per_micro_batch(budget, k, topo.patch_size, topo.strides, feats, n_params,
                                                cap=max_patients)
    return {"topology": topo, "features": feats, "num_parameters": n_params,
            "patients_per_micro_batch": max(1, per_micro), "notes": sorted(set(notes))}


def _architecture(topo, feats, dim: int, options) -> dict[str, Any]:
    groups = options["num_groups"]
    return {
        "class_name": "PlainConvUNet",
        "kwargs": {
            "dim": dim,
            "n_stages": topo.n_stages,
            "features_per_stage": feats,
            "kernel_sizes": topo.kernel_sizes,
            "strides": topo.strides,
            "n_conv_per_stage": [2] * topo.n_stages,
            "n_conv_per_stage_decoder": [2] * (topo.n_stages - 1),
            "conv_bias": True,
            "norm": "GroupNorm",
            "norm_kwargs": {"num_groups": groups, "eps": 1e-5, "affine": True},
            "nonlin": "LeakyReLU",
            "nonlin_kwargs": {"negative_slope": 0.01},
            "downsampling": "strided_conv",
            "upsampling": "transposed_conv",
            "weight_standardization": False,
        },
    }


def _configuration(name: str, spacing: list[float], median_shape: list[float], task: TaskInfo,
                   fingerprint: dict, dp_block: dict, options) -> dict[str, Any]:
    dim = 2 if name == "2d" else 3
    plan_spacing = spacing[1:] if dim == 2 else spacing
    plan_shape = median_shape[1:] if dim == 2 else median_shape
    net = _network_and_batch(plan_spacing, plan_shape, dim, task.num_channels, task.num_classes, options,
                             max_patients=dp_block["num_patients"])
    topo = net["topology"]
    anisotropic = dim == 3 and max(spacing) / min(spacing) > ANISOTROPY_THRESHOLD
    k = dp_block["patches_per_patient"]
    return {
        "data_identifier": name,
        "dim": dim,
        "spacing": spacing,
        "median_shape": median_shape,
        "patch_size": topo.patch_size,
        "architecture": _architecture(topo, net["features"], dim, options),
        "num_parameters_estimate": net["num_parameters"],
        "normalization_schemes": _normalisation(fingerprint),
        "resampling": {"data": {"order": 3, "order_z": 0}, "seg": {"order": 1, "order_z": 0},
                       "probabilities": {"order": 1, "order_z": 0},
                       "anisotropy_threshold": ANISOTROPY_THRESHOLD},
        "patients_per_micro_batch": net["patients_per_micro_batch"],
        "batch_size": net["patients_per_micro_batch"] * k,
        "memory_model": {"gpu_memory_gb": options["gpu_memory_gb"], "safety_factor": memory.SAFETY_FACTOR,
                         "counts": "activations + weights/optimiser + one gradient per patient in the micro-batch"},
        "oversample_foreground_fraction": 0.33,
        "augmentation": _augmentation(topo.patch_size, anisotropic),
        "mirror_axes": list(range(dim)),
        "dp": dp_block,
        "training": training_defaults(dp_block["private"], dim, *default_pretraining_source(
            task.name, str(task.raw.get("description", "")), task.channel_names.values(), task.labels.values())),
        "notes": net["notes"],
    }


def _lowres_spacing(spacing: list[float], median_shape: list[float], patch_voxels: float) -> list[float] | None:
    """nnU-Net makes a 3d_lowres configuration when the full-resolution patch covers under 1/4 of a median image:
    coarsen the grid (finest axes first) until it covers about that."""
    shape_mm = np.asarray(median_shape) * np.asarray(spacing)
    if np.prod(median_shape) <= 4 * patch_voxels:
        return None
    lowres = np.asarray(spacing, float)
    while np.prod(shape_mm / lowres) > 4 * patch_voxels:
        finest = lowres.min()
        lowres = np.where(lowres < 2 * finest, lowres * 1.03, lowres)
    return [float(s) for s in lowres]


def plan_experiment(task: TaskInfo, fingerprint: dict[str, Any], configurations: Sequence[str] | None = None,
                    epsilon: float = 8.0, delta: float = DEFAULTS["delta"], patients_per_step: int | None = None,
                    steps: int = DEFAULTS["steps"], patches_per_patient: int = DEFAULTS["patches_per_patient"],
                    clip_norm: float = DEFAULTS["clip_norm"], width: float = 1.0, base_features: int = 32,
                    num_groups: int = 8, gpu_memory_gb: float = 16.0, shape_source: str = "header",
                    max_noise_to_signal: float = DEFAULTS["max_noise_to_signal"],
                    split_scheme: str = DEFAULT_SPLIT_SCHEME) -> tuple[dict[str, Any], list[dict[str, list[str]]]]:
    """(plans, splits). `shape_source` "header" (public metadata, default) or "cropped" (pixel-derived);
    `split_scheme` "patient_hash" (default) or "kfold" (nnU-Net's split, with a fixed-split caveat)."""
    header = fingerprint["header_metadata"]
    if shape_source == "header":
        shapes = header["shapes"]
    elif shape_source == "cropped":
        shapes = fingerprint["derived_from_pixels"]["shapes_after_crop"]
    else:
        raise DpunetError(f"shape source must be 'header' or 'cropped', not '{shape_source}'")
    is_2d_data = all(s[0] == 1 for s in header["shapes"])
    wanted = list(configurations) if configurations else (["2d"] if is_2d_data else ["2d", "3d_fullres"])
    for c in wanted:
        if c not in CONFIGURATIONS:
            raise DpunetError(f"unknown configuration '{c}' (known: {', '.join(CONFIGURATIONS)})")
        if is_2d_data and c != "2d":
            raise DpunetError(f"{task.name} holds 2D images (one slice each): only the '2d' configuration applies")

    splits = make_splits(task.patients, scheme=split_scheme)
    train_patients = {task_case.patient_id for task_case in task.training if task_case.case_id in set(splits[0]["train"])}
    dp_block = plan_dp_block(len(train_patients), epsilon, delta, patients_per_step, steps, patches_per_patient,
                             clip_norm, max_noise_to_signal)
    dp_block["planned_for"] = "fold 0's training patients; the trainer recalibrates sigma for the actual fold"

    spacing = fullres_target_spacing(header["spacings"], shapes)
    scaled = np.asarray(shapes, float) * np.asarray(header["spacings"], float) / np.asarray(spacing)
    median_shape = [float(round(v, 1)) for v in np.median(scaled, axis=0)]
    options = {"gpu_memory_gb": gpu_memory_gb, "patches_per_patient": patches_per_patient, "width": width,
               "base_features": base_features, "num_groups": num_groups}
    configs: dict[str, Any] = {}
    for name in wanted:
        if name == "3d_lowres":
            continue
        configs[name] = _configuration(name, spacing, median_shape, task, fingerprint, dp_block, options)
    if "3d_lowres" in wanted or ("3d_fullres" in configs and configurations is None):
        full = configs.get("3d_fullres") or _configuration("3d_fullres", spacing, median_shape, task, fingerprint,
                                                           dp_block, options)
        low = _lowres_spacing(spacing, median_shape, float(np.prod(full["patch_size"])))
        if low is not None:
            low_shape = [float(round(m * s / l, 1)) for m, s, l in zip(median_shape, spacing, low)]
            configs["3d_lowres"] = _configuration("3d_lowres", low, low_shape, task, fingerprint, dp_block, options)
            configs["3d_lowres"]["notes"].append("low-resolution stage: full-resolution patch covers < 1/4 of "
                                                 "the median image (nnU-Net's rule); no cascade yet")
        elif "3d_lowres" in wanted:
            raise DpunetError(f"{task.name}: no 3d_lowres configuration is needed (the full-resolution patch "
                              f"already covers a quarter of the median image)")

    notes = [
        f"target spacing = median spacing ({'10th percentile on the coarse axis: anisotropic' if spacing != header['median_spacing'] else 'nnU-Net rule'})",
        f"median shape from {'image headers (public metadata)' if shape_source == 'header' else 'shapes after crop to non-zero (pixel-derived, listed as a caveat)'}",
        "norm GroupNorm (not nnU-Net's InstanceNorm default, which DP also allows): per-sample, no running "
        "statistics; non-linearity not in-place; features start at 32 and double up to 320 (3D) / 512 (2D) as in "
        "nnU-Net, scaled by the width multiplier",
        "batch: nnU-Net picks a batch of patches from a VRAM estimate; dpunet plans the logical batch of patients "
        "(q*N) with the privacy budget and the physical micro-batch from a memory model that counts per-patient "
        "gradients",
    ]
    return {
        "dpunet_version": dpunet.__version__,
        "dataset_name": task.name,
        "plans_name": "dpunet_plans",
        "shape_source": shape_source,
        "split_scheme": split_scheme,
        "num_channels": task.num_channels,
        "labels": {str(k): v for k, v in task.labels.items()},
        "ignore_label": task.ignore_label,
        "background_label": task.background_label,
        "num_classes": task.num_classes,
        "fingerprint_privacy": fingerprint["privacy"],
        "configurations": configs,
        "notes": notes,
    }, splits
