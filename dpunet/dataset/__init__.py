"""Raw MSD tasks: dataset.json, NIfTI reading/writing with full geometry, integrity checks."""
