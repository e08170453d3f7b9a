"""Synthetic brain MR pretraining data from the MNI152 template (`--init-from synthetic_brain`).

A tiny fake template written here stands in for the real one (its hashes are patched in): no network in the
default run. One slow test fetches the real template with pip and skips when that is not possible.
"""
from __future__ import annotations

import json
import subprocess
from functools import partial

import nibabel as nib
import numpy as np
import pytest
import torch

from dpunet.evaluation.cross_validation import run_folder_name
from dpunet.learning.checkpoint import load_checkpoint
from dpunet.pretraining import mni_template
from dpunet.pretraining.cli import main as pretrain_main
from dpunet.pretraining.sources import stack_samples
from dpunet.pretraining.synthetic_brain import synthetic_brain_sample
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import file_sha256
from tests.test_training import env, make_trainer, roots  # noqa: F401  (shared synthetic task)

pytestmark = pytest.mark.usefixtures("single_thread")
FAKE_SHAPE = (22, 26, 20)


def _write_fake_template(folder, seed: int = 0) -> dict[str, np.ndarray]:
    """Three uint8 volumes like the real files: a 'brain' ellipsoid of WM inside a GM shell with a wobbly border,
    a T1 that is brighter in WM. Each map reaches 255, so the loader's scaling is /255 for all three."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in FAKE_SHAPE], indexing="ij")
    radius = np.sqrt(sum(g ** 2 for g in grids)) + 0.15 * rng.standard_normal(FAKE_SHAPE)
    wm = np.clip((0.55 - radius) * 8, 0, 1)
    gm = np.clip(1 - np.abs(radius - 0.7) * 6, 0, 1) * (1 - wm)
    t1 = 0.2 + 0.4 * gm + 0.8 * wm
    return write_template_files(folder, {"t1": t1, "gm": gm, "wm": wm}, np.eye(4))


def write_template_files(folder, arrays: dict[str, np.ndarray], affine: np.ndarray) -> dict[str, np.ndarray]:
    """The three maps as uint8 files like the real ones (each scaled to reach 255); returns the stored integers."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for role, (name, _) in mni_template.FILES.items():
        data = np.round(arrays[role] / arrays[role].max() * 255).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, affine), folder / name)
        out[role] = data
    return out


@pytest.fixture
def fake_template(tmp_path, monkeypatch):
    """The fake files in DPUNET_MNI_DIR, with their hashes standing in for the real ones."""
    folder = tmp_path / "mni"
    arrays = _write_fake_template(folder)
    monkeypatch.setattr(mni_template, "FILES", {role: (name, file_sha256(folder / name))
                                                for role, (name, _) in mni_template.FILES.items()})
    monkeypatch.setenv("DPUNET_MNI_DIR", str(folder))
    return folder, arrays


@pytest.mark.parametrize("shape", [(12, 10), (8, 10, 6)])
def test_samples_keep_the_random_images_contract(fake_template, shape):
    template = mni_template.fetch_mni_template()
    image, labels = synthetic_brain_sample(np.random.default_rng(3), shape, 2, 3, template)
    assert image.shape == (2, *shape) and image.dtype == np.float32
    assert labels.shape == (1, *shape) and labels.dtype == np.int16 and set(np.unique(labels)) <= {0, 1, 2}
    axes = tuple(range(1, image.ndim))
    assert np.allclose(image.mean(axis=axes), 0, atol=1e-4) and np.allclose(image.std(axis=axes), 1, atol=1e-3)
    again = synthetic_brain_sample(np.random.default_rng(3), shape, 2, 3, template)
    assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1])
    other = synthetic_brain_sample(np.random.default_rng(4), shape, 2, 3, template)
    assert not np.array_equal(image, other[0])
    data, seg = stack_samples(partial(synthetic_brain_sample, template=template), np.random.default_rng(0), 3, shape, 2, 3)
    assert data.shape == (3, 2, *shape) and seg.shape == (3, 1, *shape)


def test_classes_fold_to_the_task(fake_template):
    """One foreground class: grey matter; no foreground class: all background (the same draws otherwise)."""
    template = mni_template.fetch_mni_template()
    for seed in range(5):
        _, three = synthetic_brain_sample(np.random.default_rng(seed), (10, 12, 8), 1, 3, template)
        _, two = synthetic_brain_sample(np.random.default_rng(seed), (10, 12, 8), 1, 2, template)
        _, one = synthetic_brain_sample(np.random.default_rng(seed), (10, 12, 8), 1, 1, template)
        assert np.array_equal(two, (three == 1).astype(np.int16)) and not one.any()


def _tissue(arrays: dict[str, np.ndarray], pad: int) -> np.ndarray:
    """Oracle: the most probable tissue per template voxel, from the files' integers, background outside."""
    gm, wm = arrays["gm"].astype(np.int32), arrays["wm"].astype(np.int32)
    tissue = np.argmax(np.stack([255 - gm - wm, gm, wm]), axis=0)
    return np.pad(tissue, pad)  # 0: background


def _found_in(volume: np.ndarray, patch: np.ndarray, window: tuple[int, ...]) -> bool:
    views = np.lib.stride_tricks.sliding_window_view(volume, window)
    return bool((views == patch.reshape(window)).all(axis=(-3, -2, -1)).any())


