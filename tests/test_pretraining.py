"""Public pretraining on random-process images and DP fine-tuning from it (`--init-from`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpunet.pretraining.cli import main as pretrain_main
from dpunet.pretraining.random_images import random_segmentation_sample
from dpunet.pretraining.sources import stack_samples
from dpunet.learning.checkpoint import load_checkpoint, save_checkpoint
from dpunet.training.initialisation import weights_sha256
from dpunet.utils.errors import DpunetError
from tests.test_training import env, make_trainer, roots  # noqa: F401  (shared synthetic task)


@pytest.mark.parametrize("shape", [(24, 20), (12, 16, 20)])
def test_random_images_are_labelled_standardised_and_reproducible(shape):
    image, labels = random_segmentation_sample(np.random.default_rng(3), shape, channels=2, num_classes=4)
    assert image.shape == (2, *shape) and image.dtype == np.float32
    assert labels.shape == (1, *shape) and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert np.allclose(image.mean(axis=tuple(range(1, image.ndim))), 0, atol=1e-4)
    assert np.allclose(image.std(axis=tuple(range(1, image.ndim))), 1, atol=1e-3)
    again = random_segmentation_sample(np.random.default_rng(3), shape, channels=2, num_classes=4)
    assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1])


def test_random_image_objects_stand_out_by_class():
    """The task is learnable: an object's contrast to the scene grows with its class."""
    data, seg = stack_samples(random_segmentation_sample, np.random.default_rng(0), 200, (40, 40), 1, 3)
    contrast = {1: [], 2: []}
    for x, y in zip(data[:, 0], seg[:, 0]):
        background = x[y == 0]
        for cls in (1, 2):
            if (y == cls).sum() > 20 and background.size > 20:
                contrast[cls].append(abs(x[y == cls].mean() - background.mean()))
    assert len(contrast[1]) > 30 and len(contrast[2]) > 30
    assert np.median(contrast[2]) > 1.3 * np.median(contrast[1]) > 0.3


def _pretrain(tmp_path, *extra: str) -> str:
    out = tmp_path / "pretrained.pt"
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["990", "-c", "2d", "--steps", "3", "--batch-size", "4", "-o", str(out),
                       *extra])
    assert exit_info.value.code == 0
    return str(out)


def test_pretrained_checkpoint_records_its_public_source(env, tmp_path):
    state = load_checkpoint(_pretrain(tmp_path))
    assert "random processes" in state["public_source"] and "no patient data" in state["public_source"]
    assert state["pretraining_summary"]["steps"] == 3
    assert state["architecture"]["kwargs"]["features_per_stage"]


def test_fine_tuning_starts_from_the_public_weights_and_reports_them(env, tmp_path):
    path = _pretrain(tmp_path)
    pretrained = load_checkpoint(path)["weights"]
    trainer = make_trainer(tmp_path, configuration="2d", init_from=path, steps=2)
    start = trainer.model.state_dict()
    assert all(torch.equal(start[k], pretrained[k]) for k in pretrained)
    assert all(torch.equal(trainer.ema.shadow[k], pretrained[k].float()) for k in pretrained)
    trainer.run()
    report = json.loads((trainer.output_dir / "release" / "privacy_report.json").read_text())
    (entry,) = report["public_data_and_priors"]
    assert weights_sha256(pretrained) in entry and "random processes" in entry
    run_config = json.loads((trainer.output_dir / "private" / "run_config.json").read_text())
    assert run_config["initial_weights"]["tensors_kept_at_initialisation"] == []


def test_heads_for_another_class_count_keep_their_initialisation(env, tmp_path):
    path = _pretrain(tmp_path)
    state = load_checkpoint(path)
    heads = [k for k in state["weights"] if k.startswith("decoder.heads.")]
    for k in heads:  # as if pretrained for one more class
        w = state["weights"][k]
        state["weights"][k] = torch.cat([w, w[:1]])
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, tmp_path / "other_classes.pt")
    trainer = make_trainer(tmp_path, configuration="2d", init_from=str(tmp_path / "other_classes.pt"))
    assert trainer.initial_weights["tensors_kept_at_initialisation"] == sorted(heads)
    body = [k for k in state["weights"] if k not in heads]
    assert all(torch.equal(trainer.model.state_dict()[k], state["weights"][k]) for k in body)


def test_init_from_a_different_network_is_a_clear_error(env, tmp_path):
    path = _pretrain(tmp_path)
    with pytest.raises(DpunetError, match="differs from the planned one.*--width"):
        make_trainer(tmp_path, configuration="2d", init_from=path, width=0.5)


def test_init_from_a_run_on_the_same_private_task_is_refused(env, tmp_path):
    first = make_trainer(tmp_path / "a", configuration="2d", steps=1)
    first.run()
    with pytest.raises(DpunetError, match="trained on .* itself.*private"):
        make_trainer(tmp_path / "b", configuration="2d", init_from=str(first.output_dir / "release" / "model_release.pt"))
    with pytest.raises(DpunetError, match="trained on .* itself.*private"):
        make_trainer(tmp_path / "c", configuration="2d",
                     init_from=str(first.output_dir / "private" / "checkpoint_latest.pt"))


def test_init_from_a_missing_or_foreign_file_names_it(env, tmp_path):
    with pytest.raises(DpunetError, match="nothing.pt: checkpoint not found"):
        make_trainer(tmp_path, configuration="2d", init_from=str(tmp_path / "nothing.pt"))
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(DpunetError, match="foreign.pt: not a dpunet checkpoint"):
        make_trainer(tmp_path, configuration="2d", init_from=str(tmp_path / "foreign.pt"))


def test_plan_default_pretrains_once_per_task_and_reuses_the_checkpoint(env, tmp_path):
    from dpunet.training.trainer import load_training_inputs

    plan_training = load_training_inputs("990", "2d")[2]["training"]
    assert plan_training["init_from"] == "random_images" and plan_training["pretraining_steps"] > 0
    first = make_trainer(tmp_path / "a", configuration="2d", init_from="random_images", pretraining_steps=2)
    cached = first.initial_weights["path"]
    assert "random_images__steps2__seed0" in cached and first.initial_weights["tensors_kept_at_initialisation"] == []
    stamp = (tmp_path / cached).stat().st_mtime_ns
    second = make_trainer(tmp_path / "b", configuration="2d", init_from="random_images", pretraining_steps=2,
                          fold="1")
    assert second.initial_weights["path"] == cached and (tmp_path / cached).stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values()))
    assert "random processes" in first.public_data()[0]


def test_heads_of_a_network_without_deep_supervision_are_not_mixed_up(env, tmp_path):
    path = _pretrain(tmp_path)
    trainer = make_trainer(tmp_path, configuration="2d", init_from=path, deep_supervision=False)
    kept = trainer.initial_weights["tensors_kept_at_initialisation"]
    assert kept and all(k.startswith("decoder.heads.") for k in kept)


def test_large_patches_are_drawn_small_and_resized_exactly():
    image, labels = random_segmentation_sample(np.random.default_rng(0), (20, 130, 70), channels=1, num_classes=3)
    assert image.shape == (1, 20, 130, 70) and labels.shape == (1, 20, 130, 70)
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-3
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).any()
