"""Published segmentation networks from MONAI, selectable with `--arch NAME`, converted for DP by one mechanism.

Each name maps the plan's configuration (dim, patch size, strides, kernels, features) and the width multiplier
to the arguments of one MONAI class. The spec is stored like any other architecture,

    {"class_name": "MonaiNet", "kwargs": {"name": "monai_unet", "monai_class": "UNet", "dim": 3,
     "monai_kwargs": {...}, "dp_norm": "group", "num_groups": 8}, "preset": ..., "width_multiplier": ...}

so `build_network` (and the release file) rebuilds exactly the trained network. `MonaiNet` builds the MONAI
class as published and runs `make_dp_compatible` on it (BatchNorm -> GroupNorm, no in-place activations, no
running statistics). MONAI networks train with a single output, except DynUNet, whose deep-supervision heads
(MONAI interpolates them to full resolution) enter dpunet's loss with dpunet's weights
(`monai_deep_supervision_outputs`); the training config switches deep supervision off for the others.

Which channels --width scales: for the names that follow the plan's topology (monai_unet, attention_unet,
dynunet) the plan's features_per_stage; for the fixed-topology names the MONAI class's published default
channels. VNet has no channel argument in MONAI: its width is fixed (the spec records width_applied false).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dpunet.architectures.dp_conversion import DP_NORMS, make_dp_compatible
from dpunet.utils.errors import DpunetError

MONAI_CLASS_NAME = "MonaiNet"


@dataclass(frozen=True)
class MonaiArch:
    """One `--arch` name backed by a MONAI class."""
    monai_class: str
    dims: tuple[int, ...]
    description: str
    # (plan arch kwargs, patch size, width) -> (MONAI kwargs without in/out channels, per-axis divisor of the patch)
    make_kwargs: Callable[[dict[str, Any], list[int], float], tuple[dict[str, Any], list[int]]]
    width_applied: bool = True
    # the MONAI class has deep-supervision heads (DynUNet: `deep_supervision`, `deep_supr_num`)
    deep_supervision: bool = False


def _scale(channels: Sequence[int], width: float, multiple: int = 4) -> list[int]:
    """Channels times the width, rounded to a positive multiple of `multiple` (GroupNorm then has groups)."""
    return [max(multiple, int(round(c * width / multiple)) * multiple) for c in channels]


def _cumulative(strides: Sequence[Sequence[int]]) -> list[int]:
    return [int(math.prod(s[a] for s in strides)) for a in range(len(strides[0]))]


def _plan_strides(plan: dict[str, Any]) -> list[list[int]]:
    return [[int(v) for v in s] for s in plan["strides"]]


def _monai_unet(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    strides = _plan_strides(plan)
    return ({"channels": _scale(plan["features_per_stage"], width), "strides": strides[1:], "num_res_units": 2},
            _cumulative(strides))


def _attention_unet(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    strides = _plan_strides(plan)
    return {"channels": _scale(plan["features_per_stage"], width), "strides": strides[1:]}, _cumulative(strides)


def _dynunet(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    # nnU-Net's topology in MONAI: the plan's kernels and strides as they are
    strides = _plan_strides(plan)
    kernels = [[int(v) for v in k] for k in plan["kernel_sizes"]]
    return ({"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:],
             "filters": _scale(plan["features_per_stage"], width), "res_block": False}, _cumulative(strides))


def _basic_unet(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    # MONAI's default features (32, 32, 64, 128, 256, 32); four 2x poolings
    return {"features": _scale((32, 32, 64, 128, 256, 32), width)}, [16] * len(patch)


def _segresnet(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    # blocks_down (1, 2, 2, 4): three 2x down-samplings; init_filters 8 by default, kept a multiple of
    # SegResNet's own GroupNorm(8) (it refuses channels its groups do not divide)
    return {"init_filters": _scale([8], width, 8)[0], "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}, \
        [8] * len(patch)


def _vnet(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    # dropout off (published 0.5): p = 0 modules become Identity; dropout is DP-safe but makes the engines'
    # sums differ by their random masks. Four 2x down-samplings. MONAI's VNet has fixed channels (16..256)
    return {"dropout_prob_down": 0.0, "dropout_prob_up": [0.0, 0.0]}, [16] * len(patch)


def _unetr(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    # ViT-B defaults (hidden 768, MLP 3072, 12 heads, features 16) scaled; hidden a multiple of the heads
    heads = 12
    hidden = max(heads, int(round(768 * width / heads)) * heads)
    return ({"img_size": list(patch), "feature_size": _scale([16], width)[0], "hidden_size": hidden,
             "mlp_dim": 4 * hidden, "num_heads": heads}, [16] * len(patch))


def _swin_unetr(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    # feature_size must be a multiple of 12 (MONAI); patch embedding 2 then four 2x mergings: 32
    return {"feature_size": max(12, int(round(24 * width / 12)) * 12)}, [32] * len(patch)


def _flexible_unet(plan: dict[str, Any], patch: list[int], width: float) -> tuple[dict[str, Any], list[int]]:
    # ResNet-10 encoder without pretrained weights (channels fixed by the encoder); the decoder scaled
    return ({"backbone": "resnet10", "pretrained": False,
             "decoder_channels": _scale((256, 128, 64, 32, 16), width)}, [32] * len(patch))


MONAI_ARCHITECTURES: dict[str, MonaiArch] = {
    "monai_unet": MonaiArch("UNet", (2, 3), "MONAI UNet with residual units (2 per level), the plan's topology",
                            _monai_unet),
    "basic_unet": MonaiArch("BasicUNet", (2, 3), "MONAI BasicUNet (5 levels, MONAI's default features)",
                            _basic_unet),
    "unetpp": MonaiArch("BasicUNetPlusPlus", (2, 3), "MONAI BasicUNetPlusPlus (UNet++, Zhou et al. 2018), single "
                        "output", _basic_unet),
    "attention_unet": MonaiArch("AttentionUnet", (2, 3), "MONAI AttentionUnet (Oktay et al. 2018), the plan's "
                                "topology; its BatchNorms become GroupNorms", _attention_unet),
    "segresnet": MonaiArch("SegResNet", (2, 3), "MONAI SegResNet (Myronenko 2018), without the VAE branch",
                           _segresnet),
    "dynunet": MonaiArch("DynUNet", (2, 3), "MONAI DynUNet (nnU-Net topology from the plan), with deep "
                         "supervision (its heads, interpolated to full resolution)", _dynunet, deep_supervision=True),
    "vnet": MonaiArch("VNet", (3,), "MONAI VNet (Milletari et al. 2016), 3D only, fixed channels, dropout off; "
                      "its BatchNorms become GroupNorms", _vnet, width_applied=False),
    "unetr": MonaiArch("UNETR", (2, 3), "MONAI UNETR (Hatamizadeh et al. 2022), ViT-B scaled by the width",
                       _unetr),
    "swin_unetr": MonaiArch("SwinUNETR", (2, 3), "MONAI SwinUNETR (Hatamizadeh et al. 2022)", _swin_unetr),
    "flexible_unet": MonaiArch("FlexibleUNet", (2, 3), "MONAI FlexibleUNet with a ResNet-10 encoder, no pretrained "
                               "weights; its BatchNorms become GroupNorms", _flexible_unet),
}


def is_monai_arch(name: str) -> bool:
    return name in MONAI_ARCHITECTURES


def monai_has_deep_supervision(name: str) -> bool:
    """Whether MONAI name `name` trains with deep supervision in dpunet (DynUNet)."""
    return name in MONAI_ARCHITECTURES and MONAI_ARCHITECTURES[name].deep_supervision


def monai_deep_supervision_outputs(spec: dict[str, Any]) -> int:
    """Outputs of a MONAI spec's network in training with deep supervision, all at full resolution: the
    main output and one head per decoder stage below it except the lowest, as dpunet's U-Net gives
    (n_stages - 1; DynUNet's deep_supr_num is n_stages - 2), or 1 for names without heads."""
    kwargs = spec["kwargs"]
    if not MONAI_ARCHITECTURES[kwargs["name"]].deep_supervision:
        return 1
    return max(1, len(kwargs["monai_kwargs"]["strides"]) - 1)


def _bottleneck_voxels(patch: Sequence[int], divisor: Sequence[int]) -> int:
    return int(math.prod(p // d for p, d in zip(patch, divisor)))


def adapt_patch_size(name: str, patch: Sequence[int], divisor: Sequence[int],
                     image_size: Sequence[float] | None = None) -> tuple[list[int], str]:
    """(patch size, reason) the network `name` is built for: the plan's patch when it meets the per-axis
    `divisor`, else the nearest patch that does (the reason says why; empty when unchanged).

    Per axis: round up to a multiple of the divisor when that stays within the image (the larger of the median
    image extent `image_size` and the plan's patch: the planner already accepted that much padding), else round
    down, never below the divisor. A patch that the network down-samples to a single voxel (per-sample norms
    have nothing to normalise there; InstanceNorm refuses it) grows by one divisor along the axis with the most
    room, as long as the padding stays below half the patch (at most twice the image extent), as nnU-Net pads
    patches larger than small images. Refuses (DpunetError naming the constraint) when no axis can grow."""
    patch = [int(p) for p in patch]
    divisor = [int(d) for d in divisor]
    limit = None if image_size is None else [max(p, int(math.floor(i))) for p, i in zip(patch, image_size)]
    adapted = []
    for a, (p, d) in enumerate(zip(patch, divisor)):
        up = -(-p // d) * d
        adapted.append(up if limit is None or up <= limit[a] else max(d, p // d * d))
    if _bottleneck_voxels(adapted, divisor) < 2:
        grow = None if image_size is None else [max(lim, 2 * int(math.floor(i))) for lim, i in zip(limit, image_size)]
        room = [(grow[a] - adapted[a] if grow is not None else 0) - divisor[a] for a in range(len(adapted))]
        axis = max(range(len(adapted)), key=lambda a: (room[a], a))
        if grow is not None and room[axis] < 0:
            raise DpunetError(f"--arch {name} needs a patch size divisible by {divisor} (per axis) that keeps at "
                              f"least 2 voxels after down-sampling by {divisor}; the images of this configuration "
                              f"(median shape {[int(v) for v in image_size]}, plan patch {patch}) are too small "
                              f"for one (it would be more than half padding): choose another --arch or a "
                              f"configuration with larger images")
        adapted[axis] += divisor[axis]
    if adapted == patch:
        return adapted, ""
    return adapted, (f"--arch {name} needs a patch size divisible by {divisor} (per axis) with at least 2 voxels "
                     f"at its bottleneck: the plan's patch size {patch} is adapted to {adapted}")


def monai_spec(name: str, plan_arch: dict[str, Any], patch_size: Sequence[int] | None, width: float = 1.0,
               dp_norm: str = "group", num_groups: int = 8,
               image_size: Sequence[float] | None = None) -> dict[str, Any]:
    """The architecture spec of MONAI name `name` for a plan (its "architecture" entry, its patch size and,
    when known, the configuration's median image size).

    The spec's "patch_size" is the patch the network is built for: the plan's patch, or the nearest one that
    meets the architecture's divisibility (`adapt_patch_size`), recorded with "patch_size_adapted_from" and
    "patch_size_adapted_because"; training, pretraining, validation and prediction use it.
    Refuses (DpunetError) a dimension the architecture does not exist in, a missing patch size, and a patch
    size that cannot be adapted."""
    entry = MONAI_ARCHITECTURES[name]
    kwargs = plan_arch.get("kwargs", {})
    dim = int(kwargs.get("dim", len(patch_size or [])))
    if dim not in entry.dims:
        raise DpunetError(f"--arch {name} ({entry.monai_class}) exists in {'/'.join(f'{d}D' for d in entry.dims)} "
                          f"only; this configuration is {dim}D")
    if patch_size is None:
        raise DpunetError(f"--arch {name} is built for a patch size; pass the plan configuration's patch_size")
    planned = [int(p) for p in patch_size]
    if len(planned) != dim:
        raise DpunetError(f"patch size {planned} does not have {dim} axes")
    if image_size is not None and len(image_size) != dim:
        raise DpunetError(f"image size {list(image_size)} does not have {dim} axes")
    if dp_norm not in DP_NORMS or int(num_groups) < 1:
        raise DpunetError(f"--dp-norm must be one of {', '.join(DP_NORMS)} and --norm-groups at least 1; got "
                          f"{dp_norm!r} and {num_groups}")
    _, divisor = entry.make_kwargs(kwargs, planned, width)  # the divisor does not depend on the patch
    patch, reason = adapt_patch_size(name, planned, divisor, image_size)
    monai_kwargs, _ = entry.make_kwargs(kwargs, patch, width)
    spec = {"class_name": MONAI_CLASS_NAME,
            "kwargs": {"name": name, "monai_class": entry.monai_class, "dim": dim, "monai_kwargs": monai_kwargs,
                       "dp_norm": dp_norm, "num_groups": int(num_groups), "required_divisor": divisor,
                       "width_applied": entry.width_applied},
            "preset": name, "width_multiplier": float(width), "patch_size": patch}
    if reason:
        spec.update(patch_size_adapted_from=planned, patch_size_adapted_because=reason)
    return spec


class MonaiNet(nn.Module):
    """A MONAI network as published, made fit for DP-SGD.

    Without deep supervision the forward returns one logits tensor. With `deep_supervision` (DynUNet only:
    MONAI's `deep_supervision=True, deep_supr_num=n_stages - 2`) it returns, in training mode, a list of
    n_stages - 1 logits tensors, the main output first, every head interpolated by MONAI to the input's
    resolution (so every level's target is the full-resolution label map); in eval mode, or with the
    `deep_supervision` attribute set to False, only the main output. Other names refuse deep supervision."""

    def __init__(self, in_channels: int, num_classes: int, deep_supervision: bool, name: str, monai_class: str,
                 dim: int, monai_kwargs: dict[str, Any], dp_norm: str = "group", num_groups: int = 8,
                 required_divisor: Sequence[int] | None = None, width_applied: bool = True) -> None:
        super().__init__()
        entry = MONAI_ARCHITECTURES.get(name)
        if deep_supervision and not (entry is not None and entry.deep_supervision):
            raise DpunetError(f"--arch {name} trains without deep supervision in dpunet; build it with "
                              "deep_supervision=False")
        import monai.networks.nets as monai_nets

        cls = getattr(monai_nets, monai_class, None)
        if cls is None:
            raise DpunetError(f"MONAI has no network class {monai_class!r} (monai version mismatch?)")
        self.name, self.dim = name, int(dim)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.required_divisor = [int(d) for d in (required_divisor or [1] * self.dim)]
        heads = max(0, len(monai_kwargs.get("strides", [])) - 2) if deep_supervision else 0
        extra = {"deep_supervision": True, "deep_supr_num": heads} if heads else {}
        self.has_deep_supervision_heads = bool(heads)
        self._deep_supervision = bool(heads)
        try:
            net = cls(spatial_dims=self.dim, in_channels=self.in_channels, out_channels=self.num_classes,
                      **monai_kwargs, **extra)
        except (TypeError, ValueError, AssertionError, ImportError) as e:
            raise DpunetError(f"--arch {name}: MONAI's {monai_class} refused its arguments ({type(e).__name__}: "
                              f"{e})") from None
        self.net = make_dp_compatible(net, dp_norm, num_groups)

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value and not self.has_deep_supervision_heads:
            raise DpunetError(f"--arch {self.name} was built without deep-supervision heads; rebuild it with "
                              "deep_supervision=True")
        self._deep_supervision = bool(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        # some MONAI classes return a list/tuple (UNet++: one entry without deep supervision)
        if isinstance(out, (list, tuple)):
            return out[0]
        if self.has_deep_supervision_heads and self.training:
            # DynUNet in training: (N, heads + 1, C, *S), the main output first
            return list(out.unbind(1)) if self._deep_supervision else out[:, 0]
        return out


def _register() -> None:
    # build_network finds "MonaiNet" specs (plans, release files) through the registry's table
    from dpunet.architectures.registry import NETWORK_CLASSES

    NETWORK_CLASSES[MONAI_CLASS_NAME] = MonaiNet


_register()
