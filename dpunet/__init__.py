"""dpunet: self-configuring U-Net segmentation trained with patient-level differential privacy.

The Python API (dpunet.plan_and_preprocess, train, predict, evaluate, Run) lives in dpunet.api and is loaded on
first use, so that `import dpunet` stays light (no torch) for the modules that only read the version."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_API = ("Run", "plan_and_preprocess", "train", "predict", "evaluate")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("dpunet.api"), name)
    raise AttributeError(f"module 'dpunet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
