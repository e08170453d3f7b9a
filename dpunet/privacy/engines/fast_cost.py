"""The fast engine's per-layer cost model: instantiate per-patient weight gradients, or ghost norm.

For a weight of p elements shared over T output positions per patch, with K patches per patient and B
patients, a per-patient gradient is a sum over K*T outer products. Two ways to get its norm:

- instantiate: write the B per-patient gradients (B*p fp32), take row norms, later the weighted sum is a
  matrix-vector product. Extra memory B*p; extra work ~3 passes over B*p.
- ghost norm (Goodfellow 2015; Bu et al. 2022/2023 mixed ghost clipping): ||g_i||^2 from two Gram matrices
  of size (K*T)^2 per patient (for convs the input patches' Gram comes from the Gram of the padded input's
  pixels, (K*T_pad)^2, without unfolding); the weighted sum is a second weight-gradient op with per-patient-
  scaled output gradients. Extra memory: the Grams (transient) plus the layer's input and output gradient,
  kept until the clip factors are known (`LayerRule.ghost_bytes` counts them for the actual shapes).

Both spend one weight-gradient op's FLOPs; the ghost norm adds Gram FLOPs and saves the passes over B*p.
Following Bu et al., a layer is *eligible* for the ghost norm when 2*(K*T)^2 < p (the Grams are smaller
than one per-patient gradient) and, in bytes, the ghost path's buffers are smaller than the instantiated
gradients: the deep, low-resolution stages of a U-Net. Whether it is also *faster*
depends on the device (on a GPU the saved memory passes usually pay for the Grams; on a CPU the Gram FLOPs
cost more), so policy "auto" times both on the first micro-batch of each shape and keeps the faster, while
"memory" takes the ghost norm wherever it is eligible (least memory), "never" and "always" force a side.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FP32_BYTES = 4
GHOST_POLICIES = ("auto", "memory", "never", "always")


@dataclass
class LayerPlan:
    module: str  # qualified module name in the model
    kind: str  # module class name
    strategy: str  # "instantiate" | "ghost" | "fallback_vmap" | "fallback_loop" ("timed" until decided)
    params: int  # trainable parameters of the layer (p)
    weight_params: int  # p of the weight alone (what a ghost norm replaces)
    positions: int  # T: output positions per patch sharing the weight
    patients: int  # B
    patches: int  # K
    instantiate_bytes: int  # B * p * 4
    ghost_bytes: int | None  # Grams + kept input and output gradient; None if not ghost-capable
    reason: str
    method: str | None = None  # implementation of the per-patient gradients (timed when several exist)
    method_ms: dict[str, float] | None = None  # the timings that chose it (first micro-batch of this shape)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_weight_strategy(policy: str, ghost_bytes: int | None, single_use: bool, weight_params: int,
                           positions: int, num_patients: int, patches: int) -> tuple[str, str]:
    """(strategy, reason) for a layer's weight under a policy of `GHOST_POLICIES`; strategy is "instantiate",
    "ghost", or "timed" (eligible for both: the engine times them). `ghost_bytes` is what the ghost path
    would hold for this layer (None: the layer type has no ghost norm)."""
    if policy not in GHOST_POLICIES:
        raise ValueError(f"ghost policy must be one of {GHOST_POLICIES}, got {policy!r}")
    if ghost_bytes is None:
        return "instantiate", "no ghost norm for this layer type"
    if not single_use:
        return "instantiate", "module called more than once or weight shared (ghost needs one use)"
    if policy == "never":
        return "instantiate", "ghost norms disabled"
    if policy == "always":
        return "ghost", "ghost norms forced"
    kt = patches * positions
    instantiate_bytes = FP32_BYTES * num_patients * weight_params
    if 2 * kt * kt < weight_params and ghost_bytes < instantiate_bytes:
        if policy == "memory":
            return "ghost", f"2(KT)^2={2 * kt * kt} < p={weight_params}: least memory"
        return "timed", f"2(KT)^2={2 * kt * kt} < p={weight_params}: ghost eligible, faster kept"
    return "instantiate", (f"2(KT)^2={2 * kt * kt} >= p={weight_params} or ghost buffers ({ghost_bytes} B) "
                           f">= per-patient gradients ({instantiate_bytes} B)")
