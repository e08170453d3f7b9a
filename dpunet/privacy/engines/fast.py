"""The fast per-patient gradient engine ("fast"): book-keeping per-sample clipping (Bu et al. 2023).

One forward and one backward over the flat B*K batch of patches. During the pass the trainable parameters
of the layers the engine handles are switched to requires_grad=False, so autograd propagates only the data
gradient and never computes the batched weight gradient a DP step would throw away. Forward hooks keep each
layer's input; tensor hooks on each layer's output receive its output gradient during the backward, and there
the layer's per-PATIENT gradients (the K patches of a patient summed) are computed straight away, by layer
rules in `fast_layers`:

- conv / transposed conv weight: the native weight-gradient kernel as a grouped convolution with groups = B,
  the K patches as its batch (same FLOPs as the batched weight gradient, no unfolded 3D inputs), or one of
  its variants (`ConvRule.METHODS`: channels-last copy, a loop over patients, or for small 2D layers a
  matmul of unfolded patches);
- or, for layers with few output positions (deep U-Net stages, where `fast_cost` allows it), only the
  per-patient norm by the ghost-norm trick, from Gram matrices computed without unfolding; the layer's input
  and output gradient are kept and a second weight-gradient op with per-patient-scaled output gradients
  gives its clipped sum;
- GroupNorm / InstanceNorm (affine), Linear, biases: closed-form per-patient sums;
- conv subclasses that reparametrise their weight (weight-standardised convs): the conv rule for the
  effective weight, then the chain rule through the weight-sized reparametrisation per patient;
- any other module owning trainable parameters: torch.func vmap over patients of the module's own vjp, or
  a per-patient loop when vmap cannot run it.

Where a layer has several implementations (and the ghost norm is allowed), the first micro-batch of each
shape times them and keeps the fastest, like cudnn.benchmark; `describe()` records the choice and timings.

Then per-patient norms (fp32), clip factors min(1, C/||g_i||) (0 for a non-finite gradient), and the clipped
sum per parameter (a matrix-vector product over instantiated gradients). Mode "loop" runs one patient at a
time through the whole network instead, for when one patient fills the device (mode "auto" picks it for B=1,
where it is exactly a non-private step plus one norm).

Usage:
    engine = FastGradientEngine(model, SegmentationLoss(...), clip_norm=1.0)
    stats = engine.accumulate(patient_batch)   # adds sum_i clip(g_i) to engine.summed_grad
    engine.describe()                          # JSON-able per-layer strategy table for the training log
    engine.close()                             # removes the hooks
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from dpunet.privacy.engines.base import (
    AccumulationStats,
    GradientEngine,
    PatientBatch,
    PerSampleLoss,
    finalize_per_patient,
)
from dpunet.privacy.engines.fast_cost import GHOST_POLICIES, LayerPlan, choose_weight_strategy
from dpunet.privacy.engines.fast_layers import ConvRule, LayerRule, ReparamConvRule, rule_for
from dpunet.utils.errors import DpunetError

MODES = ("auto", "layerwise", "loop")


@dataclass
class _Layer:
    """A module owning trainable parameters: its per-patient gradients are the engine's business."""

    name: str
    module: nn.Module
    param_names: list[str]  # trainable parameters registered directly on the module
    param_indices: list[int]  # their positions in engine.params / engine.summed_grad
    weight_shared: bool  # a parameter also belongs to another module (ghost norms need a single use)
    fallback: str = "fallback_vmap"  # how the generic path runs; switches to "fallback_loop" if vmap fails
    rule_checked: bool | None = None  # for rules that must verify a module first (ReparamConvRule)


@dataclass
class _Call:
    """One forward call of a layer in the current micro-batch."""

    layer: _Layer
    args: tuple
    kwargs: dict
    autocast: tuple[str, bool, torch.dtype]
    input_version: int  # autograd version counter of the input when the layer used it
    grad: Tensor | None = None
    ghost_plan: LayerPlan | None = None

    @property
    def activation(self) -> Tensor:
        a = self.args[0]
        if isinstance(a, Tensor) and a._version != self.input_version:
            raise DpunetError(f"fast engine: the input of {self.layer.name} ({type(self.layer.module).__name__}) "
                              "was modified in place after the layer used it; in-place operations (e.g. "
                              "inplace=True activations) break per-sample gradients")
        return a

    def release(self) -> None:
        self.args, self.kwargs, self.grad = (), {}, None


