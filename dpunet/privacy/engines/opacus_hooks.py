"""Per-patient gradients from Opacus' per-sample gradient hooks (GradSampleModule).

One forward/backward over the flattened B*K patches with a summed loss gives each *patch's* gradient in
`p.grad_sample` (Opacus' layer rules for Conv/GroupNorm/InstanceNorm/Linear, its functorch fallback for
layers without a rule, e.g. ConvTranspose). Scaling the loss by 1/K and summing the K patch gradients of a
patient gives the gradient of the patient's mean patch loss, which is then clipped as a whole.
"""
from __future__ import annotations

import warnings

import torch
from opacus import GradSampleModule
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from torch import Tensor, nn

from dpunet.privacy.engines.base import (
    AccumulationStats,
    GradientEngine,
    PatientBatch,
    PerSampleLoss,
    add_weighted_sum,
    empty_stats,
    finalize_per_patient,
    per_patient_norms,
)


class OpacusHooksEngine(GradientEngine):
    name = "opacus_hooks"

    def __init__(self, model: nn.Module, loss_fn: PerSampleLoss, clip_norm: float | None) -> None:
        super().__init__(model, loss_fn, clip_norm)
        hooks_before = _hook_ids(model)
        try:
            # strict: refuse modules with buffers (BatchNorm running stats mix samples and are not private)
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        except Exception as e:
            # Opacus can fail half-way through wrapping (e.g. its functorch preparation of a MONAI block) after
            # hooking some modules; left there, the full backward hooks break every later engine on this model
            _remove_hooks_added_since(model, hooks_before)
            if isinstance(e, (NotImplementedError, RuntimeError)):
                raise ValueError(f"model is not compatible with per-sample gradients: {e}") from e
            raise

    def _per_patch_grads(self, p: nn.Parameter, num_patches: int) -> Tensor:
        gs = p.grad_sample
        if gs is None:  # parameter did not influence the loss (e.g. an unused deep-supervision head)
            return torch.zeros((num_patches, *p.shape), device=p.device, dtype=p.dtype)
        if isinstance(gs, list):  # several backward passes accumulated: cannot happen here, but sum them
            gs = torch.stack(gs).sum(0)
        return gs

    def _reset(self) -> None:
        """Forget everything the hooks recorded. Modules whose output did not reach the loss keep their
        activations and forward counters (no backward hook pops them), which would corrupt the next batch."""
        for p in self.params:
            p.grad_sample = None
            p._forward_counter = 0
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
        for m in self.model.modules():
            for attr in ("activations", "max_batch_len"):
                if hasattr(m, attr):
                    delattr(m, attr)

    def accumulate(self, batch: PatientBatch) -> AccumulationStats:
        if batch.num_patients == 0:
            return empty_stats()
        if not self.model.training:
            raise RuntimeError("OpacusHooksEngine needs the model in training mode (hooks only record then)")
        num_patients, k = batch.num_patients, batch.patches_per_patient
        data, targets = batch.flat()
        saved_grads = [p.grad for p in self.params]  # the engine leaves .grad as it found it
        for p in self.params:
            p.grad = None
        self._reset()
        try:
            patch_losses = self.loss_fn(self.gsm(data), targets)  # (B*K,)
            # 1/K: a patch's gradient is then its share of its patient's mean-loss gradient
            with warnings.catch_warnings():
                # expected: the first layer's input (the data) does not require grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (patch_losses.sum() / k).backward()
            per_patient_grads = [
                self._per_patch_grads(p, num_patients * k).reshape(num_patients, k, *p.shape).sum(1)
                for p in self.params
            ]
        finally:
            for p, g in zip(self.params, saved_grads):
                p.grad = g
        self._reset()
        norms = per_patient_norms(per_patient_grads)
        factors, _, num_clipped, num_nonfinite = finalize_per_patient(norms, self.clip_norm)
        add_weighted_sum(self.summed_grad, per_patient_grads, factors)
        patient_losses = patch_losses.detach().float().reshape(num_patients, k).mean(1)
        loss_sum = float(patient_losses.sum())
        return AccumulationStats(num_patients, loss_sum, norms.detach().cpu(), num_clipped, num_nonfinite)

    def close(self) -> None:
        """Remove Opacus' hooks and the attributes it put on the parameters; the model is plain again."""
        if getattr(self, "gsm", None) is not None:
            self.gsm.cleanup()
            for m in self.model.modules():
                for attr in ("activations", "max_batch_len", "ft_compute_sample_grad"):
                    if hasattr(m, attr):
                        delattr(m, attr)
            self.gsm = None


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_backward_hooks", "_backward_pre_hooks")
_OPACUS_MODULE_ATTRS = ("autograd_grad_sample_hooks", "activations", "max_batch_len", "ft_compute_sample_grad")


def _hook_ids(model: nn.Module) -> dict[int, dict[str, set]]:
    """The hook handles each module holds now, by id of the module."""
    return {id(m): {d: set(getattr(m, d, {})) for d in _HOOK_DICTS} for m in model.modules()}


def _remove_hooks_added_since(model: nn.Module, before: dict[int, dict[str, set]]) -> None:
    """Remove every module hook (and Opacus attribute) added after `before` was taken."""
    for m in model.modules():
        for d in _HOOK_DICTS:
            hooks = getattr(m, d, None)
            if hooks is None:
                continue
            for key in set(hooks) - before.get(id(m), {}).get(d, set()):
                del hooks[key]
        for attr in _OPACUS_MODULE_ATTRS:
            if hasattr(m, attr):
                delattr(m, attr)
        if m._backward_hooks == {} and hasattr(m, "_is_full_backward_hook"):
            m._is_full_backward_hook = None
    for p in model.parameters():
        for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
