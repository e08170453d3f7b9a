"""Experiment planning: nnU-Net's topology rules plus DP constraints, written to `dpunet_plans.json`."""
