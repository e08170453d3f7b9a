"""dpunet_bench_engine: a full DP-SGD step per gradient engine against a non-private step, side by side.

    dpunet_bench_engine [--device cuda|cpu] [--preset gpu|cpu] [--steps 20] [--warmup 3]
                        [--precision fp32|bf16] [--output documentation/performance.md]
                        [--arch NAME [--width W]]   # any --arch name instead of the reference U-Nets

For every reference U-Net of the preset (nnU-Net topology, GroupNorm(8), LeakyReLU, strided-conv down- and
transposed-conv up-sampling, deep supervision with `SegmentationLoss`) and every method:

- non-private: plain PyTorch, forward + backward of the summed patient losses + optimiser step;
- Opacus hooks / Opacus functorch / dpunet fast: engine.accumulate (per-patient clipped sum) + the noisy
  step of `dpunet.privacy.dp_step` + optimiser step,

it reports the median step time over `--steps` steps after `--warmup` steps and the peak memory, and their
ratios to the non-private step, all in one run on one device. On CUDA the methods run one after the other
(each alone on the GPU, `torch.cuda.max_memory_allocated`); on a CPU the steps are interleaved (method A, B,
C, D, A, B, ...) so that load from other processes hits all methods alike, and peak memory is what the
tensors of the method hold (parameters, optimiser state, engine buffers, data) plus the peak of the
allocations made during one step, recorded by torch.profiler (profile_memory). Oversized oneDNN scratch
buffers that bypass torch's allocator are not seen.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dpunet.utils.errors import DpunetError, cli_entry
from dpunet.utils.files import write_text

# ------------------------------------------------------------------ reference networks


@dataclass(frozen=True)
class BenchNet:
    """One reference U-Net and its physical batch: `patients` patients with K patches each."""

    name: str
    dim: int
    patch_size: tuple[int, ...]
    patients: int
    features_per_stage: tuple[int, ...]
    in_channels: int = 1
    num_classes: int = 3
    arch: str = "planned"  # --arch NAME: any architecture name, built for this net's plan entry and patch
    width: float = 1.0
    output_stride: int | None = None  # the classic families' --output-stride (None: the family's own)
    encoder_depth: int | None = None  # the classic families' --encoder-depth (None: 18)

    @property
    def deep_supervision(self) -> bool:
        """The U-Net presets and DynUNet train with deep supervision; the other names (MONAI, classic) give one
        output."""
        from dpunet.architectures import ARCHITECTURE_PRESETS, monai_has_deep_supervision

        return self.arch in ARCHITECTURE_PRESETS or monai_has_deep_supervision(self.arch)

    def spec(self) -> dict[str, Any]:
        """The benchmarked network's spec: `arch` applied to the reference U-Net entry (DpunetError if refused)."""
        from dpunet.architectures import apply_preset

        from dpunet.architectures.classic_nets import DEFAULT_ENCODER_DEPTH

        return apply_preset(self.architecture(), self.arch, self.width, list(self.patch_size),
                            output_stride=self.output_stride, encoder_depth=self.encoder_depth or DEFAULT_ENCODER_DEPTH)

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    def architecture(self) -> dict[str, Any]:
        """A plan's "architecture" entry: PlainConvUNet, 2 convs per stage, GroupNorm(8), stride 2 after stage 0."""
        from dpunet.architectures import BASELINE_AXES

        n, d = self.n_stages, self.dim
        kwargs = copy.deepcopy(BASELINE_AXES)
        kwargs.update(
            dim=d, n_stages=n, features_per_stage=list(self.features_per_stage),
            kernel_sizes=[[3] * d] * n, strides=[[1] * d] + [[2] * d] * (n - 1),
            n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
        )
        return {"class_name": "PlainConvUNet", "kwargs": kwargs}


def features(base: int, cap: int, n_stages: int) -> tuple[int, ...]:
    """nnU-Net's feature rule: double per stage from `base`, capped at `cap`."""
    return tuple(min(base * 2**s, cap) for s in range(n_stages))


