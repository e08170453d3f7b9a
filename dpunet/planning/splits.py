"""5-fold cross-validation splits, nnU-Net compatible: KFold(5, shuffle=True, random_state=12345) over the
sorted ids. dpunet splits patients, not cases, so no patient is in a fold's training and validation sets at
once; with one case per patient this is exactly nnU-Net's split over sorted case ids."""
from __future__ import annotations

from sklearn.model_selection import KFold

from dpunet.utils.errors import DpunetError


def make_splits(patients: dict[str, list[str]], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    patient_ids = sorted(patients)
    if len(patient_ids) < num_folds:
        raise DpunetError(f"{len(patient_ids)} patients are too few for {num_folds}-fold cross-validation")
    splits = []
    for train_idx, val_idx in KFold(num_folds, shuffle=True, random_state=seed).split(patient_ids):
        train = sorted(c for i in train_idx for c in patients[patient_ids[i]])
        val = sorted(c for i in val_idx for c in patients[patient_ids[i]])
        splits.append({"train": train, "val": val})
    return splits


def fold_cases(splits: list[dict[str, list[str]]], fold: int | str) -> tuple[list[str], list[str]]:
    """(train, val) case ids of a fold; fold 'all' trains on every case and has no validation set."""
    if str(fold) == "all":
        return sorted(set(splits[0]["train"]) | set(splits[0]["val"])), []
    f = int(fold)
    if not 0 <= f < len(splits):
        raise DpunetError(f"fold {fold} does not exist (0..{len(splits) - 1} or 'all')")
    return list(splits[f]["train"]), list(splits[f]["val"])
