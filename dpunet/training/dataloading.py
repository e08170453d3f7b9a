"""Per-patient patch sampling: the data side of patient-level DP-SGD.

For every sampled patient the sampler draws K patches (each from one of the patient's own cases, foreground-
oversampled like nnU-Net) and augments each independently. The trainer averages the K patch losses into one
per-patient loss before clipping, so a patient contributes one bounded gradient however many cases or patches it
has.

All randomness of a patch comes from `numpy.random.default_rng([seed, step, patient key, k])`: a batch is a pure
function of (seed, step, patient ids), independent of worker scheduling, and a resumed run redraws exactly the
batches the interrupted one would have drawn.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpunet.privacy.engines.base import PatientBatch
from dpunet.training.augmentation import PatchAugmenter
from dpunet.learning.loss import downsample_seg_for_deep_supervision
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json


@dataclass
class PreprocessedCase:
    data: np.ndarray  # float32 (C, Z, Y, X)
    seg: np.ndarray  # int16 (1, Z, Y, X)
    properties: dict[str, Any]
    class_locations: dict[int, np.ndarray]  # label -> (n, 3) int array of (z, y, x) voxels


class PreprocessedCaseStore:
    """Lazy access to the <case>.npz + <case>.json files of one preprocessed configuration folder."""

    def __init__(self, folder: str | Path, case_ids: Sequence[str], cache: bool = True) -> None:
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self._known = set(self.case_ids)
        self.cache = cache
        self._cases: dict[str, PreprocessedCase] = {}
        if not self.folder.is_dir():
            raise DpunetError(f"preprocessed folder {self.folder} does not exist")
        missing = [c for c in self.case_ids if not (self.folder / f"{c}.npz").is_file()
                   or not (self.folder / f"{c}.json").is_file()]
        if missing:
            raise DpunetError(f"{self.folder}: no preprocessed files (.npz + .json) for case(s) "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; run preprocessing")

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._known

    def __getstate__(self) -> dict[str, Any]:
        # a spawned worker reloads what it needs rather than receiving every cached volume through a pipe
        state = self.__dict__.copy()
        state["_cases"] = {}
        return state

    def load(self, case_id: str) -> PreprocessedCase:
        if case_id in self._cases:
            return self._cases[case_id]
        if case_id not in self._known:
            raise KeyError(f"case {case_id!r} is not in this store")
        npz_path, json_path = self.folder / f"{case_id}.npz", self.folder / f"{case_id}.json"
        try:
            with np.load(npz_path) as f:
                data, seg = f["data"], f["seg"]
            properties = load_json(json_path)
        except FileNotFoundError as e:
            raise DpunetError(f"preprocessed file {e.filename} is missing") from e
        except (KeyError, ValueError, OSError) as e:
            raise DpunetError(f"cannot read preprocessed case {case_id} from {npz_path} / {json_path}: {e}") from e
        if data.ndim != 4 or seg.ndim != 4 or seg.shape[0] != 1 or data.shape[1:] != seg.shape[1:]:
            raise DpunetError(f"{npz_path}: expected data (C, Z, Y, X) and seg (1, Z, Y, X) of one shape, got "
                              f"{data.shape} and {seg.shape}")
        locations = {}
        for label, coords in (properties.get("class_locations") or {}).items():
            arr = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
            if len(arr):
                locations[int(label)] = arr
        case = PreprocessedCase(data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False), properties,
                                locations)
        if self.cache:
            self._cases[case_id] = case
        return case

    def data(self, case_id: str) -> np.ndarray:
        return self.load(case_id).data

    def seg(self, case_id: str) -> np.ndarray:
        return self.load(case_id).seg

    def properties(self, case_id: str) -> dict[str, Any]:
        return self.load(case_id).properties

    @property
    def num_channels(self) -> int:
        if not self.case_ids:
            raise DpunetError(f"{self.folder}: the store holds no cases")
        return int(self.load(self.case_ids[0]).data.shape[0])


def stable_patient_key(patient_id: str) -> int:
    """A 64-bit integer for a patient id, identical in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(patient_id.encode("utf-8"), digest_size=8).digest(), "little")