PRESETS: dict[str, list[BenchNet]] = {
    # the nets of the design brief's Opacus measurements (section 6)
    "gpu": [
        BenchNet("2D 256x256 b32", 2, (256, 256), 32, features(32, 512, 7)),
        BenchNet("3D 128^3 b2", 3, (128, 128, 128), 2, features(32, 320, 6)),
        BenchNet("3D 64^3 b8", 3, (64, 64, 64), 8, features(32, 320, 5)),
    ],
    # the same three shapes scaled down (half the width, a quarter of the resolution per axis or less, fewer
    # stages) so that all methods finish in about two minutes on 2 CPU cores
    "cpu": [
        BenchNet("2D 64x64 b8", 2, (64, 64), 8, features(16, 256, 5)),
        BenchNet("3D 32^3 b2", 3, (32, 32, 32), 2, features(16, 128, 4)),
        BenchNet("3D 16^3 b8", 3, (16, 16, 16), 8, features(16, 128, 3)),
    ],
}

# targets of the performance issue, for the fast engine at K=1 (time ratio; memory ratio 2D, 3D)
TIME_TARGET = {"gpu": 1.3, "cpu": 1.5}
MEMORY_TARGET = {"gpu": {2: 1.5, 3: 1.2}, "cpu": {}}


@dataclass(frozen=True)
class Method:
    label: str
    engine: str | None  # None: the plain non-private PyTorch step


METHODS: tuple[Method, ...] = (
    Method("non-private", None),
    Method("Opacus hooks", "opacus_hooks"),
    Method("Opacus functorch", "functorch"),
    Method("dpunet fast", "fast"),
)
# methods also run with K > 1 patches per patient (Opacus is the K=1 comparison)
EXTRA_K_METHODS = ("non-private", "dpunet fast")


# ------------------------------------------------------------------ one method on one net


