"""Everything that makes training private: accounting, Poisson sampling of patients, per-patient clipping
engines, the noisy step and the privacy report. Every trainer uses this package and nothing else for DP."""
