"""The segmentation loss, per sample: cross-entropy plus soft Dice, with deep supervision.

DP-SGD clips each patient's gradient, so the loss must return one value per sample and the value of sample
i may depend on sample i alone: Dice is computed per sample and per class (never nnU-Net's batch Dice), and
nothing is reduced across the batch. Every operation is a tensor operation without data-dependent Python
control flow and without .item(), so the loss runs under torch.func.vmap (one patient's K patches per call)
as well as on a flat batch.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from dpunet.utils.errors import DpunetError

Outputs = Union[Tensor, Sequence[Tensor]]


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's weights: 1/2^i for output i (highest resolution first), the lowest resolution set to 0,
    normalised to sum to one. A single output gets weight 1."""
    if n_outputs < 1:
        raise ValueError(f"need at least one output, got {n_outputs}")
    if n_outputs == 1:
        return [1.0]
    weights = [1.0 / 2**i for i in range(n_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_seg_for_deep_supervision(seg: Tensor, strides: Sequence[Sequence[int]],
                                        num_outputs: int | None = None) -> list[Tensor]:
    """Targets for the deep-supervision outputs: order-0 (nearest) down-sampling of a label map.

    `seg` is (..., *spatial) with the spatial axes last (e.g. (N, 1, *S) or (B, K, 1, *S)); `strides` are the
    network's per-stage strides (architecture kwargs "strides"). Level l is `seg` taken every c-th voxel per
    axis, c the cumulative product of strides[0..l]; there are len(strides) - 1 levels (one per decoder
    stage, highest resolution first), or `num_outputs` levels when given (1 without deep supervision)."""
    n_levels = len(strides) - 1 if num_outputs is None else int(num_outputs)
    if not 1 <= n_levels <= len(strides):
        raise DpunetError(f"cannot make {n_levels} deep-supervision targets from {len(strides)} strides")
    dim = len(strides[0])
    spatial = seg.shape[-dim:]
    targets, cumulative = [], [1] * dim
    for level in range(n_levels):
        cumulative = [c * int(s) for c, s in zip(cumulative, strides[level])]
        if any(n % c for n, c in zip(spatial, cumulative)):
            raise DpunetError(f"label map of spatial shape {tuple(spatial)} is not divisible by the cumulative "
                              f"stride {cumulative} of deep-supervision level {level}")
        index = (Ellipsis,) + tuple(slice(None, None, c) for c in cumulative)
        targets.append(seg[index])
    return targets


class SegmentationLoss(nn.Module):
    """dice_weight * (1 - mean soft Dice) + ce_weight * cross-entropy, per sample, summed over deep-
    supervision levels with `deep_supervision_weights`.

    forward(outputs, targets) -> Tensor of shape (N,):
      outputs: logits (N, C, *S) or a list of them, highest resolution first;
      targets: integer label maps (N, 1, *S_l), a list with one per output (a bare tensor for one output).
    With `patches_per_patient` K > 1, the N = B*K patches are consecutive groups of K per patient and the Dice
    term is computed over each patient's K patches together (see `_pool_over_patient`).
    Voxels equal to `ignore_label` count in neither term. Cross-entropy is the mean over a sample's valid
    voxels (0 for a sample whose voxels are all ignored). Dice is computed per sample and class,
    (2 TP + smooth) / (sum p + sum y + smooth), averaged over the classes (background excluded unless
    `include_background_in_dice`). Levels whose weight is 0 still enter the sum (times 0) so that every
    head receives a (zero) gradient, which per-sample gradient hooks expect.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int | None = None,
        deep_supervision_weights: list[float] | None = None,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        dice_smooth: float = 1e-5,
        include_background_in_dice: bool = False,
        patches_per_patient: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise DpunetError(f"segmentation needs at least 2 classes (background + one), got {num_classes}")
        if ignore_label is not None and 0 <= ignore_label < num_classes:
            raise DpunetError(f"ignore label {ignore_label} collides with a class index (0..{num_classes - 1})")
        self.num_classes = int(num_classes)
        self.ignore_label = ignore_label
        self.ds_weights = None if deep_supervision_weights is None else [float(w) for w in deep_supervision_weights]
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.dice_smooth = float(dice_smooth)
        self.include_background_in_dice = bool(include_background_in_dice)
        if patches_per_patient < 1:
            raise DpunetError(f"patches_per_patient must be >= 1, got {patches_per_patient}")
        self.patches_per_patient = int(patches_per_patient)

    def forward(self, outputs: Outputs, targets: Sequence[Tensor] | Tensor) -> Tensor:
        outputs_list = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        targets_list = [targets] if isinstance(targets, Tensor) else list(targets)
        if len(targets_list) < len(outputs_list):
            raise DpunetError(f"{len(outputs_list)} network outputs but only {len(targets_list)} targets")
        weights = self.ds_weights if self.ds_weights is not None else deep_supervision_weights(len(outputs_list))
        if len(weights) != len(outputs_list):
            raise DpunetError(f"{len(weights)} deep-supervision weights for {len(outputs_list)} network outputs")
        total = None
        for w, logits, target in zip(weights, outputs_list, targets_list):
            level = w * self.level_loss(logits, target)
            total = level if total is None else total + level
        return total

    def level_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss (N,) of one output against its (N, 1, *S) label map."""
        ce, dice = self.components(logits, target)
        return self.ce_weight * ce + self.dice_weight * (1.0 - dice)

    def components(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample cross-entropy (N,) and mean soft Dice (N,) of one output."""
        if logits.shape[1] != self.num_classes:
            raise DpunetError(f"logits have {logits.shape[1]} channels, loss expects {self.num_classes} classes")
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
            raise DpunetError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32 under autocast
        target = target.long()
        spatial_dims = tuple(range(2, logits.ndim))

        if self.ignore_label is None:
            valid = torch.ones_like(target, dtype=logits.dtype)
        else:
            valid = (target != self.ignore_label).to(logits.dtype)
        classes = torch.arange(self.num_classes, device=logits.device).view(1, -1, *([1] * len(spatial_dims)))
        # one-hot by comparison (vmap-safe); an ignored voxel's label is out of range or masked by `valid`
        onehot = (target == classes).to(logits.dtype) * valid

        log_probs = torch.log_softmax(logits, dim=1)
        nll = -(log_probs * onehot).sum(dim=1, keepdim=True)  # 0 at ignored voxels
        n_valid = valid.sum(dim=spatial_dims).squeeze(1)
        ce = nll.sum(dim=spatial_dims).squeeze(1) / n_valid.clamp(min=1.0)

        probs = log_probs.exp() * valid
        tp = self._pool_over_patient((probs * onehot).sum(dim=spatial_dims))
        denominator = self._pool_over_patient(probs.sum(dim=spatial_dims) + onehot.sum(dim=spatial_dims))
        dice_per_class = (2.0 * tp + self.dice_smooth) / (denominator + self.dice_smooth).clamp(min=1e-8)
        if not self.include_background_in_dice:
            dice_per_class = dice_per_class[:, 1:]
        return ce, dice_per_class.mean(dim=1)

    def _pool_over_patient(self, per_patch: Tensor) -> Tensor:
        """Sum Dice statistics (N, C) over the K consecutive patches of each patient and give every patch its
        patient's sums: the patient analogue of nnU-Net's batch Dice. A slice without a class would otherwise
        reward never predicting it; pooling never crosses patients (the privacy unit), and averaging the
        replicated value over the K patches (as every engine does) yields exactly the patient's Dice loss."""
        k = self.patches_per_patient
        if k == 1:
            return per_patch
        n, c = per_patch.shape
        if n % k:
            raise DpunetError(f"{n} patches are not whole patients of {k} patches each")
        return per_patch.reshape(n // k, k, c).sum(1, keepdim=True).expand(n // k, k, c).reshape(n, c)


def loss_on_labelled_images(loss: SegmentationLoss, net: nn.Module, images: Tensor, labels: Tensor,
                            strides: Sequence[Sequence[int]], num_outputs: int) -> Tensor:
    """Per-sample loss (B,) of `net` on independent labelled images (B, C, *S) / (B, 1, *S), e.g. public
    samples: the labels are down-sampled for the deep-supervision outputs on the CPU, then moved to the
    images' device."""
    targets = downsample_seg_for_deep_supervision(labels.cpu(), strides, num_outputs)
    return loss(net(images), [t.to(images.device) for t in targets])
