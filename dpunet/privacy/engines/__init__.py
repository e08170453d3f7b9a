"""Per-patient gradient engines behind one interface (`GradientEngine`)."""
from dpunet.privacy.engines.base import AccumulationStats, GradientEngine, PatientBatch
from dpunet.privacy.engines.reference import ReferenceLoopEngine

__all__ = ["AccumulationStats", "GradientEngine", "PatientBatch", "ReferenceLoopEngine"]
