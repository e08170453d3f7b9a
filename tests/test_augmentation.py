"""Per-patch augmentation: plan entry, reproducibility from the rng alone, source-patch coverage, seg/data
alignment after spatial transforms, in-plane-only augmentation for anisotropic data."""
from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest

from dpunet.planning.augmentation import default_augmentation_params, is_anisotropic_patch, source_patch_size
from dpunet.training.augmentation import PatchAugmenter, augment_patch

INTENSITY_KEYS = ("gaussian_noise", "gaussian_blur", "brightness_multiplicative", "contrast", "low_resolution",
                  "gamma_inverted", "gamma")


def spatial_only(params: dict, p: float = 1.0, mirror: bool = True) -> dict:
    """A copy with every intensity transform off and rotation and scaling always on."""
    params = copy.deepcopy(params)
    for key in INTENSITY_KEYS:
        params[key] = None
    params["spatial"]["p_rotation"] = p
    params["spatial"]["p_scale"] = p
    if not mirror:
        params["mirror_axes"] = []
    params["source_patch_size"] = source_patch_size(params)
    return params


def test_default_params_are_json_and_follow_nnunet():
    p3 = default_augmentation_params([40, 56, 40], 3)
    assert json.loads(json.dumps(p3)) == p3
    assert p3["spatial"]["scale_range"] == [0.7, 1.4] and p3["spatial"]["elastic"] is False
    assert p3["spatial"]["rotation_deg"] == [[-30.0, 30.0]] * 3
    assert p3["mirror_axes"] == [0, 1, 2]
    for key in INTENSITY_KEYS:
        assert 0 < p3[key]["p_per_sample"] <= 1
    assert p3["gamma"]["range"] == p3["gamma_inverted"]["range"] == [0.7, 1.5]
    assert all(s > p and (s - p) % 2 == 0 for s, p in zip(p3["source_patch_size"], p3["patch_size"]))

    aniso = default_augmentation_params([10, 160, 160], 3, anisotropic=True)
    assert aniso["in_plane_only"] and aniso["spatial"]["rotation_deg"][1:] == [[0, 0]] * 2
    assert aniso["source_patch_size"][0] == 10 and aniso["source_patch_size"][1] > 160
    assert aniso["low_resolution"]["ignore_axes"] == [0]
    assert is_anisotropic_patch([10, 160, 160]) and not is_anisotropic_patch([40, 56, 40])

    square = default_augmentation_params([56, 40], 2)
    elongated = default_augmentation_params([32, 128], 2)
    assert square["spatial"]["rotation_deg"] == [[-180.0, 180.0]]
    assert elongated["spatial"]["rotation_deg"] == [[-15.0, 15.0]]
    assert square["mirror_axes"] == [0, 1]
    with pytest.raises(ValueError):
        default_augmentation_params([56, 40], 3)
    with pytest.raises(ValueError):
        default_augmentation_params([56, 40], 2, anisotropic=True)


def test_source_patch_covers_every_reachable_coordinate():
    # a source patch of ones: any coordinate the spatial transform samples outside it would read the 0 border
    params = spatial_only(default_augmentation_params([12, 16, 10], 3), mirror=False)
    params["spatial"]["scale_range"] = [0.7, 1.25]  # the covered zoom-out
    params["spatial"]["order_data"] = 1
    params["source_patch_size"] = source_patch_size(params)
    aug = PatchAugmenter(params)
    ones = np.ones((1, *aug.source_size), np.float32)
    seg = np.zeros((1, *aug.source_size), np.int16)
    rng = np.random.default_rng(3)
    for _ in range(15):
        out, _ = aug(ones, seg, rng)
        assert out.min() > 0.999
    # the same check with the source cut down to the patch itself must fail: the coverage is not vacuous
    small = copy.deepcopy(params)
    small["source_patch_size"] = params["patch_size"]
    aug_small = PatchAugmenter(small)
    outs = [aug_small(np.ones((1, 12, 16, 10), np.float32), np.zeros((1, 12, 16, 10), np.int16), rng)[0]
            for _ in range(5)]
    assert min(o.min() for o in outs) < 0.5


