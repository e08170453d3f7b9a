"""Public tuning: DP hyperparameters chosen on a proxy task made from public information only (dpunet_tune_public)."""