def test_without_deformation_labels_are_the_maps_argmax_on_a_crop(fake_template):
    _, arrays = fake_template
    template = mni_template.fetch_mni_template()
    tissue = _tissue(arrays, pad=12)
    rng = np.random.default_rng(0)
    for _ in range(4):
        _, labels = synthetic_brain_sample(rng, (9, 11, 7), 1, 3, template, deform=False)
        assert len(np.unique(labels)) >= 2 and _found_in(tissue, labels[0], (9, 11, 7))
        _, labels = synthetic_brain_sample(rng, (9, 11), 1, 3, template, deform=False)
        windows = [(9, 11, 1), (9, 1, 11), (1, 9, 11)]  # the patch's axes are two template axes in their order
        assert any(_found_in(tissue, labels[0], w) for w in windows)


def test_deformed_labels_are_not_a_plain_crop(fake_template):
    """The check above can fail: warped samples (rotation, scale, flips, elastic) are mostly not crops."""
    _, arrays = fake_template
    template = mni_template.fetch_mni_template()
    tissue = _tissue(arrays, pad=12)
    rng = np.random.default_rng(1)
    found = [_found_in(tissue, synthetic_brain_sample(rng, (9, 11, 7), 1, 3, template)[1][0], (9, 11, 7))
             for _ in range(6)]
    assert sum(found) <= 2


def test_tampered_or_foreign_files_are_refused(tmp_path, fake_template):
    folder, _ = fake_template
    name = mni_template.FILES["gm"][0]
    data = bytearray((folder / name).read_bytes())
    data[-5] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(DpunetError, match=f"{name} has SHA-256 .*expected"):
        mni_template.fetch_mni_template()
    (folder / name).unlink()
    with pytest.raises(DpunetError, match=f"{name} is missing"):
        mni_template.fetch_mni_template()


def test_fake_files_do_not_pass_for_the_real_template(tmp_path, monkeypatch):
    _write_fake_template(tmp_path / "mine")
    monkeypatch.setenv("DPUNET_MNI_DIR", str(tmp_path / "mine"))
    with pytest.raises(DpunetError, match="SHA-256 .*expected 421a10e8"):  # the real T1's hash
        mni_template.fetch_mni_template()


def test_a_failed_download_names_the_command_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.delenv("DPUNET_MNI_DIR", raising=False)
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(mni_template.subprocess, "run", failing_pip)
    with pytest.raises(DpunetError,
                       match=r"pip download nilearn==0\.14\.1 --no-deps.*failed.*DPUNET_MNI_DIR.*--init-from random_images"):
        mni_template.fetch_mni_template(tmp_path / "cache")
    assert len(calls) == 1


def test_a_filled_cache_is_used_without_downloading(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _write_fake_template(cache)
    monkeypatch.setattr(mni_template, "FILES", {role: (name, file_sha256(cache / name))
                                                for role, (name, _) in mni_template.FILES.items()})
    monkeypatch.setattr(mni_template.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    template = mni_template.fetch_mni_template(cache)
    assert template.t1.shape == FAKE_SHAPE and template.t1.dtype == np.float32 and template.gm.max() == 1.0
    assert all(sha in template.source for _, sha in mni_template.FILES.values())
    assert "McConnell" in template.source and mni_template.WHEEL in template.source


def test_default_cache_folder_follows_dpunet_public_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DPUNET_PUBLIC_DATA", str(tmp_path))
    assert mni_template.default_cache_dir() == tmp_path / "mni152_2009a_sym"


@pytest.mark.slow
def test_the_real_template_is_fetched_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("DPUNET_MNI_DIR", raising=False)
    try:
        template = mni_template.fetch_mni_template(tmp_path / "cache")
    except DpunetError as e:
        if "pip download" in str(e):
            pytest.skip(f"the nilearn wheel cannot be downloaded here: {e}")
        raise
    assert template.t1.shape == (197, 233, 189)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(n for n, _ in mni_template.FILES.values())
    image, labels = synthetic_brain_sample(np.random.default_rng(0), (40, 56, 40), 1, 3, template)
    # a crop around a brain voxel of the real template holds grey and white matter
    assert image.shape == (1, 40, 56, 40) and {1, 2} <= set(np.unique(labels))


def test_pretraining_and_fine_tuning_from_synthetic_brains(env, fake_template, tmp_path):
    with pytest.raises(SystemExit) as done:
        pretrain_main(["990", "-c", "2d", "--init-from", "synthetic_brain", "--steps", "2", "--batch-size", "2"])
    assert done.value.code == 0
    trainer = make_trainer(tmp_path, configuration="2d", init_from="synthetic_brain", pretraining_steps=2, steps=1)
    cached = trainer.initial_weights["path"]
    assert cached.endswith("__synthetic_brain__steps2__seed0.pt")
    state = load_checkpoint(cached)
    assert state["config"]["source"] == "synthetic_brain" and state["pretraining_summary"]["steps"] == 2
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in state["weights"].items())
    trainer.run()
    report = json.loads((trainer.output_dir / "release" / "privacy_report.json").read_text())
    (entry,) = report["public_data_and_priors"]
    assert "MNI ICBM152 2009a" in entry and "no patient data" in entry
    assert all(sha in entry for _, sha in mni_template.FILES.values())
    assert "init-synthetic_brain" in run_folder_name("unet", "2d", 8, init_from="synthetic_brain")
