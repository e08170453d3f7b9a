"""The fast per-patient gradient engine against independent oracles: the per-patient reference loop (autograd
on one patient at a time) and Opacus' hooks, on hand-built nets that cover every layer rule and on tiny U-Nets
of every architecture preset; plus its book-keeping (non-finite patients, hooks, strategy table) and the
benchmark CLI that writes documentation/performance.md."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpunet.architectures import ARCHITECTURE_PRESETS, apply_preset, build_network, select_trainable
from dpunet.privacy.engines.base import PatientBatch
from dpunet.privacy.engines.fast import FastGradientEngine
from dpunet.privacy.engines.fast_cost import choose_weight_strategy
from dpunet.privacy.engines.fast_layers import ConvRule
from dpunet.privacy.engines.reference import ReferenceLoopEngine
from dpunet.learning.loss import SegmentationLoss, downsample_seg_for_deep_supervision
from dpunet.utils.errors import DpunetError

# CoverageNet's kernel-2 'same' conv makes torch pad asymmetrically (and say so): that path is covered on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

NCLS = 3
SMALL_C = 1e-3  # clips every patient
RTOL = 1e-5


class LearnedScale(nn.Module):
    """A parameterised module without a layer rule (goes to the engine's generic torch.func fallback)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, *([1] * (x.dim() - 2)))


class CoverageNet(nn.Module):
    """Every layer kind the engine has a rule for, and the awkward cases: grouped, dilated, reflect-padded
    and 'same'-padded convs, max pooling, a grouped transposed conv, GroupNorm, InstanceNorm(affine), Linear
    on the channel axis, a fallback module, a conv called twice, and two outputs (deep supervision)."""

    def __init__(self, dim: int, cin: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        conv_t = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
        inorm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
        pool = nn.MaxPool2d if dim == 2 else nn.MaxPool3d
        self.stem = conv(cin, 8, 3, padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(4, 8)
        self.grouped = conv(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.same = conv(8, 8, 2, padding="same")
        self.pool = pool(2)
        self.down = conv(8, 64, 3, padding=1)
        self.inorm = inorm(64, affine=True)
        self.twice = conv(64, 64, 1)
        self.scale = LearnedScale(64)
        self.up = conv_t(64, 8, 2, stride=2, groups=2)
        self.mix = nn.Linear(16, 8)
        self.head = conv(8, NCLS, 1)
        self.head_low = conv(64, NCLS, 1)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        skip = self.act(self.gn(self.stem(x)))
        skip = self.act(self.same(self.grouped(skip)))
        low = self.act(self.inorm(self.down(self.pool(skip))))
        low = self.scale(self.twice(self.act(self.twice(low))))
        cat = torch.cat([self.up(low), skip], 1)
        mixed = self.mix(cat.movedim(1, -1)).movedim(-1, 1)
        return [self.head(self.act(mixed)), self.head_low(low)]


def per_patch_loss(outputs, targets):
    """Cross-entropy per patch over deep-supervision levels (weights 1, 1/2) -> (N,)."""
    total = 0
    for level, (o, t) in enumerate(zip(outputs, targets)):
        total = total + F.cross_entropy(o, t[:, 0].long(), reduction="none").flatten(1).mean(1) * 0.5**level
    return total


def make_batch(b: int, k: int, cin: int, spatial: tuple[int, ...], levels: list[int], seed: int = 0,
               dtype=torch.float64) -> PatientBatch:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(b, k, cin, *spatial, generator=gen, dtype=dtype)
    seg = torch.randint(0, NCLS, (b, k, 1, *spatial), generator=gen)
    # deep-supervision targets: the label map taken every s-th voxel per axis
    targets = [seg[(Ellipsis,) + tuple(slice(None, None, s) for _ in spatial)] for s in levels]
    return PatientBatch(data, targets)


def assert_same_sums(fast: FastGradientEngine, ref, fast_stats, ref_stats) -> None:
    assert not any(g.requires_grad for g in fast.summed_grad)  # no autograd graph kept on the sums
    scale = max(float(g.abs().max()) for g in ref.summed_grad)
    assert scale > 0
    for (name, _), a, b in zip(fast.model.named_parameters(), fast.summed_grad, ref.summed_grad):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale, msg=f"summed gradient of {name}")
    torch.testing.assert_close(fast_stats.grad_norms, ref_stats.grad_norms.float(), rtol=RTOL, atol=0)
    assert fast_stats.num_clipped == ref_stats.num_clipped
    assert fast_stats.num_nonfinite == ref_stats.num_nonfinite
    assert fast_stats.num_patients == ref_stats.num_patients
    assert fast_stats.loss_sum == pytest.approx(ref_stats.loss_sum, rel=1e-9)


def run_both(model: nn.Module, loss_fn, batch: PatientBatch, clip, **fast_kwargs):
    ref = ReferenceLoopEngine(model, loss_fn, clip)
    ref_stats = ref.accumulate(batch)
    fast = FastGradientEngine(model, loss_fn, clip, **fast_kwargs)
    try:
        fast_stats = fast.accumulate(batch)
    finally:
        fast.close()
    return fast, ref, fast_stats, ref_stats


# ------------------------------------------------------------------ every layer rule


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("b,k,clip,ghost,mode", [
    (1, 1, SMALL_C, "never", "layerwise"),
    (2, 3, None, "always", "layerwise"),
    (3, 1, SMALL_C, "always", "layerwise"),
    (4, 3, SMALL_C, "auto", "layerwise"),
    (3, 3, 1e6, "auto", "auto"),
    (2, 1, 0.05, "memory", "layerwise"),
    (2, 3, SMALL_C, "auto", "loop"),
])
def test_every_layer_rule_equals_reference(dim, b, k, clip, ghost, mode):
    torch.manual_seed(dim)
    model = CoverageNet(dim).double()
    batch = make_batch(b, k, 2, (8,) * dim, [1, 2], seed=b * 10 + k)
    fast, ref, fs, rs = run_both(model, per_patch_loss, batch, clip, ghost=ghost, mode=mode)
    assert_same_sums(fast, ref, fs, rs)
    if clip == SMALL_C:
        assert fs.num_clipped == b


def test_ghost_and_instantiate_strategies_are_both_used_and_logged():
    torch.manual_seed(0)
    model = CoverageNet(2).double()
    batch = make_batch(2, 1, 2, (8, 8), [1, 2])
    fast = FastGradientEngine(model, per_patch_loss, 1.0, ghost="always")
    fast.accumulate(batch)
    table = fast.describe()
    fast.close()
    json.dumps(table)  # the trainer logs it as JSON
    by_module = {row["module"]: row for row in table["layers"]}
    assert by_module["down"]["strategy"] == "ghost"
    # called twice: a ghost norm would miss the cross terms between the two uses
    assert by_module["twice"]["strategy"] == "instantiate"
    assert by_module["grouped"]["strategy"] == "instantiate"  # no ghost norm for grouped convs
    assert by_module["up"]["strategy"] == "instantiate"
    assert by_module["scale"]["strategy"] in ("fallback_vmap", "fallback_loop")
    assert table["mode"] == "layerwise" and table["strategy_counts"]["ghost"] >= 3


def ghost_case(cin: int, cout: int, size: int, b: int, k: int, stride: int = 1):
    """choose_weight_strategy's inputs for a 3x3x3 conv on meta tensors (shapes only, no memory)."""
    conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, device="meta")
    a = torch.empty(b * k, cin, size, size, size, device="meta")
    g = torch.empty(b * k, cout, *[(size + 1) // stride] * 3, device="meta")
    rule = ConvRule()
    return rule.ghost_bytes(conv, a, g, b), conv.weight.numel(), rule.positions(conv, a, g)


def test_cost_model_allows_ghost_only_where_grams_are_smaller():
    # deep 3D stage: T = 4^3 positions, p = 320*320*27: ghost allowed ("auto" then times it, "memory" takes it)
    ghost_bytes, p, t = ghost_case(320, 320, 4, b=2, k=1)
    assert choose_weight_strategy("auto", ghost_bytes, True, p, t, 2, 1)[0] == "timed"
    assert choose_weight_strategy("memory", ghost_bytes, True, p, t, 2, 1)[0] == "ghost"
    assert choose_weight_strategy("never", ghost_bytes, True, p, t, 2, 1)[0] == "instantiate"
    # called twice or shared: never ghost (the cross terms between the uses would be missed)
    assert choose_weight_strategy("always", ghost_bytes, False, p, t, 2, 1)[0] == "instantiate"
    # K patches multiply the Gram size: the same deep layer with K=16 instantiates
    ghost_bytes_k, _, _ = ghost_case(320, 320, 4, b=2, k=16)
    strategy, reason = choose_weight_strategy("memory", ghost_bytes_k, True, p, t, 2, 16)
    assert strategy == "instantiate" and "2(KT)^2" in reason
    # full-resolution stage: T = 128^3: instantiate
    ghost_bytes, p, t = ghost_case(32, 32, 128, b=2, k=1)
    assert choose_weight_strategy("memory", ghost_bytes, True, p, t, 2, 1)[0] == "instantiate"
    # strided conv 16^3 -> 8^3: 2(KT)^2 < p, but the Gram of the 18^3 padded input pixels is far larger
    ghost_bytes, p, t = ghost_case(128, 256, 16, b=2, k=1, stride=2)
    assert 2 * t * t < p and ghost_bytes > 4 * 2 * p
    assert choose_weight_strategy("memory", ghost_bytes, True, p, t, 2, 1)[0] == "instantiate"
    # no ghost norm for the layer type (transposed / grouped convs)
    assert choose_weight_strategy("always", None, True, p, t, 2, 1)[0] == "instantiate"
    with pytest.raises(ValueError):
        choose_weight_strategy("sometimes", ghost_bytes, True, p, t, 2, 1)


def test_auto_times_the_implementations_and_records_them():
    torch.manual_seed(4)
    model = CoverageNet(2).double()
    batch = make_batch(2, 1, 2, (8, 8), [1, 2])
    fast = FastGradientEngine(model, per_patch_loss, 1.0, ghost="auto", method="auto", autotune_repeats=1)
    fast.accumulate(batch)
    first = {row["module"]: row for row in fast.describe()["layers"]}
    fast.accumulate(batch)  # the second micro-batch of the same shape reuses the decisions
    second = {row["module"]: row for row in fast.describe()["layers"]}
    fast.close()
    down = first["down"]  # 4x4 positions, p = 64*8*9: ghost allowed, so ghost was timed too
    assert set(down["method_ms"]) == {"grouped", "grouped_channels_last", "patient_loop", "unfold_bmm", "ghost"}
    assert down["strategy"] == ("ghost" if down["method"] == "ghost" else "instantiate")
    assert min(down["method_ms"], key=down["method_ms"].get) == down["method"]
    assert first["gn"]["method"] == "closed_form" and first["gn"]["method_ms"] is None
    assert all(first[m]["method"] == second[m]["method"] for m in first)
    assert "timed" not in fast.describe()["strategy_counts"]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("method", ["grouped", "grouped_channels_last", "patient_loop", "unfold_bmm"])
def test_each_conv_implementation_equals_reference(method, dim):
    torch.manual_seed(5)
    model = CoverageNet(dim).double()
    batch = make_batch(3, 2, 2, (8,) * dim, [1, 2], seed=5)
    fast, ref, fs, rs = run_both(model, per_patch_loss, batch, 0.05, ghost="never", method=method,
                                 mode="layerwise")
    assert_same_sums(fast, ref, fs, rs)
    used = {row["module"]: row["method"] for row in fast.describe()["layers"] if row["kind"].startswith("Conv")}
    if method == "unfold_bmm":  # only where K*T <= C_out: the 1x1 conv at 2 x 4^2 positions in 2D
        assert used["twice"] == ("unfold_bmm" if dim == 2 else "grouped") and used["stem"] == "grouped"
        assert used["down"] == ("unfold_bmm" if dim == 2 else "grouped")
    else:
        assert set(used.values()) == {method}


# ------------------------------------------------------------------ real U-Nets of every preset

PRESETS = [p for p in ARCHITECTURE_PRESETS if p != "planned"]


def tiny_unet_spec(dim: int) -> dict:
    return {"class_name": "PlainConvUNet", "kwargs": {
        "dim": dim, "n_stages": 3, "features_per_stage": [8, 16, 16], "kernel_sizes": [[3] * dim] * 3,
        "strides": [[1] * dim, [2] * dim, [2] * dim], "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1]}}


def unet_case(preset: str, dim: int, b: int, k: int):
    spec = apply_preset(tiny_unet_spec(dim), preset)
    torch.manual_seed(hash((preset, dim)) % 1000)
    model = build_network(spec, 1, NCLS, deep_supervision=True).double()
    gen = torch.Generator().manual_seed(b + 7 * k)
    spatial = (8,) * dim
    data = torch.randn(b, k, 1, *spatial, generator=gen, dtype=torch.float64)
    seg = torch.randint(0, NCLS, (b, k, 1, *spatial), generator=gen)
    targets = downsample_seg_for_deep_supervision(seg, spec["kwargs"]["strides"])
    return model, SegmentationLoss(NCLS), PatientBatch(data, targets)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_unet_presets_equal_reference(preset, dim):
    # rotate batch shapes and clipping over the presets so that each combination is covered somewhere
    i = PRESETS.index(preset) + dim
    b, k = [(2, 1), (3, 3), (4, 1), (1, 3)][i % 4]
    clip = [SMALL_C, None, 0.05][i % 3]
    model, loss_fn, batch = unet_case(preset, dim, b, k)
    fast, ref, fs, rs = run_both(model, loss_fn, batch, clip, mode="layerwise")
    assert_same_sums(fast, ref, fs, rs)
    # every layer of every preset has a rule (weight-standardised convs: the reparametrised-conv rule)
    assert not any(row["strategy"].startswith("fallback") for row in fast.describe()["layers"])


@pytest.mark.parametrize("preset,dim", [("unet", 3), ("unet_ws", 2), ("resenc_scalenorm", 2), ("unet_in", 3)])
def test_trained_subset_equals_reference(preset, dim):
    """Frozen conv weights (--trainable bias_norm_head): the engine still back-propagates through them and
    clips only the trained parameters' gradient, exactly as the per-patient loop does."""
    model, loss_fn, batch = unet_case(preset, dim, 3, 2)
    trained_count = select_trainable(model, "bias_norm_head")
    trained = [p for p in model.parameters() if p.requires_grad]
    assert 0 < trained_count == sum(p.numel() for p in trained) < sum(p.numel() for p in model.parameters())
    for clip in (SMALL_C, None):
        fast, ref, fs, rs = run_both(model, loss_fn, batch, clip, mode="layerwise")
        assert len(fast.summed_grad) == len(ref.summed_grad) == len(trained)
        scale = max(float(g.abs().max()) for g in ref.summed_grad)
        for a, b in zip(fast.summed_grad, ref.summed_grad):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale)
        torch.testing.assert_close(fs.grad_norms, rs.grad_norms.float(), rtol=RTOL, atol=0)
        assert fs.num_clipped == rs.num_clipped == (3 if clip else 0)
    trained_ids = {id(p) for p in trained}
    assert all(p.requires_grad == (id(p) in trained_ids) for p in model.parameters())  # flags restored


class ConvAppliedTwice(nn.Conv2d):
    """A conv subclass that breaks the reparametrised-conv assumption (one _conv_forward on its input)."""

    def forward(self, x):
        return self._conv_forward(self._conv_forward(x, self.weight, self.bias), self.weight * 0.5, None)


def test_conv_subclass_outside_the_reparametrisation_rule_falls_back():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), ConvAppliedTwice(4, 4, 3, padding=1),
                          nn.Conv2d(4, NCLS, 1))
    loss_fn = lambda out, t: per_patch_loss([out, out[..., ::2, ::2]], t)  # noqa: E731
    fast, ref, fs, rs = run_both(model.double(), loss_fn, make_batch(3, 2, 2, (8, 8), [1, 2]), 0.05,
                                 mode="layerwise")
    assert_same_sums(fast, ref, fs, rs)
    assert {row["module"]: row["strategy"] for row in fast.describe()["layers"]}["1"] == "fallback_vmap"


@pytest.mark.parametrize("preset,dim,clip", [("unet", 3, SMALL_C), ("resenc_scalenorm", 2, None),
                                             ("unet_nearest", 2, 0.05)])
def test_unet_equals_opacus_hooks(preset, dim, clip):
    opacus_hooks = pytest.importorskip("dpunet.privacy.engines.opacus_hooks")
    model, loss_fn, batch = unet_case(preset, dim, 3, 2)
    model = model.float()
    batch = PatientBatch(batch.data.float(), batch.targets)
    opacus = opacus_hooks.OpacusHooksEngine(model, loss_fn, clip)
    try:
        os = opacus.accumulate(batch)
    finally:
        opacus.close()
    fast = FastGradientEngine(model, loss_fn, clip)
    fs = fast.accumulate(batch)
    fast.close()
    scale = max(float(g.abs().max()) for g in opacus.summed_grad)
    for a, b in zip(fast.summed_grad, opacus.summed_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)  # both fp32 end to end
    torch.testing.assert_close(fs.grad_norms, os.grad_norms.float(), rtol=1e-4, atol=0)


# ------------------------------------------------------------------ book-keeping


@pytest.mark.parametrize("ghost", ["never", "always"])
def test_non_finite_patient_is_zeroed_and_counted(ghost):
    torch.manual_seed(1)
    model = CoverageNet(2).double()
    batch = make_batch(3, 2, 2, (8, 8), [1, 2])
    batch.data[1, 0, 0, 2, 3] = float("nan")
    fast, ref, fs, rs = run_both(model, per_patch_loss, batch, 0.1, ghost=ghost, mode="layerwise")
    assert fs.num_nonfinite == 1 and not torch.isfinite(fs.grad_norms[1])
    assert all(torch.isfinite(g).all() for g in fast.summed_grad)
    # the two finite patients alone give the same sum
    clean = PatientBatch(batch.data[[0, 2]], [t[[0, 2]] for t in batch.targets])
    alone = ReferenceLoopEngine(model, per_patch_loss, 0.1)
    alone.accumulate(clean)
    scale = max(float(g.abs().max()) for g in alone.summed_grad)
    for a, b in zip(fast.summed_grad, alone.summed_grad):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale)


def test_hooks_removed_and_requires_grad_restored():
    model = CoverageNet(2).double()
    frozen = model.head_low.bias
    frozen.requires_grad_(False)
    fast = FastGradientEngine(model, per_patch_loss, 1.0)
    assert all(p is not frozen for p in fast.params)
    batch = make_batch(2, 1, 2, (8, 8), [1, 2])
    fast.accumulate(batch)
    assert all(p.requires_grad for p in fast.params) and not frozen.requires_grad
    assert all(p.grad is None for p in model.parameters())  # the engine leaves .grad alone
    # an error inside the pass still restores the parameters
    bad = PatientBatch(batch.data[:, :, :1], batch.targets)
    with pytest.raises(RuntimeError):
        fast.accumulate(bad)
    assert all(p.requires_grad for p in fast.params)
    assert any(m._forward_hooks for m in model.modules())
    fast.close()
    assert not any(m._forward_hooks for m in model.modules())
    # after close the model trains plainly
    data, targets = batch.flat()
    per_patch_loss(model(data), targets).sum().backward()
    assert model.stem.weight.grad is not None and frozen.grad is None


class Net1d(nn.Module):
    """1D layers: strided and transposed Conv1d, GroupNorm, and the unfold path of 1D convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv1d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose1d(16, 8, 2, stride=2)
        self.head = nn.Conv1d(8, NCLS, 1)
        self.head_low = nn.Conv1d(16, NCLS, 1)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x)))
        low = torch.tanh(self.down(h))
        return [self.head(h + self.up(low)), self.head_low(low)]


@pytest.mark.parametrize("method", ["auto", "unfold_bmm", "patient_loop"])
def test_conv1d_layers_equal_reference(method):
    torch.manual_seed(6)
    fast, ref, fs, rs = run_both(Net1d().double(), per_patch_loss, make_batch(3, 2, 2, (16,), [1, 2]), 0.05,
                                 method=method, ghost="auto", mode="layerwise")
    assert_same_sums(fast, ref, fs, rs)


class ModifiesInputInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.act = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, NCLS, 1), nn.LeakyReLU()

    def forward(self, x):
        h = self.act(self.conv1(x))
        out = self.conv2(h)
        h.mul_(2.0)  # after conv2 used h: its weight gradient would be computed from the wrong input
        return [out, out[..., ::2, ::2]]


def test_input_modified_in_place_is_refused():
    fast = FastGradientEngine(ModifiesInputInPlace().double(), per_patch_loss, 1.0)
    with pytest.raises(DpunetError, match="in place"):
        fast.accumulate(make_batch(2, 1, 2, (8, 8), [1, 2]))
    fast.close()


def test_successive_micro_batches_add_up_and_zero_resets():
    torch.manual_seed(2)
    model = CoverageNet(2).double()
    b1, b2 = make_batch(2, 1, 2, (8, 8), [1, 2], seed=1), make_batch(3, 1, 2, (8, 8), [1, 2], seed=2)
    fast = FastGradientEngine(model, per_patch_loss, 0.5)
    ref = ReferenceLoopEngine(model, per_patch_loss, 0.5)
    for batch in (b1, b2):
        fast.accumulate(batch)
        ref.accumulate(batch)
    scale = max(float(g.abs().max()) for g in ref.summed_grad)
    for a, b in zip(fast.summed_grad, ref.summed_grad):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale)
    fast.zero()
    assert all(float(g.abs().max()) == 0 for g in fast.summed_grad)
    fast.close()


def test_empty_batch_and_batchnorm():
    model = CoverageNet(2).double()
    fast = FastGradientEngine(model, per_patch_loss, 1.0)
    empty = make_batch(0, 1, 2, (8, 8), [1, 2])
    stats = fast.accumulate(empty)
    assert stats.num_patients == 0 and all(float(g.abs().max()) == 0 for g in fast.summed_grad)
    fast.close()
    with pytest.raises(DpunetError, match="BatchNorm"):
        FastGradientEngine(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), per_patch_loss, 1.0)
    with pytest.raises(ValueError):
        FastGradientEngine(model, per_patch_loss, 1.0, mode="fastest")


def test_bf16_autocast_matches_reference_roughly():
    """Under autocast the per-patient gradients come from bf16 kernels; norms and sums stay fp32."""
    torch.manual_seed(3)
    model, loss_fn, batch = unet_case("unet", 2, 3, 2)
    model = model.float()
    batch = PatientBatch(batch.data.float(), batch.targets)
    ref = ReferenceLoopEngine(model, loss_fn, 0.05)
    fast = FastGradientEngine(model, loss_fn, 0.05, mode="layerwise", ghost="always")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_stats = ref.accumulate(batch)
        stats = fast.accumulate(batch)
    fast.close()
    assert stats.grad_norms.dtype == torch.float32
    assert all(g.dtype == torch.float32 and not g.requires_grad for g in fast.summed_grad)
    torch.testing.assert_close(stats.grad_norms, ref_stats.grad_norms.float(), rtol=2e-2, atol=0)
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(fast.summed_grad, ref.summed_grad))
    den = sum(float(b.pow(2).sum()) for b in ref.summed_grad)
    assert (num / den) ** 0.5 < 2e-2


def test_registered_as_fast():
    registry = pytest.importorskip("dpunet.privacy.engines.registry")
    model = CoverageNet(2)
    engine = registry.make_engine("fast", model, per_patch_loss, 1.0)
    assert isinstance(engine, FastGradientEngine)
    engine.close()


# ------------------------------------------------------------------ the benchmark


def test_benchmark_cli_writes_the_performance_page(tmp_path, capsys, monkeypatch):
    from dpunet.benchmark import engine_bench

    tiny = engine_bench.BenchNet("3D 8^3 b3", 3, (8, 8, 8), 3, (4, 8))
    monkeypatch.setitem(engine_bench.PRESETS, "cpu", [tiny])
    out = tmp_path / "performance.md"
    with pytest.raises(SystemExit) as done:
        engine_bench.main(["--device", "cpu", "--preset", "cpu", "--steps", "2", "--warmup", "1",
                           "--methods", "fast", "--extra-k", "2", "--output", str(out)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    for must in ("| 3D 8^3 b3 |", "| non-private |", "| dpunet fast |", "3 x 2", "torch ", "opacus ",
                 "GPU figures are still to be measured", "Targets (dpunet fast, K=1)"):
        assert must in text, must
    assert "| dpunet fast |" in printed
    # a later GPU run keeps the CPU section, replaces the placeholder and keeps hand-written text after them
    out.write_text(out.read_text() + "\n## Loader\n\nhand-written figures\n")
    engine_bench.write_performance_doc(out, "gpu", "GPU TABLE")
    sections = engine_bench.existing_sections(out.read_text())
    assert sections["gpu"] == "GPU TABLE" and "| dpunet fast |" in sections["cpu"]
    assert out.read_text().endswith("## Loader\n\nhand-written figures\n")


def test_benchmark_table_ratios_and_verdicts():
    from dpunet.benchmark.engine_bench import Measurement, results_table

    base = Measurement("net", 10**6, 2, 1, "non-private", [0.10, 0.10, 0.30], 100 * 2**20)
    fast = Measurement("net", 10**6, 2, 1, "dpunet fast", [0.12, 0.13, 0.14], 110 * 2**20)
    slow = Measurement("net", 10**6, 2, 1, "Opacus hooks", [0.5], None, note="x")
    table, verdicts = results_table([base, fast, slow], "gpu", {"net": 3})
    assert "| 130.0 | 1.30x | 110 | 1.10x |" in table
    assert "| 500.0 | 5.00x | n/a | n/a |" in table
    assert verdicts == ["net: time 1.30x (target <= 1.3x): met", "net: memory 1.10x (target <= 1.2x): met"]
    _, verdicts = results_table([base, Measurement("net", 1, 2, 1, "dpunet fast", [0.2])], "cpu", {"net": 3})
    assert verdicts == ["net: time 2.00x (target <= 1.5x): MISSED"]
