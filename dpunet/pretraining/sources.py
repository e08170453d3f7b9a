"""The public generators of labelled images, one registry for everything that uses them: pretraining (`--init-from`,
the plan's training.init_from) draws batches from them, and dpunet_tune_public (`--proxy`) draws proxy patients.

Each source names its sample function (rng, shape, channels, num_classes) -> (image (channels, *shape) float32,
labels (1, *shape) int) and the description a checkpoint's `public_source` (hence the privacy report) carries.
Sources import and load lazily: naming one costs nothing until images have to be made.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np

from dpunet.planning.dp_plan import PUBLIC_PRETRAINING_SOURCES
from dpunet.utils.errors import DpunetError

SampleFunction = Callable[[np.random.Generator, "Sequence[int]", int, int], "tuple[np.ndarray, np.ndarray]"]
BatchFunction = Callable[[np.random.Generator, int, "Sequence[int]", int, int], "tuple[np.ndarray, np.ndarray]"]

RANDOM_IMAGES = "random_images"
SYNTHETIC_BRAIN = "synthetic_brain"
SYNTHETIC_HIPPOCAMPUS = "synthetic_hippocampus"


@dataclass(frozen=True)
class PublicSource:
    name: str
    module: str
    function: str  # the sample function in `module`
    # what the images are, with {seed} to fill in and {template} for the MNI template's provenance
    description: str
    needs_mni_template: bool = False

    def load(self) -> tuple[SampleFunction, str]:
        """(sample function, description with {seed} left to fill in); fetches the MNI template if needed."""
        try:
            function = getattr(importlib.import_module(self.module), self.function)
        except (ImportError, AttributeError) as missing:
            raise DpunetError(f"public source {self.name}: {self.module}.{self.function} is not available "
                              f"({missing})") from None
        if not self.needs_mni_template:
            return function, self.description
        from dpunet.pretraining.mni_template import fetch_mni_template

        template = fetch_mni_template()
        # the template's own text holds no braces, but is escaped anyway: only {seed} is filled in later
        provenance = template.source.replace("{", "{{").replace("}", "}}")
        return partial(function, template=template), self.description.replace("{template}", provenance)

    def load_batches(self) -> tuple[BatchFunction, str]:
        """(batch function (rng, batch, shape, channels, num_classes) -> stacked samples, description)."""
        sample, description = self.load()
        return partial(stack_samples, sample), description


def stack_samples(sample: SampleFunction, rng: np.random.Generator, batch: int, shape: Sequence[int],
                  channels: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`batch` independent samples drawn in turn from `rng`, stacked: ((B, channels, *shape), (B, 1, *shape))."""
    pairs = [sample(rng, shape, channels, num_classes) for _ in range(batch)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


PUBLIC_SOURCES: dict[str, PublicSource] = {s.name: s for s in (
    PublicSource(RANDOM_IMAGES, "dpunet.pretraining.random_images", "random_segmentation_sample",
                 "images of random processes (dpunet.pretraining.random_images, seed {seed}): no patient data"),
    PublicSource(SYNTHETIC_BRAIN, "dpunet.pretraining.synthetic_brain", "synthetic_brain_sample",
                 "synthetic brain MR images (dpunet.pretraining.synthetic_brain, seed {seed}) generated from the "
                 "public MNI ICBM152 2009a symmetric template, {template}: no patient data", needs_mni_template=True),
    PublicSource(SYNTHETIC_HIPPOCAMPUS, "dpunet.pretraining.synthetic_hippocampus", "synthetic_hippocampus_sample",
                 "synthetic hippocampus crops (dpunet.pretraining.synthetic_hippocampus, seed {seed}) generated from "
                 "the public MNI ICBM152 2009a symmetric template, {template}, labelled by a published anatomical "
                 "prior (hippocampal axis from Seitzman et al. 2020's ROI centres, head/body split at MNI y = -21 "
                 "after Poppenk et al. 2013): no patient data", needs_mni_template=True),
)}


assert tuple(PUBLIC_SOURCES) == PUBLIC_PRETRAINING_SOURCES, "keep dpunet.planning.dp_plan's list in step"


def is_public_source(init_from: str | None) -> bool:
    """Whether `init_from` names a pretraining dpunet makes itself (rather than none or a checkpoint file)."""
    return init_from in PUBLIC_SOURCES


def public_source(name: str, option: str = "--init-from") -> PublicSource:
    """The named source, or a message that lists the known ones."""
    if name not in PUBLIC_SOURCES:
        raise DpunetError(f"{option} {name!r}: unknown public source (known: {', '.join(PUBLIC_SOURCES)})")
    return PUBLIC_SOURCES[name]
