"""Extract `dataset_fingerprint.json` for a raw task.

The fingerprint keeps three kinds of information apart:
- `header_metadata` (declared public): spacing, shape, origin, direction and channels of every case;
- `derived_from_pixels` (private, not DP): shapes after cropping to non-zero and class voxel fractions. They are
  recorded for inspection; the planner uses header shapes by default, and if asked to use cropped shapes it
  says so in the plan and the training report lists it as a caveat;
- `intensity`: per channel, how normalisation avoids pooled private statistics (per-image z-score), or the
  DP estimate used for CT, with its epsilon, which the trainer adds to the privacy report.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import dpunet
from dpunet.dataset.io import read_image, read_label
from dpunet.dataset.msd import Case, TaskInfo
from dpunet.preprocessing.cropping import bounding_box, nonzero_mask
from dpunet.privacy.randomness import PrivateRandomness
from dpunet.privacy.statistics import dp_bounded_means
from dpunet.utils.files import write_json

CT_PRIOR = {"window": [-1000.0, 1000.0], "mean": 0.0, "std": 500.0}


def _case_record(case: Case, label_values: list[int], ct_window: tuple[float, float] | None) -> dict[str, Any]:
    data, geometry = read_image(case.image)
    seg, _ = read_label(case.label) if case.label is not None else (None, None)
    box = bounding_box(nonzero_mask(data))
    record: dict[str, Any] = {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "geometry": geometry.to_dict(),
        "num_channels": int(data.shape[0]),
        "shape_after_crop": [b - a for a, b in box],
    }
    if seg is not None:
        counts = np.bincount(seg.ravel().clip(min=0), minlength=max(label_values) + 1)
        record["class_fractions"] = {str(v): float(counts[v] / seg.size) for v in label_values}
        if ct_window is not None:
            fg = seg > 0
            stats = []
            for c in data:
                v = np.clip(c[fg] if fg.any() else c.ravel(), *ct_window)
                stats.append([float(v.mean()), float(v.std())])
            record["ct_foreground_mean_std"] = stats
    return record


def _median(values: list[list[float]]) -> list[float]:
    return [float(v) for v in np.median(np.asarray(values, dtype=float), axis=0)]


def extract_fingerprint(task: TaskInfo, num_processes: int = 1, ct_statistics: str = "prior",
                        ct_epsilon: float = 0.1, ct_delta: float = 1e-6,
                        randomness: PrivateRandomness | None = None) -> dict[str, Any]:
    """Fingerprint of the task's training cases. `ct_statistics`: "prior" (declared public window) or "dp".
    The DP statistics' noise comes from `randomness`, by default a fresh key from the operating system's entropy:
    a public seed would let anyone subtract the noise (PrivateRandomness.insecure_from_seed only in tests)."""
    is_ct = [name.strip().upper() == "CT" for _, name in sorted(task.channel_names.items())]
    ct_window = tuple(CT_PRIOR["window"]) if any(is_ct) and ct_statistics == "dp" else None
    args = [(c, task.label_values, ct_window) for c in task.training]
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            futures = [pool.submit(_case_record, *a) for a in args]
            records = [f.result() for f in tqdm(futures, desc="fingerprint", unit="case")]
    else:
        records = [_case_record(*a) for a in tqdm(args, desc="fingerprint", unit="case")]

    intensity, fingerprint_eps, fingerprint_delta = {}, 0.0, 0.0
    for ch, ct in enumerate(is_ct):
        if not ct:
            intensity[str(ch)] = {"scheme": "zscore_per_image", "pooled_private_statistics": False}
        elif ct_statistics == "prior":
            intensity[str(ch)] = {"scheme": "ct_window", **CT_PRIOR, "source": "public prior (declared)",
                                  "pooled_private_statistics": False}
        else:
            per_patient: dict[str, list] = {}
            for r in records:
                per_patient.setdefault(r["patient_id"], []).append(r["ct_foreground_mean_std"][ch])
            vectors = np.array([np.mean(v, axis=0) for v in per_patient.values()])
            lo, hi = CT_PRIOR["window"]
            release = dp_bounded_means(vectors, np.array([lo, 0.0]), np.array([hi, (hi - lo) / 2]),
                                       ct_epsilon, ct_delta, randomness)
            intensity[str(ch)] = {"scheme": "ct_window", "window": [lo, hi], "mean": float(release.means[0]),
                                  "std": float(max(release.means[1], 1.0)), "source": "DP estimate",
                                  "epsilon": release.epsilon, "delta": release.delta,
                                  "noise_multiplier": release.noise_multiplier, "accountant": release.accountant,
                                  "pooled_private_statistics": True}
            fingerprint_eps += release.epsilon
            fingerprint_delta += release.delta
        for r in records:
            r.pop("ct_foreground_mean_std", None)

    spacings = [r["geometry"]["spacing"] for r in records]
    shapes = [r["geometry"]["shape"] for r in records]
    return {
        "dpunet_version": dpunet.__version__,
        "task": task.name,
        "num_cases": len(records),
        "num_patients": len({r["patient_id"] for r in records}),
        "channel_names": {str(k): v for k, v in task.channel_names.items()},
        "labels": {str(k): v for k, v in task.labels.items()},
        "header_metadata": {
            "privacy": "declared public: image header fields (spacing, shape, origin, direction), not pixel values",
            "spacings": spacings,
            "shapes": shapes,
            "median_spacing": _median(spacings),
            "median_shape": _median(shapes),
        },
        "derived_from_pixels": {
            "privacy": "derived from private pixel values/labels without DP; informational unless the plan says it "
                       "used them (then the privacy report lists it as a caveat)",
            "shapes_after_crop": [r["shape_after_crop"] for r in records],
            "median_shape_after_crop": _median([r["shape_after_crop"] for r in records]),
            "class_fractions": {r["case_id"]: r.get("class_fractions") for r in records},
        },
        "intensity": intensity,
        "privacy": {"epsilon": fingerprint_eps, "delta": fingerprint_delta,
                    "note": "epsilon spent on DP statistics outside DP-SGD; added to the training report"},
        "cases": [{k: r[k] for k in ("case_id", "patient_id", "geometry", "num_channels")} for r in records],
    }


def write_fingerprint(fingerprint: dict[str, Any], preprocessed_task_dir: Path) -> Path:
    path = Path(preprocessed_task_dir) / "dataset_fingerprint.json"
    write_json(fingerprint, path)
    return path
