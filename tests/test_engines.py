"""Per-patient gradient engines against the per-example oracle (ReferenceLoopEngine), and the sensitivity
property DP rests on: adding or removing one patient moves the pre-noise sum by at most C."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpunet.privacy.engines import (
    FunctorchEngine,
    GradientEngine,
    NonPrivateEngine,
    OpacusHooksEngine,
    PatientBatch,
    ReferenceLoopEngine,
    benchmark_engines,
    make_engine,
    register_engine,
)
from dpunet.utils.errors import DpunetError

PRIVATE_ENGINES = ["functorch", "opacus_hooks"]
pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_C, HUGE_C = 1e-3, 1e6
B, K, CIN, NCLS = 3, 2, 2, 3


class TinySegNet(nn.Module):
    """Conv, GroupNorm, strided conv, InstanceNorm(affine), ConvTranspose, skip concat, LeakyReLU (not
    in-place), two heads: full and half resolution, like deep supervision."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        conv_t = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
        inorm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
        self.enc = nn.Sequential(conv(CIN, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.01))
        self.down = nn.Sequential(conv(4, 6, 3, stride=2, padding=1), inorm(6, affine=True), nn.LeakyReLU(0.01))
        self.up = conv_t(6, 4, 2, stride=2)
        self.dec = nn.Sequential(conv(8, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.01))
        self.head = conv(4, NCLS, 1)
        self.head_low = conv(6, NCLS, 1)

    def forward(self, x):
        skip = self.enc(x)
        low = self.down(skip)
        out = self.dec(torch.cat([self.up(low), skip], 1))
        return [self.head(out), self.head_low(low)]


def per_patch_loss(outputs, targets):
    """Cross-entropy per patch, deep-supervision levels weighted 1, 1/2, ... -> (N,)."""
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    total = 0
    for level, (o, t) in enumerate(zip(outputs, targets)):
        ce = F.cross_entropy(o, t[:, 0].long(), reduction="none")
        total = total + ce.flatten(1).mean(1) * 0.5**level
    return total


