"""The public pretraining sources `--init-from` (and the plan's training.init_from) can name.

Each name maps to a loader returning the batch function, called as f(rng, batch, patch, channels, num_classes),
and the description the checkpoint's `public_source` (hence the privacy report) carries. Loaders import and
load lazily: naming a source costs nothing until a checkpoint has to be made.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dpunet.planning.dp_plan import PUBLIC_PRETRAINING_SOURCES

BatchFunction = Callable[[np.random.Generator, int, "list[int]", int, int], "tuple[np.ndarray, np.ndarray]"]

RANDOM_IMAGES = "random_images"
SYNTHETIC_BRAIN = "synthetic_brain"


def _random_images() -> tuple[BatchFunction, str]:
    from dpunet.pretraining.random_images import random_segmentation_batch
    return random_segmentation_batch, ("images of random processes (dpunet.pretraining.random_images, seed {seed}): "
                                       "no patient data")


def _synthetic_brain() -> tuple[BatchFunction, str]:
    from functools import partial

    from dpunet.pretraining.mni_template import fetch_mni_template
    from dpunet.pretraining.synthetic_brain import synthetic_brain_batch
    template = fetch_mni_template()
    # the template's own text holds no braces, but is escaped anyway: only {seed} is filled in
    source = template.source.replace("{", "{{").replace("}", "}}")
    return partial(synthetic_brain_batch, template=template), (
        "synthetic brain MR images (dpunet.pretraining.synthetic_brain, seed {seed}) generated from the public "
        f"MNI ICBM152 2009a symmetric template, {source}: no patient data")


PUBLIC_SOURCES: dict[str, Callable[[], tuple[BatchFunction, str]]] = {
    RANDOM_IMAGES: _random_images,
    SYNTHETIC_BRAIN: _synthetic_brain,
}


assert tuple(PUBLIC_SOURCES) == PUBLIC_PRETRAINING_SOURCES, "keep dpunet.planning.dp_plan's list in step"


def is_public_source(init_from: str | None) -> bool:
    """Whether `init_from` names a pretraining dpunet makes itself (rather than none or a checkpoint file)."""
    return init_from in PUBLIC_SOURCES
