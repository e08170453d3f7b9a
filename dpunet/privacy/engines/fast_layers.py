"""Per-layer maths of the fast engine: per-patient gradients, ghost norms and clipped sums from a layer's
input activation `a` (N, ...) and output gradient `g` (N, ...), N = B*K patches, patient-major.

A per-patient gradient sums the K patches of the patient, so every op here works on the patient axis B and
folds K into the reduction. Nothing here unfolds a large activation: convolution weight gradients go through
the native weight-gradient kernel (aten.convolution_backward), per patient via a grouped convolution with
groups = B (the K patches become the batch of that convolution). Only ghost norms unfold, and the cost model
allows them only for layers with few output positions.

Under autocast a layer ran in its output's dtype (bf16 for convs, fp32 for norms); its output gradient has
that dtype, so each rule computes in `g.dtype` and returns fp32 results.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

conv_backward = torch.ops.aten.convolution_backward

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
INSTANCE_NORM_TYPES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def patient_major(t: Tensor, num_patients: int) -> Tensor:
    """(B*K, ...) -> (B, K, ...)."""
    return t.reshape(num_patients, t.shape[0] // num_patients, *t.shape[1:])


def k_major_channels(t: Tensor, num_patients: int) -> Tensor:
    """(B*K, C, *S) -> (K, B*C, *S): patients become channel groups, patches the batch (a copy only if K > 1)."""
    per = patient_major(t, num_patients)
    return per.transpose(0, 1).reshape(per.shape[1], num_patients * t.shape[1], *t.shape[2:])


class LayerRule(ABC):
    """How to get per-patient gradients of one kind of layer's own parameters."""

    @abstractmethod
    def positions(self, module: nn.Module, a: Tensor, g: Tensor) -> int:
        """T: output positions per patch that share the weight (ghost-norm Gram size is (K*T)^2)."""

    def ghost_capable(self, module: nn.Module) -> bool:
        return False

    @abstractmethod
    def per_patient(self, module: nn.Module, a: Tensor, g: Tensor, num_patients: int,
                    names: Sequence[str]) -> dict[str, Tensor]:
        """{param name: (B, *param.shape) fp32} for the requested parameter names."""

    def ghost_sq_norms(self, module: nn.Module, a: Tensor, g: Tensor, num_patients: int) -> Tensor:
        """(B,) fp32 squared norms of the per-patient weight gradients, without instantiating them."""
        raise NotImplementedError(f"{type(module).__name__} has no ghost norm")

    def summed_weight_grad(self, module: nn.Module, a: Tensor, g_scaled: Tensor) -> Tensor:
        """sum over patches of the weight gradient for an already per-patient-scaled output gradient."""
        raise NotImplementedError(f"{type(module).__name__} has no ghost norm")


def _bias_per_patient(g: Tensor, num_patients: int) -> Tensor:
    """Per-patient bias gradient: g summed over the patient's patches and all positions, channel axis 1."""
    dtype = torch.promote_types(g.dtype, torch.float32)  # fp32 sums of bf16 gradients, float64 kept
    per_patch = g.flatten(2).sum(dim=2, dtype=dtype) if g.dim() > 2 else g.to(dtype)
    return patient_major(per_patch, num_patients).sum(dim=1).float()


class ConvRule(LayerRule):
    """Conv{1,2,3}d and ConvTranspose{1,2,3}d (any stride, padding, dilation, groups, padding mode)."""

    @staticmethod
    def geometry(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, dict]:
        """The convolution's real input (after non-zero padding modes) and its aten arguments."""
        dim = a.dim() - 2
        transposed = isinstance(module, TRANSPOSED_CONV_TYPES)
        padding = module.padding
        if not transposed and module.padding_mode != "zeros":
            # the module pads itself (reflect, replicate, circular) and then convolves without padding
            a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = (0,) * dim
        elif isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * dim
            else:  # "same" (stride 1): torch pads the extra odd element on the right
                total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
                left = [t // 2 for t in total]
                if any(t % 2 for t in total):
                    pad_pairs = []
                    for t, lft in zip(reversed(total), reversed(left)):
                        pad_pairs += [lft, t - lft]
                    a = F.pad(a, pad_pairs)
                    left = [0] * dim
                padding = tuple(left)
        output_padding = (0,) * dim
        if transposed:
            # effective output padding from the real shapes (forward(x, output_size) may have changed it)
            output_padding = tuple(
                int(o - ((i - 1) * s - 2 * p + d * (k - 1) + 1))
                for o, i, s, p, d, k in zip(g.shape[2:], a.shape[2:], module.stride, padding, module.dilation,
                                           module.kernel_size)
            )
        args = dict(stride=list(module.stride), padding=list(padding), dilation=list(module.dilation),
                    transposed=transposed, output_padding=list(output_padding), groups=module.groups)
        return a, args

    def positions(self, module: nn.Module, a: Tensor, g: Tensor) -> int:
        # transposed convs share each weight over the input positions
        spatial = a.shape[2:] if isinstance(module, TRANSPOSED_CONV_TYPES) else g.shape[2:]
        return int(math.prod(spatial))

    def ghost_capable(self, module: nn.Module) -> bool:
        return isinstance(module, CONV_TYPES) and module.groups == 1

    def per_patient(self, module, a, g, num_patients, names):
        out: dict[str, Tensor] = {}
        if "bias" in names:
            out["bias"] = _bias_per_patient(g, num_patients)
        if "weight" in names:
            a, args = self.geometry(module, a.to(g.dtype), g)
            weight_shape = module.weight.shape
            # the weight gradient kernel reads only the weight's shape: a stride-0 view costs no memory
            fake_weight = g.new_zeros(()).expand(num_patients * weight_shape[0], *weight_shape[1:])
            args = dict(args, groups=args["groups"] * num_patients)
            _, grad_w, _ = conv_backward(k_major_channels(g, num_patients), k_major_channels(a, num_patients),
                                         fake_weight, None, **args, output_mask=[False, True, False])
            out["weight"] = grad_w.view(num_patients, *weight_shape).float()
        return out

    def _unfold(self, module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
        """(N, T, C_in * prod(kernel)) patches of a groups=1 convolution (only for small T)."""
        a, args = self.geometry(module, a, g)
        dim = a.dim() - 2
        pad_pairs = []
        for p in reversed(args["padding"]):
            pad_pairs += [p, p]
        x = F.pad(a, pad_pairs) if any(args["padding"]) else a
        for d in range(dim):
            span = args["dilation"][d] * (module.kernel_size[d] - 1) + 1
            x = x.unfold(2 + d, span, args["stride"][d])
        if any(d != 1 for d in args["dilation"]):
            x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in args["dilation"])]
        # (N, C, *T_axes, *k) -> (N, *T_axes, C, *k) -> (N, T, D)
        perm = [0] + list(range(2, 2 + dim)) + [1] + list(range(2 + dim, 2 + 2 * dim))
        n = x.shape[0]
        t = math.prod(x.shape[2:2 + dim])
        return x.permute(perm).reshape(n, t, -1)

    def ghost_sq_norms(self, module, a, g, num_patients):
        patches = patient_major(self._unfold(module, a.float(), g), num_patients).flatten(1, 2)  # (B, KT, D)
        grads = patient_major(g.float().flatten(2).transpose(1, 2), num_patients).flatten(1, 2)  # (B, KT, Cout)
        return _ghost_from_grams(patches, grads)

    def summed_weight_grad(self, module, a, g_scaled):
        a, args = self.geometry(module, a.to(g_scaled.dtype), g_scaled)
        fake_weight = g_scaled.new_zeros(()).expand(*module.weight.shape)
        _, grad_w, _ = conv_backward(g_scaled, a, fake_weight, None, **args, output_mask=[False, True, False])
        return grad_w.float()


