"""Per-case preprocessing (crop to non-zero, normalise, resample) and its exact inverse for predictions."""