def test_reproducible_from_rng_alone_and_global_state_untouched():
    params = default_augmentation_params([8, 12, 10], 3)
    for key in INTENSITY_KEYS:  # every transform fires, so every source of randomness is exercised
        params[key]["p_per_sample"] = 1.0
    params["spatial"]["p_rotation"] = params["spatial"]["p_scale"] = 1.0
    src = np.random.default_rng(0).normal(size=(2, *params["source_patch_size"])).astype(np.float32)
    seg = (src[:1] > 0.5).astype(np.int16)

    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    a = augment_patch(src, seg, params, np.random.default_rng(42))
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    np.random.seed(999)  # a different global state must not matter
    random.seed(999)
    b = augment_patch(src, seg, params, np.random.default_rng(42))
    c = augment_patch(src, seg, params, np.random.default_rng(43))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    assert a[0].shape == (2, 8, 12, 10) and a[1].shape == (1, 8, 12, 10) and a[1].dtype == np.int16
    assert np.array_equal(src, np.random.default_rng(0).normal(size=src.shape).astype(np.float32))  # input kept


def _blob(shape, centre, radius):
    grid = np.indices(shape).astype(np.float32)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return np.exp(-dist2 / (2 * radius ** 2)).astype(np.float32)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("patch, dim", [([16, 20, 18], 3), ([24, 20], 2)])
def test_seg_stays_aligned_with_data_after_spatial_augmentation(patch, dim):
    params = spatial_only(default_augmentation_params(patch, dim))
    aug = PatchAugmenter(params)
    size = aug.source_size
    # an off-centre blob: the label is the thresholded image, so alignment means seg == (data > 0.5)
    centre = [s / 2 + 3 for s in size]
    data = _blob(size, centre, radius=4.0)[None]
    seg = (data > 0.5).astype(np.int16)
    rng = np.random.default_rng(7)
    changed = 0
    for _ in range(6):
        d, s = aug(data, seg, rng)
        label, thresholded = s[0] == 1, d[0] > 0.5
        assert label.sum() > 0
        assert _dice(label, thresholded) > 0.9
        # an oracle that alignment can fail: the same pair shifted by 2 voxels agrees much less
        assert _dice(np.roll(label, 2, axis=0), thresholded) < _dice(label, thresholded) - 0.1
        crop = tuple(slice((S - p) // 2, (S - p) // 2 + p) for S, p in zip(size, patch))
        changed += not np.allclose(d[0], data[0][crop])
    assert changed >= 5  # the transform really moved things


def test_in_plane_only_augmentation_never_mixes_slices():
    params = spatial_only(default_augmentation_params([4, 24, 24], 3, anisotropic=True))
    params["spatial"]["order_data"] = 0  # exact values: each output slice must show one input slice only
    aug = PatchAugmenter(params)
    z, y, x = aug.source_size
    assert z == 4
    data = np.broadcast_to(np.arange(1, z + 1, dtype=np.float32)[:, None, None], (z, y, x))[None].copy()
    seg = np.broadcast_to(np.arange(1, z + 1, dtype=np.int16)[:, None, None], (z, y, x))[None].copy()
    rng = np.random.default_rng(1)
    for _ in range(8):
        d, s = aug(data, seg, rng)
        for k in range(z):
            values = set(np.unique(d[0, k])) - {0.0}
            labels = set(np.unique(s[0, k])) - {0}
            assert len(values) == 1 and labels == {int(v) for v in values}


def test_augmenter_rejects_wrong_source_size():
    params = default_augmentation_params([8, 8], 2)
    aug = PatchAugmenter(params)
    with pytest.raises(ValueError, match="source patch"):
        aug(np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 8), np.int16), np.random.default_rng(0))
    bad = copy.deepcopy(params)
    bad["source_patch_size"] = [9, 9]
    with pytest.raises(ValueError, match="even"):
        PatchAugmenter(bad)
