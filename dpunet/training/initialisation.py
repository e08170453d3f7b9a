"""Initial weights from a public checkpoint: public pretraining, then DP fine-tuning (`--init-from`).

Weights learned without the private training patients cost no privacy, and with few patients they are the
largest lever DP-SGD has (Tramer & Boneh 2021; Tang et al. 2023 pretrain on images of random processes). The
guarantee then rests on a declaration: the checkpoint's training data is public. The privacy report lists the
checkpoint, its hash and what it was trained on, and a checkpoint trained on the same task is refused, because
its training patients are (or overlap) the private ones and their cost would have to be composed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpunet.release import load_release
from dpunet.release.model_file import FORMAT as RELEASE_FORMAT
from dpunet.learning.checkpoint import load_checkpoint
from dpunet.utils.errors import DpunetError

# tensors that may differ in shape from the checkpoint (another number of classes): they keep their seeded
# initialisation
RESHAPEABLE_PREFIXES = ("decoder.heads.",)
# MONAI DynUNet's deep-supervision heads (registered twice: in its head list and inside its skip layers)
DEEP_SUPERVISION_HEAD_PARTS = ("deep_supervision_heads.", ".super_head.")


def is_head_weight(key: str) -> bool:
    """A tensor of an output head: it may differ (classes) or be absent (deep supervision on or off)."""
    return key.startswith(RESHAPEABLE_PREFIXES) or any(part in key for part in DEEP_SUPERVISION_HEAD_PARTS)


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (names, shapes, dtypes, values), not of the file: two checkpoints
    with the same weights have the same hash whatever else they record (timings, paths)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def checkpoint_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint is meant to be used with: its EMA when the run evaluated the EMA."""
    if state.get("inference_weights") == "ema" and "ema" in state:
        return state["ema"]["shadow"]
    return state["weights"]


def describe_source(state: dict[str, Any]) -> str:
    """What the checkpoint was trained on, from the record it carries."""
    if state.get("public_source"):
        return str(state["public_source"])
    cfg = state.get("config", {})
    eps = cfg.get("epsilon", "?")
    return f"a dpunet run on {cfg.get('task', '?')} ({cfg.get('configuration', '?')}, fold {cfg.get('fold', '?')}, " \
           f"epsilon {eps}), declared public by the user"


def _read_weights_file(path: Path) -> dict[str, Any]:
    """A dpunet checkpoint (pretraining, resumption) or a release model file, as a checkpoint-like record."""
    try:
        return load_checkpoint(path)
    except DpunetError as not_a_checkpoint:
        try:
            released = load_release(path)
        except DpunetError:
            raise not_a_checkpoint from None
    meta = released.metadata
    return {"weights": released.weights, "format": RELEASE_FORMAT,
            "config": {"task": meta.get("task"), "configuration": meta.get("configuration"),
                       "fold": meta.get("fold"), "epsilon": meta.get("privacy", {}).get("target_epsilon", "?")}}


def load_initial_weights(model: nn.Module, path: str | Path, task_name: str) -> dict[str, Any]:
    """Copy the checkpoint's weights into `model` (same names and shapes; heads may differ) and return the
    provenance record the privacy report lists."""
    path = Path(path)
    state = _read_weights_file(path)
    source_task = state.get("config", {}).get("task")
    if source_task == task_name and not state.get("public_source"):
        raise DpunetError(f"--init-from {path}: that checkpoint was trained on {task_name} itself, whose patients "
                          f"are private; its privacy cost would have to be composed with this run's. Use --continue "
                          f"to resume a run, or initialise from a checkpoint trained on public data")
    weights = checkpoint_weights(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    reshaped = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    bad_shapes = [k for k in reshaped if not is_head_weight(k)]
    not_heads = [k for k in missing + unexpected if not is_head_weight(k)]
    if bad_shapes or not_heads:
        detail = "; ".join([f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shapes[:3]] +
                           [f"{k}: only in one of them" for k in not_heads[:3]])
        raise DpunetError(f"--init-from {path}: the checkpoint's network differs from the planned one "
                          f"({len(bad_shapes) + len(not_heads)} tensors, e.g. {detail}); pretrain with the same "
                          f"plan, --arch and --width")
    heads_own = {k for k in own if is_head_weight(k)}
    heads_saved = {k for k in weights if is_head_weight(k)}
    if heads_own != heads_saved:  # with and without deep supervision, heads.i are different outputs
        reshaped = sorted(set(reshaped) | (heads_own & heads_saved))
    copied = {k: v for k, v in weights.items() if k in own and k not in reshaped}
    model.load_state_dict(copied, strict=False)
    return {"path": str(path), "weights_sha256": weights_sha256(weights), "trained_on": describe_source(state),
            "tensors_copied": len(copied), "tensors_kept_at_initialisation": sorted(set(missing) | set(reshaped))}
