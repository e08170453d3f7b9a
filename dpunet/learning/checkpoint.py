"""Checkpoints that load with torch.load(weights_only=True) and are written atomically: a kill at any
moment leaves the previous checkpoint intact."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpunet.utils.errors import DpunetError
from dpunet.utils.files import atomic_write_with

FORMAT = "dpunet-checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    state = {"format": FORMAT, **state}
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not Path(path).is_file():
        raise DpunetError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise DpunetError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DpunetError(f"{path}: not a dpunet checkpoint")
    return state
