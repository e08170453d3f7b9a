"""The releasable model: `fold_X/release/model_release.pt` plus its metadata as `model_release.json`.

A run folder holds two kinds of files. `release/` is the only folder meant for sharing: the model file (the
weights used for inference, EMA when the run used it), what prediction needs to rebuild and feed the network
(architecture, channels, classes, the plan configuration's geometry and preprocessing) and the privacy report.
Nothing else: no patient or case ids, no seeds, no generator or sampler state, no optimiser state, no training
log. Everything else under `fold_X/` (private/ with the resumption checkpoint, the training log, the run
configuration, validation on held-out patients) is for the data owner only.

`assert_releasable` walks everything written here and refuses keys that would carry private state, so a later
change that adds such a field fails loudly instead of leaking.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import dpunet
from dpunet.architectures import build_network
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import atomic_write_with, write_json

FORMAT = "dpunet-release-v1"
RELEASE_FOLDER = "release"
PRIVATE_FOLDER = "private"
CHECKPOINT_FILE = "checkpoint_latest.pt"  # in PRIVATE_FOLDER: resumption state, never released
MODEL_FILE = "model_release.pt"
METADATA_FILE = "model_release.json"
# key fragments that must never appear in a released file: private state or training-set identity
FORBIDDEN_KEY_PARTS = ("seed", "generator", "sampler", "optimizer", "optimiser", "patient_id", "case_id",
                       "train_cases", "val_cases", "splits", "ledger_state", "rng", "key")
# plan configuration entries prediction needs (geometry, preprocessing, network input/output)
PLAN_KEYS_FOR_PREDICTION = ("data_identifier", "dim", "spacing", "patch_size", "normalization_schemes",
                            "resampling", "mirror_axes", "transpose_forward", "transpose_backward",
                            "use_mask_for_norm", "crop_to_nonzero")


@dataclass
class ReleasedModel:
    path: Path
    weights: dict[str, torch.Tensor]
    architecture: dict[str, Any]
    num_channels: int
    num_classes: int
    plan_configuration: dict[str, Any]
    metadata: dict[str, Any]


def release_folder(run_fold_dir: Path) -> Path:
    """fold_X/release: the model file and the privacy report, the only files meant for sharing."""
    return Path(run_fold_dir) / RELEASE_FOLDER


def private_folder(run_fold_dir: Path) -> Path:
    """fold_X/private: resumption checkpoint, run configuration, logs, validation; never to be shared."""
    return Path(run_fold_dir) / PRIVATE_FOLDER


def assert_releasable(obj: Any, where: str = "release") -> None:
    """Refuse any mapping key naming private state (seeds, generators, patient ids, optimiser state)."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            name = str(k).lower()
            hit = next((part for part in FORBIDDEN_KEY_PARTS if part in name), None)
            if hit is not None:
                raise DpunetError(f"{where}: key {k!r} would release private state ('{hit}'); refusing to write it")
            assert_releasable(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_releasable(v, f"{where}[{i}]")


def _prediction_plan(plan_configuration: Mapping[str, Any]) -> dict[str, Any]:
    return {k: plan_configuration[k] for k in PLAN_KEYS_FOR_PREDICTION if k in plan_configuration}


def write_release(folder: Path, *, weights: Mapping[str, torch.Tensor], architecture: dict[str, Any],
                  num_channels: int, num_classes: int, plan_configuration: Mapping[str, Any],
                  description: dict[str, Any], privacy_report: dict[str, Any]) -> Path:
    """Write model_release.pt and model_release.json atomically into `folder`; returns the model file.

    `description`: task, configuration, fold, arch name, weights used ("ema"/"final"), labels: public facts about
    the model. `privacy_report`: the run's privacy report (its statement travels with the weights)."""
    plan = _prediction_plan(plan_configuration)
    metadata = {"format": FORMAT, "dpunet_version": dpunet.__version__, **description,
                "architecture": architecture, "num_channels": int(num_channels), "num_classes": int(num_classes),
                "plan_configuration": plan, "privacy": privacy_report}
    assert_releasable(metadata, METADATA_FILE)
    state = {**metadata, "weights": {k: v.detach().cpu().clone() for k, v in weights.items()}}
    folder = Path(folder)
    model_path = folder / MODEL_FILE
    atomic_write_with(model_path, lambda tmp: torch.save(state, tmp))
    write_json(metadata, folder / METADATA_FILE)
    return model_path


def load_release(path: str | Path) -> ReleasedModel:
    """A release file, checked: every problem is a DpunetError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DpunetError(f"{path}: model file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise DpunetError(f"{path}: cannot load the model file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DpunetError(f"{path}: not a dpunet release model file (expected format {FORMAT})")
    try:
        weights = state.pop("weights")
        return ReleasedModel(path=path, weights=weights, architecture=state["architecture"],
                             num_channels=int(state["num_channels"]), num_classes=int(state["num_classes"]),
                             plan_configuration=state["plan_configuration"], metadata=state)
    except (KeyError, TypeError, ValueError) as e:
        raise DpunetError(f"{path}: model file lacks {e} needed for inference") from None


def network_from_release(model: ReleasedModel) -> nn.Module:
    """The trained architecture with the released weights, in eval mode, full-resolution output only."""
    # deep-supervision heads are part of the weights: build as trained, then use the full-resolution output only
    num_heads = len({k.split(".")[2] for k in model.weights if k.startswith("decoder.heads.")})
    # MONAI DynUNet keeps its deep-supervision heads under this name
    monai_heads = any(k.startswith("net.deep_supervision_heads.") for k in model.weights)
    network = build_network(model.architecture, model.num_channels, model.num_classes,
                            deep_supervision=num_heads > 1 or monai_heads)
    try:
        network.load_state_dict(model.weights)
    except RuntimeError as e:
        raise DpunetError(f"{model.path}: weights do not fit the stored architecture ({e})") from None
    network.deep_supervision = False
    network.eval()
    return network
