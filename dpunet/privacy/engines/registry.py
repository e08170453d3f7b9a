"""Engines by name, and the choice of the fastest one for a model.

Built-in names: "reference_loop" (the oracle), "opacus_hooks", "functorch", "nonprivate", and "auto".
Other engines register themselves with `register_engine(name, cls)`; a name that is not registered yet is
looked up as the module `dpunet.privacy.engines.<name>` (importing it is expected to register it), so an
engine in `dpunet/privacy/engines/fast.py` is found as "fast" without this file naming it.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import time
from typing import Any, Sequence

import torch
from torch import nn

from dpunet.privacy.engines.base import GradientEngine, PatientBatch, PerSampleLoss
from dpunet.privacy.engines.functorch_vmap import FunctorchEngine
from dpunet.privacy.engines.nonprivate import NonPrivateEngine
from dpunet.privacy.engines.opacus_hooks import OpacusHooksEngine
from dpunet.privacy.engines.reference import ReferenceLoopEngine
from dpunet.utils.errors import DpunetError

logger = logging.getLogger(__name__)

_ENGINES: dict[str, type[GradientEngine]] = {}

# candidates "auto" benchmarks when it is given a batch to measure on
AUTO_CANDIDATES: tuple[str, ...] = ("fast", "functorch", "opacus_hooks")
# what "auto" uses for private training without a measurement (fastest in documentation/performance.md)
AUTO_DEFAULT = "fast"


def register_engine(name: str, cls: type[GradientEngine], overwrite: bool = False) -> None:
    """Make `cls` available as `make_engine(name, ...)`."""
    if not (isinstance(cls, type) and issubclass(cls, GradientEngine)):
        raise TypeError(f"{cls!r} is not a GradientEngine subclass")
    if name == "auto":
        raise ValueError('"auto" is reserved')
    if name in _ENGINES and _ENGINES[name] is not cls and not overwrite:
        raise ValueError(f"an engine named {name!r} is already registered ({_ENGINES[name].__name__})")
    _ENGINES[name] = cls


def _lookup(name: str) -> type[GradientEngine]:
    if name not in _ENGINES and name.isidentifier():
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise  # the engine's module exists but one of its imports is missing: say so
    if name not in _ENGINES:
        raise DpunetError(f"unknown gradient engine {name!r}; available: {', '.join(available_engines())}, auto")
    return _ENGINES[name]


def available_engines() -> list[str]:
    return sorted(_ENGINES)


def make_engine(
    name: str,
    model: nn.Module,
    loss_fn: PerSampleLoss,
    clip_norm: float | None,
    benchmark_batch: PatientBatch | None = None,
    **engine_kwargs: Any,
) -> GradientEngine:
    """The engine `name` for this model. "auto": the non-private engine when `clip_norm` is None; otherwise
    the fastest of `AUTO_CANDIDATES` on `benchmark_batch` when one is given, else `AUTO_DEFAULT`."""
    auto = name == "auto"
    if auto:
        if clip_norm is None:
            name = "nonprivate"
        elif benchmark_batch is not None:
            timings = benchmark_engines(model, loss_fn, clip_norm, benchmark_batch, names=AUTO_CANDIDATES)
            name = min(timings, key=timings.get)
            if not math.isfinite(timings[name]):
                raise DpunetError(f"no gradient engine could run this model: {timings}")
            logger.info("engine auto-selection: %s (seconds per micro-batch: %s)", name, timings)
        else:
            name = AUTO_DEFAULT
    cls = _lookup(name)
    if clip_norm is None and cls is not NonPrivateEngine and name != "reference_loop":
        # private engines would run without clipping; allowed (they then sum plain gradients), but say it
        logger.info("engine %s used with clip_norm=None: gradients are summed without clipping", name)
    if clip_norm is not None and cls is NonPrivateEngine:
        raise DpunetError("the non-private engine cannot clip; use a private engine or clip_norm=None")
    if auto:  # options meant for one candidate (e.g. patients_per_chunk) must not break another
        accepted = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            engine_kwargs = {k: v for k, v in engine_kwargs.items() if k in accepted}
    return cls(model, loss_fn, clip_norm, **engine_kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_engines(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    clip_norm: float | None,
    batch: PatientBatch,
    names: Sequence[str] = AUTO_CANDIDATES,
    repeats: int = 2,
) -> dict[str, float]:
    """Seconds per `accumulate` of each engine on `batch` (best of `repeats` after one warm-up), inf for an
    engine that fails on this model. Parameters and their .grad are left untouched."""
    device = next(model.parameters()).device
    timings: dict[str, float] = {}
    for name in names:
        engine = None
        try:
            engine = _lookup(name)(model, loss_fn, clip_norm)
            engine.accumulate(batch)  # warm-up (allocations, cudnn autotuning, lazy hooks)
            best = math.inf
            for _ in range(max(1, repeats)):
                _sync(device)
                start = time.perf_counter()
                engine.accumulate(batch)
                _sync(device)
                best = min(best, time.perf_counter() - start)
            timings[name] = best
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            logger.warning("engine %s failed on this model: %s", name, e)
            timings[name] = math.inf
        finally:
            if engine is not None:
                engine.close()
            del engine
    return timings


for _name, _cls in (
    ("reference_loop", ReferenceLoopEngine),
    ("opacus_hooks", OpacusHooksEngine),
    ("functorch", FunctorchEngine),
    ("nonprivate", NonPrivateEngine),
):
    register_engine(_name, _cls)

# the fast engine registers itself when its module is imported; import it so "auto" and the listings see it
importlib.import_module(f"{__package__}.fast")
