"""Empirical privacy audit of a training configuration (`dpunet_audit`): one DP training run with Dirac gradient
canaries, membership guessed from the released weights, a lower bound on epsilon (dpunet.privacy.audit_bound)."""
from dpunet.audit.audit import AuditSettings, run_audit
from dpunet.audit.canaries import DiracCanaries

__all__ = ["AuditSettings", "DiracCanaries", "run_audit"]
