"""Per-patient gradient engines behind one interface (`GradientEngine`); pick one with `make_engine`."""
from dpunet.privacy.engines.base import (
    AccumulationStats,
    GradientEngine,
    PatientBatch,
    PerSampleLoss,
    add_weighted_sum,
    clip_factors,
    empty_stats,
    finalize_per_patient,
    per_patient_norms,
)
from dpunet.privacy.engines.functorch_vmap import FunctorchEngine
from dpunet.privacy.engines.nonprivate import NonPrivateEngine
from dpunet.privacy.engines.opacus_hooks import OpacusHooksEngine
from dpunet.privacy.engines.reference import ReferenceLoopEngine
from dpunet.privacy.engines.registry import available_engines, benchmark_engines, make_engine, register_engine

__all__ = [
    "AccumulationStats",
    "FunctorchEngine",
    "GradientEngine",
    "NonPrivateEngine",
    "OpacusHooksEngine",
    "PatientBatch",
    "PerSampleLoss",
    "ReferenceLoopEngine",
    "add_weighted_sum",
    "available_engines",
    "benchmark_engines",
    "clip_factors",
    "empty_stats",
    "finalize_per_patient",
    "make_engine",
    "per_patient_norms",
    "register_engine",
]
