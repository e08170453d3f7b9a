"""Intensity normalisation schemes. None of them uses statistics pooled over patients from private data:

- `zscore_per_image`: each image by its own mean/std (inside its non-zero mask when the crop left much
  background); touches only that patient's pixels, so it is part of the per-patient input to DP-SGD.
- `ct_window`: clip to a Hounsfield window and z-score with a fixed mean/std that are either a declared public
  prior or a DP estimate whose epsilon is recorded in the fingerprint and added to the privacy report.
- `rescale_0_1`: fixed affine map from a declared value range (e.g. 0..255 for 8-bit natural images).
"""
from __future__ import annotations

import numpy as np

from dpunet.utils.errors import DpunetError

SCHEMES = ("zscore_per_image", "ct_window", "rescale_0_1")


def normalise_channel(image: np.ndarray, scheme: dict, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one (z, y, x) channel. `scheme` is a plan entry {"name": ..., parameters}."""
    name = scheme["name"]
    image = image.astype(np.float32, copy=False)
    if name == "zscore_per_image":
        use = mask if (mask is not None and scheme.get("use_nonzero_mask", True) and mask.any()) else None
        values = image[use] if use is not None else image
        mean, std = float(values.mean()), float(values.std())
        out = (image - mean) / max(std, 1e-8)
        if use is not None:
            out[~use] = 0.0
        return out
    if name == "ct_window":
        lo, hi = scheme["window"]
        return (np.clip(image, lo, hi) - scheme["mean"]) / max(scheme["std"], 1e-8)
    if name == "rescale_0_1":
        lo, hi = scheme["range"]
        return (image - lo) / (hi - lo)
    raise DpunetError(f"unknown normalisation scheme '{name}' (known: {', '.join(SCHEMES)})")


def use_mask_for_zscore(mask: np.ndarray, threshold: float = 0.75) -> bool:
    """nnU-Net's rule, applied per image: z-score inside the body when it fills less than 3/4 of the box."""
    return bool(mask.mean() < threshold)


def normalise(data: np.ndarray, schemes: list[dict], nonzero: np.ndarray) -> np.ndarray:
    """Normalise (c, z, y, x) data channel by channel."""
    if len(schemes) != data.shape[0]:
        raise DpunetError(f"plan has {len(schemes)} normalisation schemes for {data.shape[0]} channels")
    mask = nonzero if use_mask_for_zscore(nonzero) else None
    return np.stack([normalise_channel(c, s, mask) for c, s in zip(data, schemes)]).astype(np.float32)
