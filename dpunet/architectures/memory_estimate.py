"""The memory of one DP training micro-batch for any built network, measured rather than modelled.

dpunet.planning.memory models only the planned U-Net (its topology in closed form). A network of any other
`--arch` (MONAI, the classic families, another width or an adapted patch) is measured here instead: its
forward runs on `torch.device("meta")` tensors (shapes only: no memory, no arithmetic, well under a second
even for SwinUNETR) while a saved-tensors hook records every tensor autograd keeps for backward, counted once
per storage. Running it for one and for two patches separates the bytes per patch from what does not grow
with the batch (e.g. attention masks, the weights autograd saves). The micro-batch is then accounted as in
the planning model (`memory.training_bytes`): weights, summed gradient, optimiser moments, one instantiated
gradient per patient of the micro-batch, activations times patches.

What it leaves out, as the planning model does: the transient gradients of activations during backward and
the allocator's fragmentation; on the CPU a real step peaked at 1-2x the estimate (tests/test_memory_estimate.py).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from dpunet.planning import memory
from dpunet.utils.errors import DpunetError

# the loss keeps the softmax and the log-softmax of every output, and the logits themselves stay alive
_LOSS_TENSORS_PER_OUTPUT = 3


@dataclass(frozen=True)
class MicroBatchEstimate:
    """Bytes of one micro-batch of a network, as a function of its number of patients."""
    num_parameters: int
    trained_parameters: int
    patches_per_patient: int
    activation_bytes_per_patch: int
    activation_bytes_fixed: int
    # False for non-private training (--eps inf): its engine sums the batch's gradient without per-patient ones
    per_patient_gradients: bool = True

    def bytes(self, patients: int) -> int:
        """Estimated peak bytes for `patients` patients with K patches each."""
        patches = patients * self.patches_per_patient
        activations = self.activation_bytes_fixed + patches * self.activation_bytes_per_patch
        instantiated = patients if self.per_patient_gradients else 0  # patients whose gradient is held apart
        return memory.training_bytes(self.num_parameters, instantiated, activations, self.trained_parameters)

    def patients_that_fit(self, budget_bytes: float, cap: int | None = None) -> int:
        """The most whole patients whose micro-batch fits `budget_bytes` (0 when not even one does)."""
        return memory.largest_fitting(self.bytes, budget_bytes, cap)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def meta_replica(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are shape-only (meta) tensors: nothing is copied.
    A copy rather than torch.func.functional_call, which leaves meta tensors behind in networks that share
    a module under two names (MONAI's DynUNet)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


def saved_bytes(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes autograd keeps for backward after one training-mode forward of `model` on an input of
    `input_shape` (each storage once), plus the loss's share of the outputs; on meta tensors."""
    sizes: dict[int, int] = {}
    replica = meta_replica(model).train()  # what training keeps: dropout masks, deep-supervision heads
    # weights and buffers autograd saves are the model's own tensors, counted as weights, not activations
    own = {t.untyped_storage()._cdata for t in [*replica.parameters(), *replica.buffers()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in own:
            sizes[storage._cdata] = max(sizes.get(storage._cdata, 0), storage.nbytes())
        return t

    x = torch.empty(*[int(s) for s in input_shape], device="meta", dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = replica(x)
    output_bytes = sum(o.numel() * o.element_size() for o in _outputs(out))
    return int(sum(sizes.values()) + _LOSS_TENSORS_PER_OUTPUT * output_bytes)


def estimate_micro_batch(model: nn.Module, in_channels: int, patch_size: Sequence[int],
                         patches_per_patient: int, per_patient_gradients: bool = True) -> MicroBatchEstimate:
    """Measure `model` (as built: its trained subset, width and patch) for micro-batches of patients with
    `patches_per_patient` patches of `patch_size`. Raises DpunetError when the network cannot run on meta
    tensors (an operation that reads values)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        one, two = (saved_bytes(model, (b, int(in_channels), *patch_size), dtype) for b in (1, 2))
    except Exception as e:  # noqa: BLE001 - whatever stops the shape-only run (an op that reads values, a
        # module that cannot be copied) means "not measurable": the caller falls back, training goes on
        raise DpunetError(f"memory estimate: the network does not run on shape-only (meta) tensors "
                          f"({type(e).__name__}: {str(e)[:200]})") from None
    per_patch = max(0, two - one)
    return MicroBatchEstimate(
        num_parameters=sum(p.numel() for p in model.parameters()),
        trained_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        patches_per_patient=int(patches_per_patient),
        activation_bytes_per_patch=per_patch,
        activation_bytes_fixed=max(0, one - per_patch),
        per_patient_gradients=bool(per_patient_gradients))
