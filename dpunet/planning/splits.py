"""Cross-validation splits over patients (never cases: no patient is in a fold's training and validation sets
at once).

Two schemes:
- `patient_hash` (default for new plans): a patient's fold is SHA-256("dpunet-fold-v1", patient id) mod k, a
  function of that patient's own id alone. Adding or removing one patient moves no other patient between folds,
  so a fold's training set under add/remove adjacency changes by exactly that patient, which is what the
  per-fold DP guarantee assumes. Fold sizes vary (multinomial) instead of differing by at most one.
- `kfold`: nnU-Net's KFold(5, shuffle=True, random_state=12345) over the sorted ids, for comparisons with
  nnU-Net results. Adding one patient reshuffles many others between folds: the per-fold guarantee then holds
  only with the fold's training set taken as fixed, and the privacy report says so.
"""
from __future__ import annotations

import hashlib

from sklearn.model_selection import KFold

from dpunet.utils.errors import DpunetError

SPLIT_SCHEMES = ("patient_hash", "kfold")
DEFAULT_SPLIT_SCHEME = "patient_hash"
HASH_LABEL = "dpunet-fold-v1"


def patient_fold(patient_id: str, num_folds: int) -> int:
    """The fold whose validation set holds `patient_id` under the patient_hash scheme."""
    digest = hashlib.sha256(f"{HASH_LABEL}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_folds


def _validation_patients(patient_ids: list[str], num_folds: int, scheme: str, seed: int) -> list[list[str]]:
    if scheme == "patient_hash":
        folds: list[list[str]] = [[] for _ in range(num_folds)]
        for p in patient_ids:
            folds[patient_fold(p, num_folds)].append(p)
        return folds
    if scheme == "kfold":
        kfold = KFold(num_folds, shuffle=True, random_state=seed)
        return [[patient_ids[i] for i in val_idx] for _, val_idx in kfold.split(patient_ids)]
    raise DpunetError(f"unknown split scheme '{scheme}' (known: {', '.join(SPLIT_SCHEMES)})")


def make_splits(patients: dict[str, list[str]], num_folds: int = 5, seed: int = 12345,
                scheme: str = DEFAULT_SPLIT_SCHEME) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json structure: per fold the sorted training and validation case ids."""
    patient_ids = sorted(patients)
    if len(patient_ids) < num_folds:
        raise DpunetError(f"{len(patient_ids)} patients are too few for {num_folds}-fold cross-validation")
    splits = []
    for val_patients in _validation_patients(patient_ids, num_folds, scheme, seed):
        held_out = set(val_patients)
        train = sorted(c for p in patient_ids if p not in held_out for c in patients[p])
        val = sorted(c for p in val_patients for c in patients[p])
        splits.append({"train": train, "val": val})
    return splits


def split_statement(scheme: str, fold: int | str) -> str:
    """The report's sentence on what the per-fold guarantee assumes about the split."""
    if str(fold) == "all":
        return "fold 'all': every patient of the dataset is in the training set (no split involved)"
    if scheme == "patient_hash":
        return ("fold membership is a function of each patient's own id (patient_hash): adding or removing a patient "
                "moves no other patient between folds, so the guarantee holds for the fold's training set as it "
                "would be with or without any one patient")
    origin = ("come from KFold over the sorted patient list (nnU-Net compatible), where adding one patient moves "
              "others between folds" if scheme == "kfold" else "were made by hand (splits_final.json), with no "
              "per-patient rule")
    return (f"FIXED SPLIT ASSUMED: the folds {origin}; the guarantee holds with this fold's training set taken as "
            f"fixed, not for the dataset as a whole")


def fold_cases(splits: list[dict[str, list[str]]], fold: int | str) -> tuple[list[str], list[str]]:
    """(train, val) case ids of a fold; fold 'all' trains on every case and has no validation set."""
    if str(fold) == "all":
        return sorted(set(splits[0]["train"]) | set(splits[0]["val"])), []
    f = int(fold)
    if not 0 <= f < len(splits):
        raise DpunetError(f"fold {fold} does not exist (0..{len(splits) - 1} or 'all')")
    return list(splits[f]["train"]), list(splits[f]["val"])