def patch_rng(seed: int, step: int, patient_id: str, patch_index: int) -> np.random.Generator:
    """The generator every random choice of one patch comes from."""
    return np.random.default_rng([int(seed), int(step), stable_patient_key(patient_id), int(patch_index)])


def iterate_micro_batches(patient_ids: Sequence[str], physical_patients_per_micro_batch: int) -> list[list[str]]:
    """Split a logical batch into physical micro-batches of whole patients (an empty batch gives no chunks)."""
    if physical_patients_per_micro_batch < 1:
        raise DpunetError(f"a micro-batch must hold at least one patient, got {physical_patients_per_micro_batch}")
    ids = list(patient_ids)
    n = physical_patients_per_micro_batch
    return [ids[i:i + n] for i in range(0, len(ids), n)]


class PatientPatchSampler:
    """Draws K independently augmented patches per patient and stacks them into PatientBatch tensors."""

    def __init__(
        self,
        store: PreprocessedCaseStore,
        patients: dict[str, list[str]],
        patch_size: Sequence[int],
        patches_per_patient: int,
        oversample_foreground_fraction: float = 0.33,
        augmentation_params: dict[str, Any] | None = None,
        dim_of_patch: int = 3,
        ignore_label: int | None = None,
        deep_supervision_strides: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """`deep_supervision_strides`: the architecture's per-stage strides; targets then hold one label map per
        decoder stage (level l downsampled by the cumulative stride, see `downsample_seg_for_deep_supervision`).
        None: one full-resolution target."""
        self.store = store
        self.patients = {p: list(cases) for p, cases in patients.items()}
        self.patch_size = [int(p) for p in patch_size]
        self.patches_per_patient = int(patches_per_patient)
        self.oversample_foreground_fraction = float(oversample_foreground_fraction)
        self.dim = int(dim_of_patch)
        self.ignore_label = ignore_label
        if self.dim not in (2, 3) or len(self.patch_size) != self.dim:
            raise DpunetError(f"patch size {self.patch_size} does not fit {dim_of_patch}D patches")
        if self.patches_per_patient < 1:
            raise DpunetError(f"patches per patient must be >= 1, got {patches_per_patient}")
        if not 0.0 <= self.oversample_foreground_fraction <= 1.0:
            raise DpunetError(f"oversample_foreground_fraction must lie in [0, 1], got "
                              f"{oversample_foreground_fraction}")
        for patient, cases in self.patients.items():
            if not cases:
                raise DpunetError(f"patient {patient} has no cases")
            unknown = [c for c in cases if c not in store]
            if unknown:
                raise DpunetError(f"patient {patient}: case(s) {unknown} are not in the preprocessed store "
                                  f"{store.folder}")
        self.augmenter = PatchAugmenter(augmentation_params) if augmentation_params else None
        if self.augmenter is not None and self.augmenter.patch_size != self.patch_size:
            raise DpunetError(f"augmentation plan is for patch {self.augmenter.patch_size}, sampler for "
                              f"{self.patch_size}")
        self.source_size = self.augmenter.source_size if self.augmenter is not None else list(self.patch_size)
        self.deep_supervision_strides = None if deep_supervision_strides is None else \
            [[int(v) for v in stage] for stage in deep_supervision_strides]
        if self.deep_supervision_strides is not None and any(len(s) != self.dim
                                                             for s in self.deep_supervision_strides):
            raise DpunetError(f"deep supervision strides {self.deep_supervision_strides} do not fit "
                              f"{self.dim}D patches")
        self._num_channels: int | None = None

    @property
    def num_channels(self) -> int:
        if self._num_channels is None:
            self._num_channels = self.store.num_channels
        return self._num_channels

    # -- one patch -------------------------------------------------------------------------------------------
    def sample_patch(self, patient_id: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One augmented patch (data (C, *patch), seg (1, *patch)) of this patient, all choices drawn from rng."""
        cases = self.patients[patient_id]
        case = self.store.load(cases[int(rng.integers(len(cases)))])
        data, seg = case.data, case.seg
        force_fg = rng.random() < self.oversample_foreground_fraction
        voxel = self._foreground_voxel(case, rng) if force_fg else None

        if self.dim == 2:
            z = int(voxel[0]) if voxel is not None else int(rng.integers(data.shape[1]))
            data, seg = data[:, z], seg[:, z]
            voxel = voxel[1:] if voxel is not None else None
        shape = data.shape[1:]

        lower = []
        for axis, (size, p) in enumerate(zip(shape, self.patch_size)):
            # nnU-Net's placement: inside the image where it fits, centred (padded) where the image is smaller
            lo_min = min(0, -((p - size) // 2))
            lo_max = max(lo_min, size - p)
            if voxel is not None:
                lo = int(np.clip(int(voxel[axis]) - p // 2, lo_min, lo_max))
            else:
                lo = int(rng.integers(lo_min, lo_max + 1))
            lower.append(lo)
        source_lower = [lo - (s - p) // 2 for lo, s, p in zip(lower, self.source_size, self.patch_size)]
        data_patch = _crop_padded(data, source_lower, self.source_size)
        seg_patch = _crop_padded(seg, source_lower, self.source_size)
        if self.augmenter is not None:
            data_patch, seg_patch = self.augmenter(data_patch, seg_patch, rng)
        return data_patch, seg_patch

    def _foreground_voxel(self, case: PreprocessedCase, rng: np.random.Generator) -> np.ndarray | None:
        """A random voxel of a random foreground class present in the case; None when there is none."""
        classes = sorted(c for c in case.class_locations if c != self.ignore_label and c != 0)
        if not classes:
            return None
        coords = case.class_locations[classes[int(rng.integers(len(classes)))]]
        return coords[int(rng.integers(len(coords)))]

    # -- batches ---------------------------------------------------------------------------------------------
    def make_patient_arrays(self, patient_ids: Sequence[str], step: int, seed: int
                            ) -> tuple[np.ndarray, np.ndarray]:
        """The patches of `make_patient_batch` as numpy arrays (what workers send back): data float32
        (B, K, C, *patch) and seg int16 (B, K, 1, *patch)."""
        unknown = [p for p in patient_ids if p not in self.patients]
        if unknown:
            raise DpunetError(f"unknown patient id(s) {unknown[:5]} for this sampler")
        b, k = len(patient_ids), self.patches_per_patient
        data = np.zeros((b, k, self.num_channels, *self.patch_size), dtype=np.float32)
        seg = np.zeros((b, k, 1, *self.patch_size), dtype=np.int16)
        for i, patient in enumerate(patient_ids):
            for j in range(k):
                data[i, j], seg[i, j] = self.sample_patch(patient, patch_rng(seed, step, patient, j))
        return data, seg

    def to_patient_batch(self, data: np.ndarray, seg: np.ndarray) -> PatientBatch:
        """Tensors for the engine: data float32, targets int64 class indices, one per deep-supervision level."""
        seg_t = torch.from_numpy(seg.astype(np.int64))
        if self.deep_supervision_strides is None:
            targets = [seg_t]
        else:
            levels = downsample_seg_for_deep_supervision(seg_t, self.deep_supervision_strides)
            targets = [t.contiguous() for t in levels]
        return PatientBatch(torch.from_numpy(data), targets)

    def make_patient_batch(self, patient_ids: Sequence[str], step: int, seed: int) -> PatientBatch:
        """K augmented patches for each patient; B = len(patient_ids) may be 0."""
        return self.to_patient_batch(*self.make_patient_arrays(patient_ids, step, seed))


def _crop_padded(arr: np.ndarray, lower: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """arr[:, lower:lower+size] over the spatial axes, zero where the window leaves the array."""
    out = np.zeros((arr.shape[0], *size), dtype=arr.dtype)
    src, dst = [slice(None)], [slice(None)]
    for lo, s, n in zip(lower, size, arr.shape[1:]):
        a, b = max(lo, 0), min(lo + s, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = arr[tuple(src)]
    return out