def _ghost_from_grams(patches: Tensor, grads: Tensor) -> Tensor:
    """||sum_t a_t g_t^T||_F^2 per patient = sum_{t,t'} (a_t . a_t')(g_t . g_t') (Goodfellow's ghost norm)."""
    gram_a = torch.bmm(patches, patches.transpose(1, 2))
    gram_g = torch.bmm(grads, grads.transpose(1, 2))
    return (gram_a * gram_g).sum(dim=(1, 2))


class LinearRule(LayerRule):
    """nn.Linear on (N, ..., in_features)."""

    def positions(self, module, a, g):
        return int(math.prod(a.shape[1:-1]))

    def ghost_capable(self, module):
        return True

    @staticmethod
    def _tokens(t: Tensor, num_patients: int) -> Tensor:
        """(B*K, ..., F) -> (B, K*T, F)."""
        return t.reshape(num_patients, -1, t.shape[-1])

    def per_patient(self, module, a, g, num_patients, names):
        out: dict[str, Tensor] = {}
        grads = self._tokens(g, num_patients)
        if "bias" in names:
            out["bias"] = grads.sum(dim=1, dtype=torch.promote_types(g.dtype, torch.float32)).float()
        if "weight" in names:
            out["weight"] = torch.bmm(grads.transpose(1, 2), self._tokens(a.to(g.dtype), num_patients)).float()
        return out

    def ghost_sq_norms(self, module, a, g, num_patients):
        return _ghost_from_grams(self._tokens(a.float(), num_patients), self._tokens(g.float(), num_patients))

    def summed_weight_grad(self, module, a, g_scaled):
        grads = g_scaled.reshape(-1, g_scaled.shape[-1])
        return (grads.t() @ a.to(g_scaled.dtype).reshape(-1, a.shape[-1])).float()


class GroupNormRule(LayerRule):
    """GroupNorm and InstanceNorm (affine, normalised by per-sample statistics): InstanceNorm is GroupNorm
    with one channel per group. Per-patient grads: weight = sum x_hat * g, bias = sum g per channel."""

    @staticmethod
    def num_groups(module: nn.Module) -> int:
        return module.num_groups if isinstance(module, nn.GroupNorm) else module.num_features

    def positions(self, module, a, g):
        return int(math.prod(a.shape[2:]))

    def per_patient(self, module, a, g, num_patients, names):
        out: dict[str, Tensor] = {}
        if "bias" in names:
            out["bias"] = _bias_per_patient(g, num_patients)
        if "weight" in names:
            # recompute the normalised input (an elementwise pass) rather than keep a copy from the forward
            dtype = torch.promote_types(torch.promote_types(a.dtype, g.dtype), torch.float32)
            x_hat = F.group_norm(a.to(dtype), self.num_groups(module), eps=module.eps)
            per_patch = torch.einsum("ncs,ncs->nc", x_hat.flatten(2), g.to(dtype).flatten(2))
            out["weight"] = patient_major(per_patch, num_patients).sum(dim=1).float()
        return out


def rule_for(module: nn.Module) -> LayerRule | None:
    """The exact-type rule for a module, or None (subclasses may change forward, e.g. weight
    standardisation, and go to the generic fallback)."""
    kind = type(module)
    if kind in CONV_TYPES or kind in TRANSPOSED_CONV_TYPES:
        return _CONV
    if kind is nn.Linear:
        return _LINEAR
    if kind is nn.GroupNorm and module.affine:
        return _GROUP_NORM
    if kind in INSTANCE_NORM_TYPES and module.affine and (module.training or not module.track_running_stats):
        return _GROUP_NORM
    return None


_CONV = ConvRule()
_LINEAR = LinearRule()
_GROUP_NORM = GroupNormRule()