class FastGradientEngine(GradientEngine):
    """Per-patient clipped gradient sums from one forward and one backward (see the module docstring).

    mode: "auto" (loop for one patient, else layerwise), "layerwise" or "loop".
    ghost: "auto" (ghost norm where the cost model allows it and it is faster), "memory" (wherever it is
        allowed: least memory), "never" (always instantiate) or "always" (wherever the layer type has one).
    method: how instantiated conv gradients are computed: "auto" times the implementations of the layer rule
        (`ConvRule.METHODS`), and the ghost norm where allowed, the first time a layer meets a new input
        shape and keeps the fastest (like cudnn.benchmark); or one implementation by name.
    autotune_repeats: timed runs per implementation when timing (after one untimed warm-up run).
    """

    name = "fast"

    def __init__(self, model: nn.Module, loss_fn: PerSampleLoss, clip_norm: float | None, mode: str = "auto",
                 ghost: str = "auto", method: str = "auto", autotune_repeats: int = 2) -> None:
        super().__init__(model, loss_fn, clip_norm)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if ghost not in GHOST_POLICIES:
            raise ValueError(f"ghost must be one of {GHOST_POLICIES}, got {ghost!r}")
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise DpunetError(f"module {name or type(model).__name__} is {type(m).__name__}: it mixes the "
                                  "patients of a batch, so per-patient gradients do not exist; use GroupNorm")
        if method != "auto" and method not in ConvRule.METHODS:
            raise ValueError(f"method must be 'auto' or one of {ConvRule.METHODS}, got {method!r}")
        if autotune_repeats < 1:
            raise ValueError(f"autotune_repeats must be >= 1, got {autotune_repeats}")
        self.mode = mode
        self.ghost_policy = ghost
        self.method = method
        self.autotune_repeats = autotune_repeats
        self._layers = self._find_layers(model)
        self._hooks = [layer.module.register_forward_hook(self._forward_hook(layer), with_kwargs=True)
                       for layer in self._layers]
        self._capturing = False
        self._calls: list[_Call] = []
        self._roots: list[Tensor] = []
        self._num_patients = 0
        self._device = torch.device("cpu")
        self._patches = 0
        self._per_patient: dict[int, Tensor] = {}  # param index -> (B, *shape) fp32
        self._norm_parts: list[Tensor] = []  # (B,) per-patient norms of finished per-parameter gradients
        self._sq_norm_parts: list[Tensor] = []  # (B,) squared per-patient norms from ghost layers
        self._deferred_norms: set[int] = set()  # parameters with several contributions: norm at the end
        self._use_counts: dict[int, int] = {}  # calls per layer in this forward
        self._plans: dict[tuple, LayerPlan] = {}
        self._used_plans: list[LayerPlan] = []
        self._last_plans: list[LayerPlan] = []
        self._last_mode = mode

    @property
    def plans_per_shape(self) -> bool:
        """Whether the first micro-batch of each new size costs extra (its layer plans are made, and timed):
        the run-time estimate counts it."""
        return self.mode != "loop"

    # ---------------------------------------------------------------- set-up

    def _find_layers(self, model: nn.Module) -> list[_Layer]:
        index = {id(p): i for i, p in enumerate(self.params)}
        owners: dict[int, int] = {}
        found = []
        for name, m in model.named_modules():
            own = [(pn, p) for pn, p in m.named_parameters(recurse=False) if p.requires_grad]
            for _, p in own:
                owners[id(p)] = owners.get(id(p), 0) + 1
            if own:
                found.append((name or type(model).__name__, m, own))
        return [_Layer(name, m, [pn for pn, _ in own], [index[id(p)] for _, p in own],
                       any(owners[id(p)] > 1 for _, p in own)) for name, m, own in found]

    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._capturing:
                return
            if not isinstance(output, Tensor):
                raise DpunetError(f"fast engine: module {layer.name} ({type(module).__name__}) returns "
                                  f"{type(output).__name__}; layers owning parameters must return one tensor")
            device_type = output.device.type
            autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
            first = args[0] if args else None
            rule = rule_for(module)
            if (autocast[1] and rule is not None and rule.autocast_input and isinstance(first, Tensor)
                    and first.is_floating_point() and first.dtype != autocast[2]):
                # keep the low-precision copy the layer computed with (what autograd would save), not the
                # wider input, which may then be freed
                first = first.to(autocast[2])
                args = (first, *args[1:])
            call = _Call(layer, args, kwargs, autocast, first._version if isinstance(first, Tensor) else 0)
            if not output.requires_grad:
                # nothing upstream needs a gradient (weights are switched off): make this output a root of
                # the backward so that the data gradient flows down to it
                output.requires_grad_(True)
                self._roots.append(output)
            output.register_hook(lambda grad, call=call: self._on_output_grad(call, grad))
            self._calls.append(call)

        return hook

    @contextlib.contextmanager
    def _weights_frozen(self) -> Iterator[None]:
        """Trainable parameters off autograd for the pass, so no batched weight gradient is computed."""
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.params:
                p.requires_grad_(True)

    # ---------------------------------------------------------------- backward-time work per layer

    def _plan(self, call: _Call, rule: LayerRule | None, single_use: bool) -> LayerPlan:
        layer, g = call.layer, call.grad
        a = call.activation if call.args else g
        key = (layer.name, tuple(a.shape), tuple(g.shape), self._num_patients, single_use, rule is None)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        shapes = {n: getattr(layer.module, n).shape for n in layer.param_names}
        params = sum(int(torch.Size(s).numel()) for s in shapes.values())
        weight_params = int(torch.Size(shapes["weight"]).numel()) if "weight" in shapes else 0
        b, k = self._num_patients, self._patches
        ghost_bytes = None
        if rule is None:
            strategy, reason = layer.fallback, "no layer rule for this module type"
            positions = 0
        else:
            positions = rule.positions(layer.module, a, g)
            if "weight" in shapes:
                ghost_bytes = rule.ghost_bytes(layer.module, a, g, b)
                strategy, reason = choose_weight_strategy(self.ghost_policy, ghost_bytes, single_use, weight_params,
                                                          positions, b, k)
            else:
                strategy, reason = "instantiate", "no weight"
        plan = LayerPlan(layer.name, type(layer.module).__name__, strategy, params, weight_params, positions,
                         b, k, 4 * b * params, ghost_bytes, reason)
        self._plans[key] = plan
        return plan

    def _add_per_patient(self, layer: _Layer, grads: dict[str, Tensor], single_use: bool) -> None:
        for name, idx in zip(layer.param_names, layer.param_indices):
            g = grads.get(name)
            if g is None:
                continue
            if single_use:
                # the only contribution to this parameter: take its norm now, while it is in cache
                self._norm_parts.append(torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1))
            else:
                self._deferred_norms.add(idx)
            self._per_patient[idx] = self._per_patient[idx] + g if idx in self._per_patient else g

    def _rule(self, call: _Call) -> LayerRule | None:
        layer = call.layer
        rule = rule_for(layer.module)
        if isinstance(rule, ReparamConvRule):
            if layer.rule_checked is None:
                layer.rule_checked = rule.verify(layer.module, call.activation)
            if not layer.rule_checked:
                return None
        return rule

    def _on_output_grad(self, call: _Call, grad: Tensor) -> None:
        call.grad = grad
        layer = call.layer
        rule = self._rule(call)
        single_use = not layer.weight_shared and self._use_counts[id(layer)] == 1
        plan = self._plan(call, rule, single_use)
        self._used_plans.append(plan)
        if rule is None:
            self._add_per_patient(layer, self._fallback_per_patient(call), single_use)
            call.release()
            return None
        module, a, b, names = layer.module, call.activation, self._num_patients, layer.param_names
        result = self._decide(call, rule, plan) if plan.method is None else None
        if plan.strategy == "ghost":
            self._sq_norm_parts.append(rule.ghost_sq_norms(module, a, grad, b) if result is None else result)
            others = [n for n in names if n != "weight"]
            if others:
                self._add_per_patient(layer, rule.per_patient(module, a, grad, b, others), True)
            call.ghost_plan = plan  # keep input and output gradient for the clipped sum
        else:
            grads = rule.per_patient(module, a, grad, b, names, method=plan.method) if result is None else result
            self._add_per_patient(layer, grads, single_use)
            call.release()
        return None

    def _candidates(self, call: _Call, rule: LayerRule, plan: LayerPlan) -> dict[str, tuple[str, Any, Any]]:
        """name -> (strategy, run, cost of the rest of that path) for this layer's possible implementations."""
        module, a, g, b = call.layer.module, call.activation, call.grad, self._num_patients
        names = call.layer.param_names
        candidates: dict[str, tuple[str, Any, Any]] = {}
        if plan.strategy in ("instantiate", "timed"):
            methods = rule.methods(module, a, g, b)
            if self.method != "auto":
                methods = (self.method,) if self.method in methods else methods[:1]
            elif "weight" not in names:
                methods = methods[:1]

            def rest_of_instantiate(grads: dict[str, Tensor]) -> None:
                # what an instantiated gradient costs later: its norm and its share of the clipped sum
                for x in grads.values():
                    flat = x.reshape(b, -1)
                    torch.linalg.vector_norm(flat, dim=1)
                    flat.t() @ torch.ones(b, device=flat.device)

            for m in methods:
                candidates[m] = ("instantiate", lambda m=m: rule.per_patient(module, a, g, b, names, method=m),
                                 rest_of_instantiate)
        if plan.strategy in ("ghost", "timed"):
            candidates["ghost"] = ("ghost", lambda: rule.ghost_sq_norms(module, a, g, b),
                                   lambda _: rule.summed_weight_grad(module, a, g))  # the second pass
        return candidates

    def _decide(self, call: _Call, rule: LayerRule, plan: LayerPlan) -> Any:
        """First micro-batch of this layer shape: fix the strategy and implementation, timing them where
        there is a choice (like cudnn.benchmark). Returns the chosen implementation's result."""
        candidates = self._candidates(call, rule, plan)
        if len(candidates) == 1:
            name, (strategy, run, _) = next(iter(candidates.items()))
            plan.strategy, plan.method = strategy, name
            return run()
        device = self._device
        best = error = None
        timings: dict[str, float] = {}
        for name, (strategy, run, rest) in candidates.items():
            try:
                rest(run())  # untimed: one-time set-up (kernel selection, primitive caches)
                for _ in range(self.autotune_repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    result = run()
                    rest(result)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    timings[name] = min(timings.get(name, math.inf), (time.perf_counter() - start) * 1e3)
            except RuntimeError as e:  # e.g. out of memory for one implementation: the others may do
                timings[name], error = math.inf, e
                continue
            if plan.method is None or timings[name] < timings[plan.method]:
                best, plan.method, plan.strategy = result, name, strategy
            del result
        if plan.method is None:
            raise error
        plan.method_ms = {name: (round(ms, 3) if math.isfinite(ms) else None) for name, ms in timings.items()}
        return best

    # ---------------------------------------------------------------- generic fallback

    @contextlib.contextmanager
    def _replaying(self, call: _Call) -> Iterator[None]:
        capturing, self._capturing = self._capturing, False
        device_type, enabled, dtype = call.autocast
        try:
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                yield
        finally:
            self._capturing = capturing

    def _fallback_per_patient(self, call: _Call) -> dict[str, Tensor]:
        """Per-patient gradients of a module without a layer rule, by its own vjp per patient."""
        layer, b = call.layer, self._num_patients
        n = b * self._patches
        module = layer.module
        params = {name: getattr(module, name).detach() for name in layer.param_names}
        # batched: a leading dim of B*K patches, or of B*K*m when the network folds m pieces of each patch into
        # the batch sample-major (SwinUNETR's window partition: (patches * windows, tokens, C)), as LinearRule
        # also assumes; the reference-loop tests check it for the networks that do this
        batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] > 0 and x.shape[0] % n == 0
                   for x in call.args]
        args = [x.detach().reshape(b, -1, *x.shape[1:]) if is_b else x for x, is_b in zip(call.args, batched)]
        grad = call.grad.reshape(b, -1, *call.grad.shape[1:])
        kwargs = call.kwargs

        def patient_vjp(p: dict[str, Tensor], g: Tensor, *xs: Any) -> dict[str, Tensor]:
            _, pullback = vjp(lambda q: functional_call(module, q, tuple(xs), kwargs), p)
            return pullback(g)[0]

        with self._replaying(call):
            if layer.fallback == "fallback_vmap":
                try:
                    in_dims = (None, 0, *[0 if is_b else None for is_b in batched])
                    grads = vmap(patient_vjp, in_dims=in_dims)(params, grad, *args)
                    return {k: v.float() for k, v in grads.items()}
                except (RuntimeError, NotImplementedError, ValueError):
                    layer.fallback = "fallback_loop"  # e.g. data-dependent control flow: loop from now on
            per: dict[str, list[Tensor]] = {name: [] for name in params}
            for i in range(b):
                with torch.enable_grad():
                    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                    xs = [x[i] if is_b else x for x, is_b in zip(args, batched)]
                    out = functional_call(module, leaves, tuple(xs), kwargs)
                    grads = torch.autograd.grad(out, list(leaves.values()), grad[i].to(out.dtype),
                                                allow_unused=True)
                for (name, leaf), g in zip(leaves.items(), grads):
                    per[name].append(torch.zeros_like(leaf, dtype=torch.float32) if g is None else g.float())
            return {name: torch.stack(gs) for name, gs in per.items()}

    # ---------------------------------------------------------------- accumulate

    def accumulate(self, batch: PatientBatch) -> AccumulationStats:
        b = batch.num_patients
        if b == 0:
            return AccumulationStats(0, 0.0, torch.zeros(0), 0, 0)
        mode = self.mode if self.mode != "auto" else ("loop" if b == 1 else "layerwise")
        self._last_mode = mode
        if mode == "loop":
            return self._accumulate_loop(batch)
        return self._accumulate_layerwise(batch)

    def _accumulate_layerwise(self, batch: PatientBatch) -> AccumulationStats:
        b, k = batch.num_patients, batch.patches_per_patient
        data, targets = batch.flat()
        self._num_patients, self._patches, self._device = b, k, data.device
        try:
            with self._weights_frozen(), torch.enable_grad():  # also when called under no_grad
                self._capturing = True
                try:
                    outputs = self.model(data.detach())
                finally:
                    self._capturing = False
                for call in self._calls:
                    self._use_counts[id(call.layer)] = self._use_counts.get(id(call.layer), 0) + 1
                patient_losses = self.loss_fn(outputs, targets).reshape(b, k).mean(dim=1)
                if self._roots:
                    torch.autograd.grad(patient_losses.sum(), self._roots, allow_unused=True)
                del outputs
            with torch.no_grad():  # the kept activations are part of the graph: build nothing on them
                norms = self._patient_norms(b, data.device)
                factors, finite, num_clipped, num_nonfinite = finalize_per_patient(norms, self.clip_norm)
                self._add_clipped_sum(factors, finite, num_nonfinite > 0)
            self._last_plans = self._collect_plans()
            loss_sum = float(patient_losses.detach().sum())
        finally:
            for call in self._calls:
                call.release()
            self._calls, self._roots, self._used_plans = [], [], []
            self._per_patient, self._use_counts = {}, {}
            self._norm_parts, self._sq_norm_parts = [], []
            self._deferred_norms = set()
        return AccumulationStats(b, loss_sum, norms.detach().float().cpu(), num_clipped, num_nonfinite)

    def _patient_norms(self, num_patients: int, device: torch.device) -> Tensor:
        norms = self._norm_parts + [torch.linalg.vector_norm(self._per_patient[idx].reshape(num_patients, -1), dim=1)
                                    for idx in self._deferred_norms]
        sq = torch.zeros(num_patients, dtype=torch.float32, device=device)
        if norms:
            sq = sq + torch.stack(norms).square().sum(dim=0)
        if self._sq_norm_parts:
            sq = sq + torch.stack(self._sq_norm_parts).sum(dim=0)
        return sq.sqrt()

    def _add_clipped_sum(self, factors: Tensor, finite: Tensor, any_nonfinite: bool) -> None:
        b = factors.shape[0]
        for idx, g in self._per_patient.items():
            flat = g.reshape(b, -1)
            if any_nonfinite:
                flat = flat.masked_fill(~finite.unsqueeze(1), 0.0)  # 0 * NaN is NaN: zero the rows outright
            self.summed_grad[idx].view(-1).addmv_(flat.t(), factors)
        for call in self._calls:
            if call.ghost_plan is None or call.grad is None:
                continue
            layer, g, a = call.layer, call.grad, call.activation
            per_patch = factors.repeat_interleave(self._patches)
            g_scaled = g * per_patch.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
            if any_nonfinite:
                ok = finite.repeat_interleave(self._patches)
                g_scaled = torch.where(ok.view(-1, *([1] * (g.dim() - 1))), g_scaled, torch.zeros_like(g_scaled))
                a = torch.where(ok.view(-1, *([1] * (a.dim() - 1))), a, torch.zeros_like(a))
            rule = rule_for(layer.module)
            weight_idx = layer.param_indices[layer.param_names.index("weight")]
            self.summed_grad[weight_idx].add_(rule.summed_weight_grad(layer.module, a, g_scaled))

    def _collect_plans(self) -> list[LayerPlan]:
        """This micro-batch's plans in forward (module registration) order."""
        order = {layer.name: i for i, layer in enumerate(self._layers)}
        return sorted(self._used_plans, key=lambda p: order.get(p.module, 0))

    def _accumulate_loop(self, batch: PatientBatch) -> AccumulationStats:
        """One patient at a time through the whole network: plain autograd, then norm, clip, add."""
        norms, losses = [], []
        for i in range(batch.num_patients):
            data, targets = batch.patient(i)
            with torch.enable_grad():
                loss = self.loss_fn(self.model(data.detach()), targets).mean()
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                         for g in grads if g is not None]))
            factor, finite, _, _ = finalize_per_patient(norm.reshape(1), self.clip_norm)
            if bool(finite[0]):
                for acc, g in zip(self.summed_grad, grads):
                    if g is not None:
                        acc.add_(g.float() * factor[0])
            norms.append(norm.detach().float().reshape(()))
            losses.append(loss.detach())
        norms_t = torch.stack(norms).cpu()
        _, _, num_clipped, num_nonfinite = finalize_per_patient(norms_t, self.clip_norm)
        return AccumulationStats(len(losses), float(torch.stack(losses).sum()), norms_t, num_clipped, num_nonfinite)

    # ---------------------------------------------------------------- reporting, clean-up

    def describe(self) -> dict[str, Any]:
        """JSON-able: the mode used last, the ghost policy and the per-layer strategy table."""
        plans = [p.as_dict() for p in self._last_plans] if self._last_mode == "layerwise" else []
        counts: dict[str, int] = {}
        for p in plans:
            counts[p["strategy"]] = counts.get(p["strategy"], 0) + 1
        return {
            "engine": self.name,
            "mode": self._last_mode,
            "ghost_policy": self.ghost_policy,
            "clip_norm": self.clip_norm,
            "strategy_counts": counts,
            "per_patient_gradient_bytes": sum(p["instantiate_bytes"] for p in plans if p["strategy"] != "ghost"),
            "layers": plans,
        }

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _register() -> None:
    # the registry imports the other engines, not this one: importing it here is not circular
    from dpunet.privacy.engines.registry import register_engine

    register_engine(FastGradientEngine.name, FastGradientEngine)


_register()