def make_model(dim: int, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return TinySegNet(dim).to(dtype).train()


def make_batch(dim: int, seed: int, num_patients: int = B, dtype=torch.float64, levels=(1, 2)) -> PatientBatch:
    g = torch.Generator().manual_seed(seed)
    size = 8 if dim == 2 else 4
    spatial = (size,) * dim
    data = torch.randn(num_patients, K, CIN, *spatial, generator=g, dtype=dtype)
    targets = [
        torch.randint(0, NCLS, (num_patients, K, 1, *((size // f,) * dim)), generator=g) for f in levels
    ]
    return PatientBatch(data, targets)


def summed(engine_name: str, model: nn.Module, batch: PatientBatch, clip_norm, **kwargs):
    engine = make_engine(engine_name, model, per_patch_loss, clip_norm, **kwargs)
    try:
        stats = engine.accumulate(batch)
        return [g.clone() for g in engine.summed_grad], stats
    finally:
        engine.close()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def assert_close(actual, expected, rel=1e-5):
    a, e = flat(actual), flat(expected)
    assert torch.isfinite(a).all()
    assert float((a - e).norm()) <= rel * float(e.norm()), float((a - e).norm() / e.norm())
    for x, y in zip(actual, expected):  # every tensor, not just the bulk, must match
        assert torch.allclose(x, y, rtol=rel, atol=rel * float(e.abs().max()))


# ------------------------------------------------------------------------------- equality with the oracle
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("clip_norm", [SMALL_C, HUGE_C], ids=["clipping", "no-clipping"])
def test_private_engines_equal_reference(dim, clip_norm):
    model, batch = make_model(dim), make_batch(dim, seed=1)
    ref, ref_stats = summed("reference_loop", model, batch, clip_norm)
    assert ref_stats.num_clipped == (B if clip_norm == SMALL_C else 0)  # clipping really (in)active
    for name in PRIVATE_ENGINES:
        got, stats = summed(name, model, batch, clip_norm)
        assert_close(got, ref)
        assert torch.allclose(stats.grad_norms, ref_stats.grad_norms, rtol=1e-5)
        assert stats.num_clipped == ref_stats.num_clipped and stats.num_nonfinite == 0
        assert stats.loss_sum == pytest.approx(ref_stats.loss_sum, rel=1e-6)
    if clip_norm == SMALL_C:  # every patient contributes exactly C in norm... up to the 1e-6 guard
        assert float(flat(ref).norm()) <= B * clip_norm


@pytest.mark.parametrize("dim", [2, 3])
def test_patches_are_averaged_before_clipping(dim):
    """Clipping each patch separately (slice-level DP) gives a different sum: the test above can tell."""
    model, batch = make_model(dim), make_batch(dim, seed=2)
    per_patient, _ = summed("functorch", model, batch, SMALL_C)
    as_patches = PatientBatch(batch.data.flatten(0, 1)[:, None], [t.flatten(0, 1)[:, None] for t in batch.targets])
    per_patch, _ = summed("reference_loop", model, as_patches, SMALL_C)
    assert float((flat(per_patient) - flat(per_patch)).norm()) > 0.1 * float(flat(per_patient).norm())


@pytest.mark.parametrize("dim", [2, 3])
def test_nonprivate_equals_plain_sum_of_patient_gradients(dim):
    model, batch = make_model(dim), make_batch(dim, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(B):
        data, targets = batch.patient(i)
        grads = torch.autograd.grad(per_patch_loss(model(data), targets).mean(), params)
        for acc, g in zip(expected, grads):
            acc += g.float()
    got, stats = summed("nonprivate", model, batch, None)
    assert_close(got, expected)
    assert stats.num_patients == B and stats.num_clipped == 0 and stats.num_nonfinite == 0
    ref, _ = summed("reference_loop", model, batch, None)
    assert_close(got, ref)


def test_frozen_parameters_are_left_out():
    model, batch = make_model(2), make_batch(2, seed=12)
    for p in model.enc.parameters():
        p.requires_grad_(False)
    ref, _ = summed("reference_loop", model, batch, 0.05)
    assert len(ref) == len([p for p in model.parameters() if p.requires_grad])
    for name in PRIVATE_ENGINES:
        got, _ = summed(name, model, batch, 0.05)
        assert_close(got, ref)
    engine = make_engine("auto", model, per_patch_loss, None, patients_per_chunk=2)  # option ignored there
    assert isinstance(engine, NonPrivateEngine)


def test_functorch_micro_chunks_give_the_same_sum():
    model, batch = make_model(2), make_batch(2, seed=4, num_patients=5)
    whole, _ = summed("functorch", model, batch, 0.01)
    chunked, stats = summed("functorch", model, batch, 0.01, patients_per_chunk=2)
    assert_close(chunked, whole, rel=1e-6)
    assert stats.grad_norms.shape == (5,)


def test_accumulation_over_micro_batches_adds_up():
    model, batch = make_model(2), make_batch(2, seed=5, num_patients=4)
    first = PatientBatch(batch.data[:1], [t[:1] for t in batch.targets])
    rest = PatientBatch(batch.data[1:], [t[1:] for t in batch.targets])
    for name in PRIVATE_ENGINES:
        together, _ = summed(name, model, batch, 0.05)
        engine = make_engine(name, model, per_patch_loss, 0.05)
        engine.accumulate(first)
        engine.accumulate(rest)
        assert_close(engine.summed_grad, together, rel=1e-6)
        engine.zero()
        assert float(flat(engine.summed_grad).abs().max()) == 0.0
        engine.close()


# --------------------------------------------------------------------------------- sensitivity property
def _drop(batch: PatientBatch, i: int) -> PatientBatch:
    keep = [j for j in range(batch.num_patients) if j != i]
    return PatientBatch(batch.data[keep], [t[keep] for t in batch.targets])


@pytest.mark.parametrize("name", ["reference_loop", *PRIVATE_ENGINES])
def test_one_patient_moves_the_sum_by_at_most_c(name):
    """Add/remove-one adjacency: ||S(D) - S(D - {i})|| <= C. Replacing a patient (remove + add) <= 2C.
    Random nets, data, C and the patient, K=2 patches and two outputs; fp32 as in training."""
    rng = torch.Generator().manual_seed(123)
    tight = 0
    for draw in range(10):
        dim = 2 if draw % 2 == 0 else 3
        model = make_model(dim, seed=draw, dtype=torch.float32)
        batch = make_batch(dim, seed=100 + draw, dtype=torch.float32)
        clip_norm = float(10 ** (-3 + 3 * torch.rand(1, generator=rng)))  # 1e-3 .. 1
        i = int(torch.randint(0, B, (1,), generator=rng))
        full, _ = summed(name, model, batch, clip_norm)
        without, _ = summed(name, model, _drop(batch, i), clip_norm)
        diff = float((flat(full) - flat(without)).norm())
        assert diff <= clip_norm * (1 + 1e-6), (draw, diff, clip_norm)
        tight += diff > 0.99 * clip_norm  # clipping active: the bound is reached
        replacement = make_batch(dim, seed=900 + draw, num_patients=1, dtype=torch.float32)
        replaced = PatientBatch(batch.data.clone(), [t.clone() for t in batch.targets])
        replaced.data[i] = replacement.data[0]
        for t, r in zip(replaced.targets, replacement.targets):
            t[i] = r[0]
        other, _ = summed(name, model, replaced, clip_norm)
        assert float((flat(full) - flat(other)).norm()) <= 2 * clip_norm * (1 + 1e-6)
    assert tight >= 3  # the property is exercised where it is tight, not only where gradients are tiny


# ------------------------------------------------------------------------------- non-finite and empty
@pytest.mark.parametrize("name", ["reference_loop", *PRIVATE_ENGINES, "nonprivate"])
def test_non_finite_patient_is_zeroed_and_counted(name):
    model, batch = make_model(2), make_batch(2, seed=6)
    clip_norm = None if name == "nonprivate" else 0.05
    poisoned = PatientBatch(batch.data.clone(), batch.targets)
    poisoned.data[1, 0, 0, 0, 0] = float("nan")
    got, stats = summed(name, model, poisoned, clip_norm)
    assert stats.num_nonfinite == 1 and stats.num_patients == B
    healthy, _ = summed("reference_loop", model, _drop(batch, 1), clip_norm)
    assert_close(got, healthy)


@pytest.mark.parametrize("name", ["reference_loop", *PRIVATE_ENGINES, "nonprivate"])
def test_empty_micro_batch_adds_nothing(name):
    model = make_model(2)
    empty = make_batch(2, seed=0, num_patients=0)
    got, stats = summed(name, model, empty, None if name == "nonprivate" else 1.0)
    assert stats.num_patients == 0 and stats.loss_sum == 0.0
    assert float(flat(got).abs().max()) == 0.0


# --------------------------------------------------------------------------------- hooks and registry
def test_opacus_engine_leaves_the_model_plain():
    model, batch = make_model(2), make_batch(2, seed=7)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    engine = OpacusHooksEngine(model, per_patch_loss, 1.0)
    engine.accumulate(batch)
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())  # .grad untouched
    engine.close()
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
        assert not hasattr(m, "activations") and not hasattr(m, "autograd_grad_sample_hooks")
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    # a second engine can attach to the same model afterwards
    again, _ = summed("opacus_hooks", model, batch, 1.0)
    ref, _ = summed("reference_loop", model, batch, 1.0)
    assert_close(again, ref)


def test_opacus_failing_half_way_leaves_no_hooks_behind(monkeypatch):
    """Opacus hooks modules one by one; when it fails on a later one (as on MONAI's DynUNet 3d, 'Cannot access
    storage of TensorWrapper'), the hooks it already added must go, else the full backward hooks break the
    functorch engine that "auto" picks next (the failed dynunet 3d study cell)."""
    import opacus.grad_sample.grad_sample_module as gsm_module

    class Scale(nn.Module):  # a parameter without an Opacus rule: Opacus prepares it for functorch
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, dtype=torch.float64))

        def forward(self, x):
            return x * self.weight

    model = make_model(2)
    model.add_module("scale", Scale())
    batch = make_batch(2, seed=9)
    reference, _ = summed("reference_loop", model, batch, 1.0)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure half-way through wrapping")

    monkeypatch.setattr(gsm_module, "prepare_layer", fail)
    with pytest.raises(ValueError, match="half-way"):
        OpacusHooksEngine(model, per_patch_loss, 1.0)
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not hasattr(m, "autograd_grad_sample_hooks")
    got, _ = summed("functorch", model, batch, 1.0)
    assert_close(got, reference)


def test_opacus_engine_refuses_batchnorm():
    model = nn.Sequential(nn.Conv2d(CIN, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, NCLS, 1))
    with pytest.raises(ValueError, match="per-sample"):
        OpacusHooksEngine(model, per_patch_loss, 1.0)


def test_registry_names_and_auto():
    model = make_model(2)
    assert isinstance(make_engine("auto", model, per_patch_loss, None), NonPrivateEngine)
    from dpunet.privacy.engines.fast import FastGradientEngine

    default = make_engine("auto", model, per_patch_loss, 1.0)
    assert isinstance(default, FastGradientEngine)
    default.close()
    assert isinstance(make_engine("reference_loop", model, per_patch_loss, 1.0), ReferenceLoopEngine)
    chosen = make_engine("auto", model, per_patch_loss, 1.0, benchmark_batch=make_batch(2, seed=8))
    assert isinstance(chosen, (FastGradientEngine, FunctorchEngine, OpacusHooksEngine))
    chosen.close()
    with pytest.raises(DpunetError, match="unknown gradient engine"):
        make_engine("no_such_engine", model, per_patch_loss, 1.0)
    with pytest.raises(DpunetError):
        make_engine("nonprivate", model, per_patch_loss, 1.0)


def test_benchmark_reports_seconds_and_leaves_grads_alone():
    model, batch = make_model(2), make_batch(2, seed=9)
    timings = benchmark_engines(model, per_patch_loss, 1.0, batch, names=PRIVATE_ENGINES, repeats=1)
    assert set(timings) == set(PRIVATE_ENGINES) and all(0 < t < 60 for t in timings.values())
    assert all(p.grad is None for p in model.parameters())


def test_register_engine_adds_a_name():
    class ScaledReference(ReferenceLoopEngine):
        name = "scaled_reference_for_test"

    register_engine("scaled_reference_for_test", ScaledReference)
    engine = make_engine("scaled_reference_for_test", make_model(2), per_patch_loss, 1.0)
    assert isinstance(engine, ScaledReference) and isinstance(engine, GradientEngine)
    with pytest.raises(ValueError):
        register_engine("scaled_reference_for_test", ReferenceLoopEngine)  # no silent replacement
    with pytest.raises(TypeError):
        register_engine("not_an_engine", dict)


# ------------------------------------------------------------------------------------ real U-Nets
def _build_network():
    try:
        module = importlib.import_module("dpunet.architectures")
    except ImportError:
        module = None
    build = getattr(module, "build_network", None)
    if build is None:
        pytest.skip("dpunet.architectures.build_network does not exist yet")
    return build


def assert_private_engines_match_reference(model, batch) -> None:
    """With and without clipping, every private engine's clipped sum equals the per-patient loop's."""
    for clip_norm in (SMALL_C, HUGE_C):
        ref, ref_stats = summed("reference_loop", model, batch, clip_norm)
        for name in PRIVATE_ENGINES:
            got, stats = summed(name, model, batch, clip_norm)
            assert_close(got, ref)
            assert stats.num_clipped == ref_stats.num_clipped


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("norm", ["GroupNorm", "InstanceNorm"])
def test_engines_equal_reference_on_unet(dim, norm):
    build_network = _build_network()
    arch = {
        "class_name": "PlainConvUNet",
        "kwargs": {
            "dim": dim,
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "kernel_sizes": [[3] * dim, [3] * dim],
            "strides": [[1] * dim, [2] * dim],
            "n_conv_per_stage": [2, 2],
            "n_conv_per_stage_decoder": [2],
            "conv_bias": True,
            "norm": norm,
            "norm_kwargs": {"num_groups": 2, "eps": 1e-5, "affine": True} if norm == "GroupNorm"
            else {"eps": 1e-5, "affine": True},
            "nonlin": "LeakyReLU",
            "nonlin_kwargs": {"negative_slope": 0.01},
            "downsampling": "strided_conv",
            "upsampling": "transposed_conv",
            "weight_standardization": False,
        },
    }
    torch.manual_seed(0)
    model = build_network(arch, CIN, NCLS, True).double().train()
    batch = make_batch(dim, seed=10, levels=(1,))  # 2 stages: one deep-supervision output
    assert_private_engines_match_reference(model, batch)


def test_engines_equal_reference_on_unet_variants():
    """Residual encoder with ScaleNorm, weight-standardised convs (Opacus falls back to functorch for them),
    max pooling, nearest + conv up-sampling, Mish; three stages, so two deep-supervision outputs."""
    build_network = _build_network()
    arch = {
        "class_name": "ResidualEncoderUNet",
        "kwargs": {
            "dim": 2,
            "n_stages": 3,
            "features_per_stage": [4, 8, 8],
            "kernel_sizes": [[3, 3]] * 3,
            "strides": [[1, 1], [2, 2], [2, 2]],
            "n_conv_per_stage": [1, 1, 1],
            "n_conv_per_stage_decoder": [1, 1],
            "conv_bias": True,
            "norm": "GroupNorm",
            "norm_kwargs": {"num_groups": 2, "eps": 1e-5, "affine": True},
            "nonlin": "Mish",
            "nonlin_kwargs": {},
            "downsampling": "maxpool",
            "upsampling": "nearest_conv",
            "weight_standardization": True,
        },
    }
    torch.manual_seed(0)
    model = build_network(arch, CIN, NCLS, True).double().train()
    batch = make_batch(2, seed=11, levels=(1, 2))
    assert_private_engines_match_reference(model, batch)
