"""Synthetic hippocampus crops labelled by a published anatomical prior (`--init-from synthetic_hippocampus`).

A fake template on a 2 mm grid covering the right medial temporal lobe in MNI millimetres (its affine places
it there) stands in for the real one; the prior is checked point by point against the published numbers.
"""
from __future__ import annotations

import numpy as np
import pytest

from dpunet.pretraining import mni_template
from dpunet.pretraining import synthetic_hippocampus as hippocampus
from dpunet.pretraining.sources import public_source
from dpunet.utils.files import file_sha256
from tests.test_synthetic_brain import write_template_files

pytestmark = pytest.mark.usefixtures("single_thread")
SPACING_MM = 2.0
ORIGIN_MM = np.array([6.0, -56.0, -40.0])
SHAPE = (20, 32, 26)  # x 6..44, y -56..6, z -40..10 mm
# grey matter medial of x = 28 mm, white matter lateral of it (through the hippocampal neighbourhood)
GREY_UNTIL_X_MM = 28.0


@pytest.fixture
def template(tmp_path, monkeypatch) -> mni_template.MniTemplate:
    affine = np.diag([SPACING_MM] * 3 + [1.0])
    affine[:3, 3] = ORIGIN_MM
    x_mm = ORIGIN_MM[0] + SPACING_MM * np.arange(SHAPE[0])
    grey = np.broadcast_to((x_mm < GREY_UNTIL_X_MM)[:, None, None], SHAPE).astype(float)
    folder = tmp_path / "mni"
    write_template_files(folder, {"t1": 0.3 + 0.5 * (1 - grey), "gm": grey, "wm": 1 - grey}, affine)
    monkeypatch.setattr(mni_template, "FILES", {role: (name, file_sha256(folder / name))
                                                for role, (name, _) in mni_template.FILES.items()})
    monkeypatch.setenv("DPUNET_MNI_DIR", str(folder))
    return mni_template.fetch_mni_template()


def _expected_label(point_mm: np.ndarray) -> int | None:
    """Oracle, one point at a time from the published numbers (right hemisphere); None within 0.05 mm of a
    boundary, where the oracle's finely sampled axis and the exact projection may disagree."""
    start, end = np.array([25.57, -11.78, -21.54]), np.array([25.24, -38.78, -2.01])
    extension = 4.0 / np.linalg.norm(end - start)
    axis = min(np.linalg.norm(point_mm - (start + t * (end - start)))
               for t in np.linspace(-extension, 1 + extension, 4001))
    amygdala = np.linalg.norm(point_mm - np.array([20.30, -2.27, -22.21]))
    if abs(axis - 6.0) < 0.05 or abs(axis - amygdala) < 0.05:
        return None
    if point_mm[0] >= GREY_UNTIL_X_MM or axis >= 6.0 or axis >= amygdala:
        return 0
    return 1 if point_mm[1] > -21.0 else 2


def _voxel(point_mm) -> tuple[int, ...]:
    return tuple(int(i) for i in np.round((np.array(point_mm, dtype=float) - ORIGIN_MM) / SPACING_MM))


def test_prior_matches_the_published_axis_split_and_exclusions(template):
    prior = hippocampus.hippocampus_prior(template)
    assert prior.shape == SHAPE and prior.dtype == np.int16
    rng = np.random.default_rng(0)
    checked = {0: 0, 1: 0, 2: 0}
    labelled = [tuple(int(i) for i in v) for v in np.argwhere(prior > 0)]
    for voxel in labelled + [tuple(int(rng.integers(n)) for n in SHAPE) for _ in range(300)]:
        expected = _expected_label(ORIGIN_MM + SPACING_MM * np.array(voxel))
        if expected is not None:
            assert prior[voxel] == expected, voxel
            checked[expected] += 1
    assert min(checked.values()) >= 10, checked
    assert prior[_voxel([26, -12, -22])] == 1 and prior[_voxel([26, -38, -2])] == 2
    assert prior[_voxel([20, -2, -22])] == 0  # the amygdala ROI's centre
    assert prior[_voxel([30, -26, -12])] == 0 and prior[_voxel([24, -26, -12])] == 2  # white vs grey matter


@pytest.mark.parametrize("shape", [(14, 10), (10, 12, 8)])
def test_samples_are_labelled_crops_near_the_hippocampus(template, shape):
    foreground = 0
    for seed in range(8):
        image, labels = hippocampus.synthetic_hippocampus_sample(np.random.default_rng(seed), shape, 2, 3, template)
        assert image.shape == (2, *shape) and image.dtype == np.float32 and np.isfinite(image).all()
        assert labels.shape == (1, *shape) and labels.dtype == np.int16 and set(np.unique(labels)) <= {0, 1, 2}
        _, two = hippocampus.synthetic_hippocampus_sample(np.random.default_rng(seed), shape, 2, 2, template)
        assert np.array_equal(two, (labels > 0).astype(np.int16))  # one foreground class: the whole structure
        again = hippocampus.synthetic_hippocampus_sample(np.random.default_rng(seed), shape, 2, 3, template)
        assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1])
        foreground += bool(labels.any())
    assert foreground >= 5  # most crops are centred on the structure


def test_registered_as_a_public_source_that_names_its_prior(template):
    sample, description = public_source("synthetic_hippocampus").load()
    image, labels = sample(np.random.default_rng(0), (10, 12, 8), 1, 3)
    assert image.shape == (1, 10, 12, 8) and labels.shape == (1, 10, 12, 8)
    assert "Seitzman" in description and "Poppenk" in description and "{seed}" in description
    assert template.source.split(":")[0] in description