@dataclass
class Measurement:
    net: str
    params: int
    patients: int
    patches: int
    method: str
    step_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    note: str = ""
    failed: bool = False

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times and not self.failed else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _tensor_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class StepRunner:
    """A model copy, its optimiser and (for DP methods) its engine; `step()` runs one full training step."""

    def __init__(self, method: Method, base_model: nn.Module, loss_fn: nn.Module, batch, device: torch.device,
                 precision: str, clip_norm: float, noise_multiplier: float, lr: float) -> None:
        from dpunet.privacy.engines.registry import make_engine

        self.method, self.batch, self.device, self.precision = method, batch, device, precision
        self.loss_fn = loss_fn
        self.model = copy.deepcopy(base_model).to(device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        # the expected batch size q*N: here the physical batch, one micro-batch per logical step
        self.expected_batch = float(batch.num_patients)
        self.engine = None if method.engine is None else make_engine(method.engine, self.model, loss_fn, clip_norm)
        self.data, self.targets = batch.flat()

    def step(self) -> None:
        from dpunet.privacy.dp_step import assign_gradients, noisy_average_gradient

        b, k = self.batch.num_patients, self.batch.patches_per_patient
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            with _autocast(self.device, self.precision):
                patient_losses = self.loss_fn(self.model(self.data), self.targets).reshape(b, k).mean(1)
            (patient_losses.sum() / self.expected_batch).backward()
        else:
            self.engine.zero()
            with _autocast(self.device, self.precision):
                self.engine.accumulate(self.batch)
            grads = noisy_average_gradient(self.engine.summed_grad, self.noise_multiplier, self.clip_norm,
                                           self.expected_batch)
            assign_gradients(self.params, grads)
        self.optimizer.step()

    def timed_step(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - start

    def resident_bytes(self) -> int:
        """Tensors the method holds between steps: parameters, .grad, optimiser state, engine sums, data."""
        held = list(self.params) + [p.grad for p in self.params]
        for state in self.optimizer.state.values():
            held += [v for v in state.values() if isinstance(v, torch.Tensor)]
        if self.engine is not None:
            held += list(self.engine.summed_grad)
        held += [self.data] + list(self.targets)
        return _tensor_bytes(held)

    def cpu_peak_bytes(self) -> int:
        """Resident tensors plus the peak of torch's CPU allocations during one (profiled) step."""
        from torch.profiler import ProfilerActivity, profile

        from dpunet.utils.quiet import quiet_profiler_logs

        quiet_profiler_logs()  # before the first profiler of the process: Kineto reads its log level then
        self.optimizer.zero_grad(set_to_none=True)
        resident = self.resident_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += int(e.nbytes())
            peak = max(peak, live)
        return resident + peak

    def describe_engine(self) -> str:
        describe = getattr(self.engine, "describe", None)
        if describe is None:
            return ""
        info = describe()
        counts = ", ".join(f"{n} {s}" for s, n in sorted(info.get("strategy_counts", {}).items()))
        methods: dict[str, int] = {}
        for layer in info.get("layers", []):
            if layer.get("method_ms"):  # layers that had a choice: which implementation won
                methods[layer["method"]] = methods.get(layer["method"], 0) + 1
        chosen = ", ".join(f"{m} {n}" for m, n in sorted(methods.items()))
        text = f"{info.get('mode', '')}: {counts}" if counts else str(info.get("mode", ""))
        return f"{text} (timed layers: {chosen})" if chosen else text

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


# ------------------------------------------------------------------ running a preset


def make_batch(net: BenchNet, patches: int, device: torch.device, seed: int):
    """Random images and label maps (B, K, ...) with deep-supervision targets for every decoder level."""
    from dpunet.privacy.engines.base import PatientBatch
    from dpunet.learning.loss import downsample_seg_for_deep_supervision

    from dpunet.architectures import supervision_levels

    gen = torch.Generator().manual_seed(seed)
    shape = (net.patients, patches)
    spec = net.spec()
    patch = spec.get("patch_size", net.patch_size)  # a MONAI network may adapt the patch (architectures.md)
    data = torch.randn(*shape, net.in_channels, *patch, generator=gen)
    seg = torch.randint(0, net.num_classes, (*shape, 1, *patch), generator=gen)
    n_out, strides = supervision_levels(spec, net.deep_supervision, len(patch))
    targets = downsample_seg_for_deep_supervision(seg, strides, n_out)
    return PatientBatch(data.to(device), [t.to(device) for t in targets])


def _failure(m: Measurement, e: BaseException) -> Measurement:
    m.failed, m.note = True, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return m


RUN_ERRORS = (RuntimeError, ValueError, NotImplementedError, TypeError, DpunetError)


def bench_net(net: BenchNet, methods: Sequence[Method], patches: int, device: torch.device, precision: str,
              steps: int, warmup: int, interleave: bool, clip_norm: float, noise_multiplier: float, lr: float,
              seed: int, log: Callable[[str], None]) -> list[Measurement]:
    from dpunet.architectures import build_network
    from dpunet.learning.loss import SegmentationLoss

    torch.manual_seed(seed)
    base = build_network(net.spec(), net.in_channels, net.num_classes, deep_supervision=net.deep_supervision)
    n_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    loss_fn = SegmentationLoss(net.num_classes)
    batch = make_batch(net, patches, device, seed)
    results = {m.label: Measurement(net.name, n_params, net.patients, patches, m.label) for m in methods}
    runners: dict[str, StepRunner] = {}

    def start(m: Method) -> StepRunner | None:
        try:
            r = StepRunner(m, base, loss_fn, batch, device, precision, clip_norm, noise_multiplier, lr)
            for _ in range(warmup):
                r.step()
            return r
        except RUN_ERRORS as e:
            _failure(results[m.label], e)
            log(f"  {m.label}: {results[m.label].note}")
            return None

    def finish(m: Method, r: StepRunner) -> None:
        res = results[m.label]
        try:
            res.note = r.describe_engine()
            if device.type == "cpu":
                res.peak_bytes = r.cpu_peak_bytes()
        except RUN_ERRORS as e:
            _failure(res, e)
        r.close()

    if interleave:
        for m in methods:
            r = start(m)
            if r is not None:
                runners[m.label] = r
        for i in range(steps):
            order = list(runners.items())
            order = order[i % len(order):] + order[:i % len(order)] if order else order
            for label, r in order:
                if results[label].failed:
                    continue
                try:
                    results[label].step_times.append(r.timed_step())
                except RUN_ERRORS as e:
                    _failure(results[label], e)
        for m in methods:
            if m.label in runners:
                finish(m, runners.pop(m.label))
    else:
        for m in methods:
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            r = start(m)
            if r is None:
                continue
            try:
                for _ in range(steps):
                    results[m.label].step_times.append(r.timed_step())
                if device.type == "cuda":
                    results[m.label].peak_bytes = int(torch.cuda.max_memory_allocated(device))
            except RUN_ERRORS as e:
                _failure(results[m.label], e)
            finish(m, r)
            del r
    for m in methods:
        res = results[m.label]
        if res.median_s is not None:
            log(f"  {net.name} K={patches} {m.label}: {res.median_s * 1e3:.1f} ms")
    return [results[m.label] for m in methods]


# ------------------------------------------------------------------ the table


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def results_table(measurements: Sequence[Measurement], preset: str, dims: dict[str, int]) -> tuple[str, list[str]]:
    """Markdown table with ratios to the non-private step of the same net and K; and target verdicts."""
    baseline = {(m.net, m.patches): m for m in measurements if m.method == "non-private"}
    lines = [
        "| net | params | patients x K | method | step time (ms) | time / non-private | peak memory (MiB) "
        "| memory / non-private | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for m in measurements:
        base = baseline.get((m.net, m.patches))
        t_ratio = _ratio(m.median_s, base.median_s if base else None)
        mem_ratio = _ratio(m.peak_bytes, base.peak_bytes if base else None)
        mem = None if m.peak_bytes is None else m.peak_bytes / 2**20
        lines.append(
            f"| {m.net} | {m.params / 1e6:.2f}M | {m.patients} x {m.patches} | {m.method} "
            f"| {_fmt(None if m.median_s is None else m.median_s * 1e3, '.1f')} | {_fmt(t_ratio, '.2f', 'x')} "
            f"| {_fmt(mem, '.0f')} | {_fmt(mem_ratio, '.2f', 'x')} | {m.note} |")
        if m.method == "dpunet fast" and m.patches == 1:
            limit = TIME_TARGET.get(preset)
            if limit is not None:
                ok = t_ratio is not None and t_ratio <= limit
                verdicts.append(f"{m.net}: time {_fmt(t_ratio, '.2f', 'x')} (target <= {limit}x): "
                                f"{'met' if ok else 'MISSED'}")
            mem_limit = MEMORY_TARGET.get(preset, {}).get(dims.get(m.net, 0))
            if mem_limit is not None:
                ok = mem_ratio is not None and mem_ratio <= mem_limit
                verdicts.append(f"{m.net}: memory {_fmt(mem_ratio, '.2f', 'x')} (target <= {mem_limit}x): "
                                f"{'met' if ok else 'MISSED'}")
    return "\n".join(lines), verdicts


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores; torch threads: {torch.get_num_threads()})"


def load_average() -> str:
    """The 1-minute load average and core count (other processes distort CPU timings), or n/a."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except (AttributeError, OSError):
        return "n/a"


def versions() -> str:
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = "not installed"
    return f"torch {torch.__version__}, opacus {opacus_version}, python {platform.python_version()}"


# ------------------------------------------------------------------ documentation/performance.md

DOC_HEADER = """# Performance: per-patient gradients

DP-SGD needs each patient's gradient norm before anything is summed. This page holds the measurements that
back dpunet's claim: **a DP step within 1.3x of a non-private step on a GPU (<= 1.5x on the CPU preset)**,
measured side by side by `dpunet_bench_engine`, whose output this file is (the sections between the
`dpunet-bench` markers are rewritten by it; run it with `--output documentation/performance.md`).

## Why Opacus is slow, and what the floor is

Opacus' hooks build convolution per-sample gradients from unfolded inputs (27x the activation in 3D), compute
the ordinary batched weight gradient and throw it away, and its ghost mode has no convolution ghost norm. The
floor: per-sample weight gradients cost the same FLOPs as the batched one; DP only adds writing B per-sample
gradients and one weighted sum (design brief, section 6).

## The `fast` engine (`dpunet/privacy/engines/fast.py`)

Book-keeping per-sample clipping (Bu et al. 2023) with the patient as the unit:

1. One forward and one backward over the flat batch of B patients x K patches. The trainable weights are
   switched to `requires_grad=False` for the pass, so autograd computes only the data gradient (no batched
   weight gradient to throw away); forward hooks keep each layer's input, tensor hooks on each layer's
   output receive its output gradient.
2. In the hook, per layer, per-*patient* gradients (the K patches of a patient summed), with the same FLOPs
   as the batched weight gradient: the native weight-gradient kernel as a grouped convolution with
   groups = B and the K patches as its batch, or a variant of it (channels-last copy, a loop over patients,
   or a matmul of unfolded patches for small 2D layers; 3D activations are never unfolded);
   GroupNorm/InstanceNorm through torch's fused GroupNorm backward on a (1, B*K*C) view, Linear and biases
   in closed form; weight-standardised convs as convs of their effective weight plus the chain rule through
   the standardisation per patient; any other module with parameters by torch.func vmap of its own vjp
   over patients.
3. A per-layer cost model (`fast_cost.py`, Bu et al.'s mixed ghost clipping) allows the ghost norm where
   2(K T)^2 < p (T output positions, p weights) and its buffers are smaller than the per-patient gradients:
   the deep, low-resolution stages. There only the per-patient norm is computed, from two Gram matrices
   (the input patches' Gram is built from the Gram of the padded input's pixels, summed over the kernel
   offsets: no unfolding), and the layer's input and output gradient are kept for the clipped sum.
4. Where a layer has several implementations (and the ghost norm is allowed), the first micro-batch of each
   shape times them and keeps the fastest, like cudnn.benchmark (on a CPU the ghost norm's Gram FLOPs often
   cost more than the memory passes they save; on a GPU the reverse is expected). `engine.describe()`
   returns the per-layer table (strategy, implementation, timings, T, p, bytes, why) the trainer logs.
5. Norms in fp32 over all parameters, clip factors min(1, C/||g_i||) (0 and counted for a non-finite
   gradient), then the clipped sum: a matrix-vector product over instantiated gradients, and for ghost layers
   a second weight-gradient op with per-patient-scaled output gradients.

Mode `loop` (chosen automatically for one patient per micro-batch) runs one patient at a time through the
whole network: for large 3D patches, where one patient fills the GPU, that is a non-private step plus one
norm. Correctness: `tests/test_fast_engine.py` compares the engine with the per-patient reference loop on
every architecture preset (2D and 3D, K = 1 and 3, clipping on and off, every implementation) and with
Opacus' hooks.

## Targets

| preset | step time, dpunet fast / non-private | peak memory, dpunet fast / non-private |
|---|---|---|
| GPU (2D 256x256 b32; 3D 128^3 b2; 3D 64^3 b8) | <= 1.3x on all three nets | <= 1.5x 2D, <= 1.2x 3D |
| CPU (the same shapes scaled down) | <= 1.5x | reported, no target |

Targets are for K = 1 patch per patient; K > 1 rows are reported for information (the non-private
baseline then processes the same B*K patches). A full step is engine accumulate + noisy step
(`dpunet.privacy.dp_step`) + optimiser step (SGD with momentum); the non-private step is a plain PyTorch
forward, backward and optimiser step. Times are medians over the measured steps after warm-up; the first
warm-up step of the fast engine includes its one-time timing of implementations.

What a DP step adds and cannot avoid: writing B per-patient gradients and summing them (or, where the
ghost norm is used, its Gram matrices and a second weight-gradient op), and drawing Gaussian noise for every
parameter. These costs scale with the parameters, not with the voxels, so they weigh more on the small CPU
nets (and on 2D nets with wide, low-resolution deep stages) than on the GPU nets, whose convolutions run on
far more voxels per parameter. On a shared machine, CPU timings vary with the other load: the methods' steps
are interleaved so that it hits all of them alike, and `--threads 1` gives the steadiest ratios.
"""

SECTION_TITLES = {"gpu": "Results: GPU preset", "cpu": "Results: CPU preset"}
GPU_PENDING = ("GPU figures are still to be measured: no GPU was available when this file was written. "
               "Run `dpunet_bench_engine --device cuda --preset gpu --output documentation/performance.md` "
               "on one (add `--precision bf16` for mixed precision).")


def _marker(preset: str, end: bool) -> str:
    return f"<!-- dpunet-bench:{preset}:{'end' if end else 'start'} -->"


def existing_sections(text: str) -> dict[str, str]:
    """Result sections (between markers) of an earlier performance.md, by preset."""
    found = {}
    for preset in SECTION_TITLES:
        match = re.search(re.escape(_marker(preset, False)) + r"\n(.*?)\n" + re.escape(_marker(preset, True)),
                          text, flags=re.S)
        if match:
            found[preset] = match.group(1)
    return found


def text_after_sections(text: str) -> str:
    """What follows the last result section (hand-written sections such as the loader measurements): kept."""
    last = max(text.rfind(_marker(p, True)) for p in SECTION_TITLES)
    if last < 0:
        return ""
    return text[text.index("-->", last) + 3:].lstrip("\n")


def write_performance_doc(path: Path, preset: str, section: str) -> None:
    """Rewrite `path` atomically: the header, this preset's new section, other presets' earlier sections, and
    whatever followed the last section."""
    text = path.read_text() if path.exists() else ""
    old = existing_sections(text)
    old[preset] = section
    parts = [DOC_HEADER]
    for p, title in SECTION_TITLES.items():
        body = old.get(p, GPU_PENDING if p == "gpu" else "Not measured yet: run `dpunet_bench_engine --device cpu "
                       "--preset cpu --output documentation/performance.md`.")
        parts.append(f"## {title}\n\n{_marker(p, False)}\n{body}\n{_marker(p, True)}\n")
    tail = text_after_sections(text)
    if tail:
        parts.append(tail.rstrip("\n") + "\n")
    write_text("\n".join(parts), path)


# ------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="dpunet_bench_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None,
                    help="reference nets; default: gpu on cuda, cpu on cpu")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps per method first")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: torch.autocast")
    ap.add_argument("--output", type=Path, default=None,
                    help="write the results into this markdown file (e.g. documentation/performance.md)")
    ap.add_argument("--arch", default="planned",
                    help="benchmark this --arch name (a U-Net preset, a MONAI network, deeplabv3plus, fpn, pspnet, "
                         "linknet) built for each reference net's patch instead of the reference U-Net")
    ap.add_argument("--width", type=float, default=1.0, help="width multiplier of --arch (1)")
    ap.add_argument("--output-stride", type=int, default=None, choices=[8, 16],
                    help="output stride of the dilated classic families' encoder (as dpunet_train)")
    ap.add_argument("--encoder-depth", type=int, default=None, choices=[18, 34],
                    help="classic families' encoder depth (as dpunet_train)")
    ap.add_argument("--nets", default=None, help="comma-separated indices (0-based) of the preset's nets to run")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method labels or engine names (default: all; non-private always runs)")
    ap.add_argument("--patches-per-patient", type=int, default=1, help="K of the main rows")
    ap.add_argument("--extra-k", type=int, default=2,
                    help="also run non-private and dpunet fast with this many patches per patient (0: skip)")
    ap.add_argument("--schedule", choices=("auto", "interleaved", "blocked"), default="auto",
                    help="interleave the methods' steps (auto: on CPU, where other processes add noise) or "
                         "run them one after another (auto: on CUDA, needed for per-method peak memory)")
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.patches_per_patient < 1 or args.extra_k < 0:
        raise DpunetError("--steps and --patches-per-patient must be >= 1, --warmup and --extra-k >= 0")
    if args.threads is not None and args.threads < 1:
        raise DpunetError(f"--threads must be >= 1, got {args.threads}")
    if args.output is not None and (args.arch != "planned" or args.width != 1.0 or args.output_stride is not None
                                    or args.encoder_depth is not None):
        raise DpunetError("--output rewrites the reference U-Nets' sections of the performance page; run --arch, "
                          "--width, --output-stride or --encoder-depth without --output")
    return args


def nets_for_arch(nets: Sequence[BenchNet], arch: str, width: float, log: Callable[[str], None],
                  output_stride: int | None = None, encoder_depth: int | None = None) -> list[BenchNet]:
    """The preset's nets as `arch` at `width` (names prefixed with the arch and any encoder option); nets whose
    patch the architecture refuses are reported and left out. A spec built for an adapted patch size is
    benchmarked at that size."""
    from dataclasses import replace

    if arch == "planned" and width == 1.0 and output_stride is None and encoder_depth is None:
        return list(nets)
    options = "".join(f" {o}{v}" for o, v in (("os", output_stride), ("r", encoder_depth)) if v is not None)
    chosen = []
    for net in nets:
        candidate = replace(net, arch=arch, width=float(width), name=f"{arch}{options} {net.name}",
                            output_stride=output_stride, encoder_depth=encoder_depth)
        try:
            spec = candidate.spec()
        except DpunetError as e:
            log(f"{candidate.name}: refused: {' '.join(str(e).split())}")
            continue
        patch = spec.get("patch_size")
        if patch is not None and tuple(int(p) for p in patch) != tuple(net.patch_size):
            candidate = replace(candidate, patch_size=tuple(int(p) for p in patch))
        chosen.append(candidate)
    if not chosen:
        raise DpunetError(f"--arch {arch}: every net of the preset was refused (see above)")
    return chosen


def select_methods(spec: str | None) -> list[Method]:
    if spec is None:
        return list(METHODS)
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    known = {m.label for m in METHODS} | {m.engine for m in METHODS if m.engine}
    unknown = wanted - known
    if unknown:
        raise DpunetError(f"unknown method(s) {sorted(unknown)}; known: {sorted(known)}")
    return [m for m in METHODS if m.engine is None or m.label in wanted or m.engine in wanted]


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise DpunetError("--device cuda: no CUDA device is available to this torch build")
    device = torch.device(device_type)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("gpu" if device_type == "cuda" else "cpu")
    nets = PRESETS[preset]
    if args.nets:
        try:
            nets = [nets[int(i)] for i in args.nets.split(",")]
        except (ValueError, IndexError):
            raise DpunetError(f"--nets {args.nets!r}: give indices 0..{len(PRESETS[preset]) - 1}") from None
    methods = select_methods(args.methods)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress on stderr, table on stdout
    nets = nets_for_arch(nets, args.arch, args.width, log, args.output_stride, args.encoder_depth)
    interleave = args.schedule == "interleaved" or (args.schedule == "auto" and device_type == "cpu")

    started = time.perf_counter()
    load_before = load_average()
    if device_type == "cpu" and torch.get_num_threads() > 1 and os.cpu_count() and hasattr(os, "getloadavg") \
            and os.getloadavg()[0] > os.cpu_count() - 1:
        log(f"warning: the machine is busy (load {load_before}); multi-threaded CPU timings are then "
            "unreliable, --threads 1 gives steadier ratios")
    measurements: list[Measurement] = []
    runs = [(net, args.patches_per_patient, methods) for net in nets]
    if args.extra_k and args.extra_k != args.patches_per_patient:
        runs += [(net, args.extra_k, [m for m in methods if m.label in EXTRA_K_METHODS]) for net in nets]
    for net, k, run_methods in runs:
        log(f"{net.name}, K={k}: {', '.join(m.label for m in run_methods)}")
        measurements += bench_net(net, run_methods, k, device, args.precision, args.steps, args.warmup, interleave,
                                  args.clip_norm, args.noise_multiplier, args.lr, args.seed, log)
    elapsed = time.perf_counter() - started

    table, verdicts = results_table(measurements, preset, {n.name: n.dim for n in nets})
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    memory_how = ("torch.cuda.max_memory_allocated" if device_type == "cuda" else
                  "resident tensors + peak of torch's CPU allocations in one step (torch.profiler)")
    section = "\n".join([
        f"Device: {device_name(device)}; {versions()}; precision {args.precision}; measured {when}.",
        f"{args.steps} measured steps after {args.warmup} warm-up steps per method, "
        f"{'interleaved' if interleave else 'one method after the other'}; clip norm {args.clip_norm}, "
        f"noise multiplier {args.noise_multiplier}; peak memory: {memory_how}; total run {elapsed:.0f} s"
        + (f"; load average {load_before} before, {load_average()} after." if device_type == "cpu" else "."),
        "",
        table,
        "",
        "Targets (dpunet fast, K=1): " + ("; ".join(verdicts) if verdicts else "none for this preset") + ".",
    ])
    print(section)
    if args.output is not None:
        write_performance_doc(args.output, preset, section)
        log(f"wrote {args.output}")
    if args.check and any("MISSED" in v for v in verdicts):
        return 1
    return 0


if __name__ == "__main__":
    main()
