"""A public proxy task for choosing DP hyperparameters: the target's public metadata, images from a public generator.

What is taken from the target (all public by declaration, documentation/privacy_model.md): the number of training
patients N of a fold (splits_final.json and dataset.json), the channel names and label names (dataset.json), and
the planned configuration's spacing and median image shape (the plan, derived from image headers). No image or
label file of the target is opened. The proxy has N training patients and, beyond them, `num_validation` proxy
patients to score each candidate on; every image and label comes from a public generator, seeded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dpunet.dataset.io import Geometry, write_image, write_segmentation
from dpunet.planning.plans import load_training_inputs
from dpunet.planning.public_tuning import fold_num_patients
from dpunet.pretraining.sources import PUBLIC_SOURCES, public_source
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json, write_json

# the proxy lives in roots of its own (dpunet.tuning.tune), so one fixed name never meets a user's task
PROXY_TASK_NAME = "Task999_PublicProxy"
DEFAULT_VALIDATION_PATIENTS = 40


@dataclass(frozen=True)
class ProxyDefinition:
    """Everything the proxy is made from; two proxies with the same definition have the same files."""
    target_task: str
    configuration: str
    fold: str
    generator: str
    num_train: int
    num_validation: int
    channel_names: dict[str, str]
    # generator class i is written as label value label_values[i]
    label_values: list[int]
    label_names: list[str]
    background_label: int | None
    shape: list[int]  # (z, y, x), the plan's median shape at its spacing
    spacing: list[float]  # (z, y, x) mm, the plan's spacing
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def source(self) -> str:
        generator = PUBLIC_SOURCES[self.generator]
        return (f"{self.generator} ({generator.module}.{generator.function}, seed {self.seed}): {self.num_train} "
                f"training and {self.num_validation} validation proxy patients of shape {self.shape} at spacing "
                f"{self.spacing}")


def proxy_definition(task_name: str, configuration: str, generator: str, fold: int | str = 0,
                     num_validation: int = DEFAULT_VALIDATION_PATIENTS, seed: int = 0) -> ProxyDefinition:
    """The proxy for `configuration` of `task_name`: read from the plan, dataset.json and splits_final.json."""
    public_source(generator, "--proxy")  # refuses an unknown name
    if num_validation < 1:
        raise DpunetError(f"--proxy-validation-patients must be at least 1, got {num_validation}")
    _, _, plan_config, _, task = load_training_inputs(task_name, configuration)
    labels = {v: name for v, name in task.labels.items() if v != task.ignore_label}
    shape = [max(1, int(round(float(n)))) for n in plan_config["median_shape"]]
    spacing = [float(s) for s in plan_config["spacing"]]
    if len(shape) != 3 or len(spacing) != 3:
        raise DpunetError(f"the plan of {task_name} {configuration}: median_shape {shape} and spacing {spacing} "
                          f"should have 3 entries (z, y, x)")
    return ProxyDefinition(target_task=task_name, configuration=configuration, fold=str(fold), generator=generator,
                           num_train=fold_num_patients(task_name, fold), num_validation=int(num_validation),
                           channel_names={str(k): v for k, v in sorted(task.channel_names.items())},
                           label_values=sorted(labels), label_names=[labels[v] for v in sorted(labels)],
                           background_label=task.background_label, shape=shape, spacing=spacing, seed=int(seed))


def case_ids(definition: ProxyDefinition) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of the proxy; each case is its own patient."""
    train = [f"proxy_train_{i:04d}" for i in range(definition.num_train)]
    val = [f"proxy_val_{i:04d}" for i in range(definition.num_validation)]
    return train, val


def _sample(sample: Callable[..., tuple[np.ndarray, np.ndarray]], definition: ProxyDefinition, index: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(image (c, z, y, x) float32, labels (z, y, x) in the target's label values) of proxy case `index`."""
    rng = np.random.default_rng([definition.seed, index])
    shape = definition.shape
    flat = shape[0] == 1  # 2D data (one slice): a 2D sample, as the 2D network sees it
    image, labels = sample(rng, shape[1:] if flat else shape, len(definition.channel_names),
                           len(definition.label_values))
    if flat:
        image, labels = image[:, None], labels[:, None]
    values = np.asarray(definition.label_values)
    return image.astype(np.float32), values[np.asarray(labels[0], dtype=np.int64)]


def write_proxy_task(definition: ProxyDefinition, folder: Path) -> bool:
    """Write the proxy's raw task (imagesTr, labelsTr, dataset.json last, every file atomically) into `folder`;
    a folder whose dataset.json records the same definition is reused. Returns True when files were written."""
    dataset_path = folder / "dataset.json"
    if dataset_path.is_file() and load_json(dataset_path).get("public_proxy") == definition.to_dict():
        return False
    sample, _ = public_source(definition.generator, "--proxy").load()
    geometry = Geometry(shape=tuple(definition.shape), spacing=tuple(definition.spacing), origin=(0.0, 0.0, 0.0),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    train, val = case_ids(definition)
    entries = []
    for index, case_id in enumerate(train + val):
        image, labels = _sample(sample, definition, index)
        write_image(image, geometry, folder / "imagesTr" / f"{case_id}.nii.gz")
        write_segmentation(labels, geometry, folder / "labelsTr" / f"{case_id}.nii.gz")
        entries.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    dataset = {
        "name": PROXY_TASK_NAME.split("_", 1)[1],
        "description": f"public proxy of {definition.target_task} ({definition.configuration}): {definition.source}",
        "modality": definition.channel_names,
        "labels": {str(v): n for v, n in zip(definition.label_values, definition.label_names)},
        "background_label": definition.background_label,
        "numTraining": len(entries),
        "training": entries,
        "test": [],
        "public_proxy": definition.to_dict(),
    }
    write_json(dataset, dataset_path)
    return True


def proxy_plans(target_plans: dict[str, Any], definition: ProxyDefinition) -> dict[str, Any]:
    """The target's plan with only `definition.configuration`, unchanged where it shapes the network and the patch
    (architecture, patch, spacing, augmentation, DP block, training recipe). Changed: the dataset name and labels,
    per-image z-scoring for every channel (the generators' images are z-scored, not in the target's units, e.g.
    HU), no DP fingerprint statistics, and a fixed one-fold split."""
    config = dict(target_plans["configurations"][definition.configuration])
    config["normalization_schemes"] = [{"name": "zscore_per_image", "use_nonzero_mask": False}
                                       for _ in definition.channel_names]
    config["notes"] = list(config.get("notes", [])) + [
        f"public proxy of {definition.target_task}: the target's plan configuration, z-scored per image"]
    plans = {k: v for k, v in target_plans.items() if k != "configurations"}
    plans.update({"dataset_name": PROXY_TASK_NAME, "split_scheme": "custom", "fingerprint_privacy": {},
                  "labels": {str(v): n for v, n in zip(definition.label_values, definition.label_names)},
                  "ignore_label": None, "background_label": definition.background_label,
                  "num_classes": len(definition.label_values),
                  "configurations": {definition.configuration: config}})
    return plans
