"""SegmentationLoss: per-sample CE + soft Dice against independent oracles, sample independence, ignore
label, vmap safety, deep-supervision weights and targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from dpunet.learning.loss import SegmentationLoss, deep_supervision_weights, downsample_seg_for_deep_supervision
from dpunet.utils.errors import DpunetError

C = 4  # classes 0..3, ignore label 4
IGNORE = 4


def _data(n=3, shape=(6, 8), seed=0, ignore_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, *shape, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (n, 1, *shape), generator=g)
    ignored = torch.rand(n, 1, *shape, generator=g) < ignore_fraction
    target[ignored] = IGNORE
    return logits, target


def _numpy_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float, include_bg: bool,
                ignore: int | None) -> np.ndarray:
    """Soft Dice per sample, averaged over classes, by explicit loops in numpy."""
    x = logits.detach().double().numpy()
    t = target.numpy()[:, 0]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    out = []
    for i in range(x.shape[0]):
        valid = np.ones_like(t[i], dtype=bool) if ignore is None else t[i] != ignore
        scores = []
        for c in range(0 if include_bg else 1, x.shape[1]):
            pc = p[i, c][valid]
            yc = (t[i][valid] == c).astype(np.float64)
            scores.append((2 * (pc * yc).sum() + smooth) / (pc.sum() + yc.sum() + smooth))
        out.append(np.mean(scores))
    return np.array(out)


def test_deep_supervision_weights_match_nnunet_rule():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    for n in range(2, 7):
        w = deep_supervision_weights(n)
        assert sum(w) == pytest.approx(1.0) and w[-1] == 0.0
        assert all(a == pytest.approx(2 * b) for a, b in zip(w[:-2], w[1:-1]))


def test_cross_entropy_matches_torch_per_sample():
    logits, target = _data()
    loss = SegmentationLoss(C, ignore_label=IGNORE)
    ce, _ = loss.components(logits, target)
    for i in range(logits.shape[0]):
        expected = F.cross_entropy(logits[i:i + 1], target[i:i + 1, 0], ignore_index=IGNORE)
        assert ce[i].item() == pytest.approx(expected.item(), rel=1e-10)


def test_cross_entropy_without_ignore_label_matches_torch():
    logits, target = _data(ignore_fraction=0.0)
    ce, _ = SegmentationLoss(C, ignore_label=None).components(logits, target)
    expected = torch.stack([F.cross_entropy(logits[i:i + 1], target[i:i + 1, 0]) for i in range(3)])
    torch.testing.assert_close(ce, expected)


@pytest.mark.parametrize("include_bg", [False, True])
@pytest.mark.parametrize("ignore", [None, IGNORE])
def test_dice_matches_numpy(include_bg, ignore):
    logits, target = _data(ignore_fraction=0.0 if ignore is None else 0.25, seed=3)
    loss = SegmentationLoss(C, ignore_label=ignore, include_background_in_dice=include_bg, dice_smooth=1e-5)
    _, dice = loss.components(logits, target)
    np.testing.assert_allclose(dice.numpy(), _numpy_dice(logits, target, 1e-5, include_bg, ignore), rtol=1e-10)


def test_dice_is_one_for_a_perfect_prediction_and_loss_combines_terms():
    _, target = _data(ignore_fraction=0.0, seed=5)
    perfect = 50.0 * F.one_hot(target[:, 0], C).permute(0, 3, 1, 2).double()
    loss = SegmentationLoss(C, ignore_label=None)
    ce, dice = loss.components(perfect, target)
    assert torch.all(dice > 1 - 1e-6) and torch.all(ce < 1e-6)

    logits, target = _data(seed=6)
    weighted = SegmentationLoss(C, ignore_label=IGNORE, dice_weight=0.3, ce_weight=2.0)
    ce, dice = weighted.components(logits, target)
    torch.testing.assert_close(weighted(logits, [target]), 2.0 * ce + 0.3 * (1 - dice))


def test_deep_supervision_sum_uses_weights_per_level():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, C, (2, 1, 8, 8), generator=g)
    targets = downsample_seg_for_deep_supervision(target, [[1, 1], [2, 2], [2, 2], [2, 2]])
    outputs = [torch.randn(2, C, *t.shape[2:], generator=g, dtype=torch.float64) for t in targets]
    loss = SegmentationLoss(C, ignore_label=None)
    assert len(outputs) == 3  # weights 2/3, 1/3 and 0 for the lowest resolution
    expected = (2 / 3) * loss.level_loss(outputs[0], targets[0]) + (1 / 3) * loss.level_loss(outputs[1], targets[1])
    torch.testing.assert_close(loss(outputs, targets), expected)
    custom = SegmentationLoss(C, ignore_label=None, deep_supervision_weights=[0.5, 0.25, 0.25])
    expected = sum(w * loss.level_loss(o, t) for w, o, t in zip([0.5, 0.25, 0.25], outputs, targets))
    torch.testing.assert_close(custom(outputs, targets), expected)
    with pytest.raises(DpunetError, match="weights"):
        SegmentationLoss(C, None, deep_supervision_weights=[1.0])(outputs, targets)


def test_loss_of_a_sample_does_not_depend_on_other_samples():
    logits, target = _data(n=4, seed=7)
    loss = SegmentationLoss(C, ignore_label=IGNORE)
    base = loss(logits, [target])
    assert base.shape == (4,)
    other_logits, other_target = _data(n=4, seed=8)
    logits2, target2 = logits.clone(), target.clone()
    logits2[1:], target2[1:] = other_logits[1:], other_target[1:]
    assert torch.equal(loss(logits2, [target2])[0], base[0])

    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x, [target])[0], x)
    assert torch.count_nonzero(g[1:]) == 0
    assert torch.count_nonzero(g[0]) > 0


def test_ignored_voxels_change_nothing():
    logits, target = _data(seed=9, ignore_fraction=0.3)
    ignored = (target == IGNORE).expand_as(logits)
    loss = SegmentationLoss(C, ignore_label=IGNORE)
    base = loss(logits, [target])
    changed = torch.where(ignored, 100 * torch.randn_like(logits), logits)
    assert torch.equal(loss(changed, [target]), base)
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x, [target]).sum(), x)
    assert torch.count_nonzero(g[ignored]) == 0


def test_sample_with_only_ignored_voxels_gives_zero_loss_and_gradient():
    logits, target = _data(n=2, seed=10)
    target[1] = IGNORE
    x = logits.clone().requires_grad_()
    out = SegmentationLoss(C, ignore_label=IGNORE)(x, [target])
    assert out[1].item() == 0.0 and torch.isfinite(out).all()
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.count_nonzero(g[1]) == 0 and torch.isfinite(g).all()


def test_loss_runs_under_vmap_per_patient():
    """B patients x K patches: vmapped loss and gradient equal the flat computation."""
    B, K = 3, 2
    logits, target = _data(n=B * K, seed=11)
    loss = SegmentationLoss(C, ignore_label=IGNORE)
    flat = loss(logits, [target]).view(B, K)
    per_patient = vmap(lambda x, t: loss(x, [t]))(logits.view(B, K, *logits.shape[1:]),
                                                  target.view(B, K, *target.shape[1:]))
    torch.testing.assert_close(per_patient, flat)

    gv = vmap(grad(lambda x, t: loss(x, [t]).mean()))(logits.view(B, K, *logits.shape[1:]),
                                                      target.view(B, K, *target.shape[1:]))
    for b in range(B):
        x = logits[b * K:(b + 1) * K].clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(x, [target[b * K:(b + 1) * K]]).mean(), x)
        torch.testing.assert_close(gv[b], g)


def test_low_precision_logits_give_fp32_loss():
    logits, target = _data(seed=12)
    out = SegmentationLoss(C, ignore_label=IGNORE)(logits.to(torch.bfloat16), [target])
    assert out.dtype == torch.float32


def test_invalid_configuration_is_rejected():
    with pytest.raises(DpunetError, match="collides"):
        SegmentationLoss(4, ignore_label=2)
    with pytest.raises(DpunetError, match="channels"):
        SegmentationLoss(3)(torch.zeros(1, 4, 4, 4), [torch.zeros(1, 1, 4, 4, dtype=torch.long)])
    with pytest.raises(DpunetError, match="does not match"):
        SegmentationLoss(4)(torch.zeros(1, 4, 4, 4), [torch.zeros(1, 1, 2, 4, dtype=torch.long)])


def test_downsampled_targets_match_nearest_interpolation():
    g = torch.Generator().manual_seed(13)
    seg = torch.randint(0, 5, (2, 1, 8, 16, 16), generator=g)
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    levels = downsample_seg_for_deep_supervision(seg, strides)
    assert [tuple(t.shape[2:]) for t in levels] == [(8, 16, 16), (8, 8, 8), (4, 4, 4)]
    for t in levels:
        oracle = F.interpolate(seg.float(), size=t.shape[2:], mode="nearest").long()
        assert torch.equal(t, oracle) and t.dtype == seg.dtype
    # patient-major (B, K, 1, *S) label maps work the same
    bk = downsample_seg_for_deep_supervision(seg.view(1, 2, 1, 8, 16, 16), strides)
    assert all(torch.equal(a.flatten(0, 1), b) for a, b in zip(bk, levels))
    assert len(downsample_seg_for_deep_supervision(seg, strides, num_outputs=1)) == 1
    with pytest.raises(DpunetError, match="not divisible"):
        downsample_seg_for_deep_supervision(seg[..., :15], strides)


# ----- Dice pooled over a patient's K patches (the patient analogue of batch Dice) -------------------------
def _patient_batch(b: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b * k, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (b * k, 1, 6, 7), generator=g)
    target[1, 0][target[1, 0] == 1] = 0  # a patch without class 1
    return logits, target


def test_patient_pooled_dice_equals_dice_of_concatenated_patches():
    b, k = 3, 4
    logits, target = _patient_batch(b, k)
    pooled = SegmentationLoss(3, patches_per_patient=k)
    _, dice = pooled.components(logits, target)
    single = SegmentationLoss(3)
    for p in range(b):
        # the K patches of a patient side by side as one image: the ordinary per-sample Dice of that image
        joined_logits = torch.cat(list(logits[p * k:(p + 1) * k]), dim=-1)[None]
        joined_target = torch.cat(list(target[p * k:(p + 1) * k]), dim=-1)[None]
        _, expected = single.components(joined_logits, joined_target)
        torch.testing.assert_close(dice[p * k:(p + 1) * k], expected.expand(k))


def test_patient_pooled_dice_never_crosses_patients():
    b, k = 3, 2
    logits, target = _patient_batch(b, k)
    loss = SegmentationLoss(3, patches_per_patient=k)
    per_patient = loss(logits, [target]).reshape(b, k).mean(1)
    grads = torch.autograd.grad(per_patient[0], logits)[0]
    assert grads[k:].abs().max() == 0  # patient 0's loss ignores the other patients' patches
    assert grads[:k].abs().max() > 0
    other = logits.detach().clone()
    other[k:] += 5.0
    assert torch.allclose(loss(other, [target]).reshape(b, k).mean(1)[0], per_patient[0])


def test_patient_pooled_loss_requires_whole_patients():
    logits, target = _patient_batch(1, 3)
    with pytest.raises(DpunetError, match="whole patients"):
        SegmentationLoss(3, patches_per_patient=2)(logits, [target])


@pytest.mark.parametrize("engine", ["functorch", "opacus_hooks", "fast"])
def test_engines_with_pooled_dice_match_the_per_patient_loop(engine):
    from dpunet.architectures import build_network
    from dpunet.privacy.engines import PatientBatch, ReferenceLoopEngine
    from dpunet.privacy.engines.registry import make_engine

    torch.manual_seed(0)
    arch = {"class_name": "PlainConvUNet", "kwargs": {
        "dim": 2, "n_stages": 2, "features_per_stage": [4, 8], "kernel_sizes": [[3, 3], [3, 3]],
        "strides": [[1, 1], [2, 2]], "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1],
        "norm": "GroupNorm", "norm_kwargs": {"num_groups": 2, "eps": 1e-5, "affine": True}}}
    model = build_network(arch, 1, 3, deep_supervision=False).double()
    b, k = 3, 2
    loss = SegmentationLoss(3, deep_supervision_weights=[1.0], patches_per_patient=k)
    g = torch.Generator().manual_seed(1)
    batch = PatientBatch(torch.randn(b, k, 1, 8, 8, generator=g, dtype=torch.float64),
                         [torch.randint(0, 3, (b, k, 1, 8, 8), generator=g)])
    reference = ReferenceLoopEngine(model, loss, clip_norm=0.05)
    reference.accumulate(batch)
    tested = make_engine(engine, model, loss, 0.05)
    stats = tested.accumulate(batch)
    tested.close()
    assert stats.num_clipped == b
    for a, r in zip(tested.summed_grad, reference.summed_grad):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-9)
