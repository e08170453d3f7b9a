"""The fast engine's per-layer cost model: instantiate per-patient weight gradients, or ghost norm.

For a weight of p elements shared over T output positions per patch, with K patches per patient and B
patients, a per-patient gradient is a sum over K*T outer products. Two ways to get its norm:

- instantiate: write the B per-patient gradients (B*p fp32), take row norms, later the weighted sum is a
  matrix-vector product. Extra memory B*p; extra work ~3 passes over B*p.
- ghost norm (Goodfellow 2015; Bu et al. 2022/2023 mixed ghost clipping): ||g_i||^2 from two Gram matrices
  of size (K*T)^2 per patient (inputs unfolded to (K*T, D), D = p / C_out); the weighted sum is a second
  weight-gradient op with per-patient-scaled output gradients. Extra memory B*2*(K*T)^2 plus the unfolded
  inputs and the output gradient kept until the clip factors are known.

Both spend one weight-gradient op's FLOPs; the ghost norm adds B*(K*T)^2*(D + C_out) FLOPs for its Grams and
saves the passes over B*p. Following Bu et al., a layer is *eligible* for the ghost norm when 2*(K*T)^2 < p
(the Grams are smaller than one per-patient gradient) and, in bytes, the ghost path's buffers are smaller
than the instantiated gradients: the deep, low-resolution stages of a U-Net. Whether it is also *faster*
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
    ghost_bytes: int | None  # Grams + unfolded inputs + kept output gradient; None if not ghost-capable
    reason: str
    method: str | None = None  # implementation of the per-patient gradients (timed when several exist)
    method_ms: dict[str, float] | None = None  # the timings that chose it (first micro-batch of this shape)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ghost_buffer_bytes(num_patients: int, patches: int, positions: int, in_features: int,
                       out_features: int) -> int:
    """fp32 bytes the ghost path holds for one layer: two (K*T)^2 Grams per patient, the unfolded inputs
    (B*K*T, D) and the output gradient (B*K*T, C_out) kept until the second pass."""
    kt = patches * positions
    return FP32_BYTES * (num_patients * 2 * kt * kt + num_patients * kt * (in_features + out_features))


def choose_weight_strategy(policy: str, ghost_capable: bool, single_use: bool, weight_params: int,
                           out_features: int, positions: int, num_patients: int,
                           patches: int) -> tuple[str, int | None, str]:
    """(strategy, ghost_bytes, reason) for a layer's weight under a policy of `GHOST_POLICIES`; strategy is
    "instantiate", "ghost", or "timed" (eligible for both: the engine times them)."""
    if policy not in GHOST_POLICIES:
        raise ValueError(f"ghost policy must be one of {GHOST_POLICIES}, got {policy!r}")
    if not ghost_capable:
        return "instantiate", None, "no ghost norm for this layer type"
    in_features = weight_params // max(1, out_features)
    ghost_bytes = ghost_buffer_bytes(num_patients, patches, positions, in_features, out_features)
    if not single_use:
        return "instantiate", ghost_bytes, "module called more than once or weight shared (ghost needs one use)"
    if policy == "never":
        return "instantiate", ghost_bytes, "ghost norms disabled"
    if policy == "always":
        return "ghost", ghost_bytes, "ghost norms forced"
    kt = patches * positions
    instantiate_bytes = FP32_BYTES * num_patients * weight_params
    if 2 * kt * kt < weight_params and ghost_bytes < instantiate_bytes:
        if policy == "memory":
            return "ghost", ghost_bytes, f"2(KT)^2={2 * kt * kt} < p={weight_params}: least memory"
        return "timed", ghost_bytes, f"2(KT)^2={2 * kt * kt} < p={weight_params}: ghost eligible, faster kept"
    return "instantiate", ghost_bytes, f"2(KT)^2={2 * kt * kt} >= p={weight_params} or ghost buffers larger"
