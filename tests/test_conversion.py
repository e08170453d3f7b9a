"""Synthetic task generator and the CamVid / ISBI 2012 converters: files read back with the right content."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dataset_conversion import generate_synthetic
from dataset_conversion.convert_camvid import convert_camvid
from dataset_conversion.convert_isbi2012 import convert_isbi2012
from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.dataset.io import read_image, read_label
from dpunet.dataset.msd import load_task
from dpunet.utils.errors import DpunetError
from tests.conftest import shared_path


def _read_case(case):
    image, g_img = read_image(case.image)
    seg, g_seg = read_label(case.label)
    assert g_img.matches(g_seg) == [], case.case_id
    return image, seg, g_img


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    return idx.min(0), idx.max(0) + 1


def test_synthetic_3d_task(tmp_path):
    base = np.array([12, 24, 24])
    folder = generate_synthetic_task(tmp_path, task_id=5, name="Syn", num_cases=6, base_shape=tuple(base),
                                     spacing=(3.0, 1.0, 0.8), num_test=2, seed=1)
    assert folder == tmp_path / "Task005_Syn"
    task = load_task(folder)
    assert task.num_channels == 1 and task.labels.keys() == {0, 1, 2} and task.background_label == 0
    assert len(task.training) == 6 and len(task.test) == 2 and all(p.is_file() for p in task.test)
    assert len(task.patients) == 6  # one case per patient by default
    directions, shapes = [], set()
    for case in task.training:
        image, seg, g = _read_case(case)
        assert image.shape == (1,) + g.shape and image.dtype == np.float32
        assert np.all(np.abs(np.array(g.shape) / base - 1) <= 0.15 + 1.0 / base)  # +-15 % (and rounding)
        shapes.add(g.shape)
        assert g.spacing == pytest.approx((3.0, 1.0, 0.8))
        assert np.linalg.norm(g.origin) > 1
        d = np.array(g.direction).reshape(3, 3)
        assert np.allclose(d @ d.T, np.eye(3), atol=1e-5)
        directions.append(d)
        assert set(np.unique(seg)) == {0, 1, 2}
        body = image[0] != 0
        # a frame of exact zeros around the body, and every label inside the body
        lo, hi = _bbox(body)
        assert np.prod(hi - lo) < 0.9 * body.size and body.mean() > 0.2
        assert np.all(body[seg > 0])
        # labels differ learnably from their surroundings: organ brighter than tissue, lesion darker than organ
        tissue, organ, lesion = (image[0][(seg == j) & body].mean() for j in range(3))
        assert organ > 1.25 * tissue and lesion < 0.8 * organ
    assert len(shapes) == 6
    assert sum(not np.allclose(d, np.eye(3)) for d in directions) >= 2
    assert any(abs(abs(d).max(axis=1) - 1).max() > 1e-3 for d in directions)  # a real rotation, not only flips


def test_synthetic_intensity_scale_varies_between_cases(tmp_path):
    task = load_task(generate_synthetic_task(tmp_path, num_cases=6, base_shape=(8, 16, 16), num_test=0))
    tissue_means = []
    for case in task.training:
        image, seg, _ = _read_case(case)
        tissue_means.append(image[0][(seg == 0) & (image[0] != 0)].mean())
    assert max(tissue_means) > 1.5 * min(tissue_means)  # per-case scale: normalisation is needed


def test_synthetic_2d_multichannel_patients(tmp_path):
    folder = generate_synthetic_task(tmp_path, task_id=6, name="Syn2D", num_cases=6, ndim=2, num_channels=3,
                                     num_foreground=3, base_shape=(40, 48), spacing=(0.7, 0.5), num_test=1,
                                     cases_per_patient=2, seed=2)
    d = json.loads((folder / "dataset.json").read_text())
    assert d["tensorImageSize"] == "4D" and d["numTraining"] == 6 and d["numTest"] == 1
    assert [e["patient_id"] for e in d["training"]] == ["patient_000"] * 2 + ["patient_001"] * 2 + ["patient_002"] * 2
    task = load_task(folder)
    assert task.num_channels == 3 and task.foreground_labels == [1, 2, 3]
    assert list(task.patients.values()) == [["syn2d_000", "syn2d_001"], ["syn2d_002", "syn2d_003"],
                                            ["syn2d_004", "syn2d_005"]]
    assert sitk.ReadImage(str(task.training[0].image)).GetDimension() == 4  # channels in one 4D file
    orders = set()
    for case in task.training:
        image, seg, g = _read_case(case)
        assert image.shape[:2] == (3, 1) and seg.shape[0] == 1
        assert g.spacing == pytest.approx((1.0, 0.7, 0.5))
        d3 = np.array(g.direction).reshape(3, 3)
        assert np.allclose(d3[2], [0, 0, 1]) and np.allclose(d3[:, 2], [0, 0, 1])  # rotations stay in-plane
        assert set(np.unique(seg)) == {0, 1, 2, 3}
        for c in range(3):
            orders.add(tuple(np.argsort([image[c][seg == j].mean() for j in range(1, 4)])))
    assert len(orders) >= 2  # channels carry different contrasts
    (test_image,) = task.test
    assert read_image(test_image)[0].shape[:2] == (3, 1)


def test_synthetic_2d_accepts_zyx_arguments(tmp_path):
    task = load_task(generate_synthetic_task(tmp_path, ndim=2, num_cases=2, num_test=0, base_shape=(5, 32, 32),
                                             spacing=(4.0, 0.5, 0.5)))
    _, seg, g = _read_case(task.training[0])
    assert g.shape[0] == 1 and g.spacing == pytest.approx((1.0, 0.5, 0.5))


def test_synthetic_is_deterministic(tmp_path):
    kwargs = dict(num_cases=3, base_shape=(8, 16, 16), num_test=1, num_channels=2)
    a = load_task(generate_synthetic_task(tmp_path / "a", seed=4, **kwargs))
    b = load_task(generate_synthetic_task(tmp_path / "b", seed=4, **kwargs))
    c = load_task(generate_synthetic_task(tmp_path / "c", seed=5, **kwargs))
    fewer = load_task(generate_synthetic_task(tmp_path / "d", seed=4, **dict(kwargs, num_cases=2)))
    for ca, cb, cf in zip(a.training, b.training, fewer.training):
        ia, sa, ga = _read_case(ca)
        ib, sb, gb = _read_case(cb)
        if_, sf, gf = _read_case(cf)
        assert np.array_equal(ia, ib) and np.array_equal(sa, sb) and ga == gb
        assert np.array_equal(ia, if_) and ga == gf  # a case does not depend on how many there are
    ic, _, gc = _read_case(c.training[0])
    ia, _, ga = _read_case(a.training[0])
    assert gc != ga or not np.array_equal(ic, ia)


def test_synthetic_default_task_is_fast(tmp_path):
    start = time.perf_counter()
    folder = generate_synthetic_task(tmp_path)
    elapsed = time.perf_counter() - start
    assert folder.name == "Task990_Synthetic3D"
    assert len(list((folder / "imagesTr").glob("*.nii.gz"))) == 24
    assert elapsed < 10, f"24-case default task took {elapsed:.1f} s"


@pytest.mark.parametrize(
    "kwargs", [dict(ndim=4), dict(base_shape=(16, 16)), dict(base_shape=(2, 16, 16)), dict(num_cases=0),
               dict(spacing=(0.0, 1.0, 1.0))]
)
def test_synthetic_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(DpunetError):
        generate_synthetic_task(tmp_path, **kwargs)


def test_generate_synthetic_cli_writes_to_raw_root(dpunet_env):
    with pytest.raises(SystemExit) as e:
        generate_synthetic.main(["--task-id", "12", "--name", "CliSyn", "--ndim", "2", "--num-cases", "2",
                                 "--base-shape", "24", "24", "--num-test", "0", "--num-channels", "2"])
    assert e.value.code == 0
    task = load_task(dpunet_env["raw"] / "Task012_CliSyn")
    assert len(task.training) == 2 and task.num_channels == 2
    with pytest.raises(SystemExit) as e:
        generate_synthetic.main(["--ndim", "3", "--base-shape", "8", "8", "-o", str(dpunet_env["raw"])])
    assert e.value.code == 2


# ---------------------------------------------------------------- CamVid


def _png_channels(path: Path) -> np.ndarray:
    return np.moveaxis(np.asarray(Image.open(path).convert("RGB")), -1, 0)


@pytest.mark.shared
def test_convert_camvid_few_files(tmp_path):
    source = shared_path("data", "CamVid")
    folder = convert_camvid(source, tmp_path, limit=2)
    assert folder == tmp_path / "Task101_CamVid"
    d = json.loads((folder / "dataset.json").read_text())
    assert d["ignore_label"] == 11 and d["background_label"] is None
    assert d["labels"]["0"] == "Sky" and d["labels"]["8"] == "Car" and d["labels"]["11"] == "Unlabelled"
    assert len(d["labels"]) == 12
    task = load_task(folder)
    assert task.ignore_label == 11 and task.background_label is None and task.num_classes == 11
    assert task.num_channels == 3 and len(task.training) == 2 and len(task.test) == 2
    seen = set()
    for case in task.training:
        image, seg, g = _read_case(case)
        png = source / "train" / (case.case_id.removeprefix("camvid_") + ".png")
        assert image.shape == (3, 1, 360, 480) and g.spacing == (1.0, 1.0, 1.0)
        assert np.array_equal(image[:, 0], _png_channels(png))
        assert np.array_equal(seg[0], np.asarray(Image.open(source / "trainannot" / png.name)))
        seen |= set(np.unique(seg).tolist())
    assert 11 in seen  # void pixels are kept, not remapped
    for test_image in task.test:
        label = folder / "labelsTs" / test_image.name
        seg, g_seg = read_label(label)
        assert read_image(test_image)[1].matches(g_seg) == []
        png = source / "valannot" / (test_image.name.removeprefix("camvid_").removesuffix(".nii.gz") + ".png")
        assert np.array_equal(seg[0], np.asarray(Image.open(png)))

    # resumable: existing files are kept as they are, missing ones are added
    first = folder / "imagesTr" / f"{task.training[0].case_id}.nii.gz"
    stamp = first.stat().st_mtime_ns
    convert_camvid(source, tmp_path, limit=3)
    assert first.stat().st_mtime_ns == stamp
    assert len(load_task(folder).training) == 3 and len(list((folder / "labelsTs").iterdir())) == 3


def _fake_camvid(root: Path, label_value: int) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(root / split / "a.png")
        Image.fromarray(np.full((6, 8), label_value, np.uint8)).save(root / f"{split}annot" / "a.png")
    return root


def test_convert_camvid_synthetic_source_and_bad_labels(tmp_path):
    folder = convert_camvid(_fake_camvid(tmp_path / "ok", 11), tmp_path / "raw", task_id=7)
    task = load_task(folder)
    assert task.labels[11] == "Unlabelled"  # SegNet's names when the source has no SOURCE.txt
    assert np.all(_read_case(task.training[0])[1] == 11)
    with pytest.raises(DpunetError, match=r"trainannot/a\.png: label values \[12\]"):
        convert_camvid(_fake_camvid(tmp_path / "bad", 12), tmp_path / "raw2")
    with pytest.raises(DpunetError, match="not found"):
        convert_camvid(tmp_path / "missing", tmp_path / "raw3")


# ---------------------------------------------------------------- ISBI 2012


@pytest.mark.shared
def test_convert_isbi2012_few_files(tmp_path):
    source = shared_path("data", "ISBI2012_membrane")
    folder = convert_isbi2012(source, tmp_path, limit=3)
    task = load_task(folder)
    assert folder.name == "Task102_ISBI2012"
    assert task.labels == {0: "background", 1: "membrane"} and task.background_label == 0
    assert task.ignore_label is None and task.num_channels == 1
    # numeric order: 0, 1, 2 (not 0, 1, 10)
    assert [c.case_id for c in task.training] == ["isbi2012_000", "isbi2012_001", "isbi2012_002"]
    for i, case in enumerate(task.training):
        image, seg, _ = _read_case(case)
        png_label = np.asarray(Image.open(source / "train" / "label" / f"{i}.png"))
        assert image.shape == (1, 1, 512, 512)
        assert np.array_equal(image[0, 0], np.asarray(Image.open(source / "train" / "image" / f"{i}.png")))
        assert np.array_equal(seg[0] == 1, png_label == 0) and np.array_equal(seg[0] == 0, png_label == 255)
        assert 0.05 < seg.mean() < 0.5  # membranes are the minority
    assert [p.name for p in task.test] == [f"isbi2012_test_{i:03d}.nii.gz" for i in range(3)]
    assert not (folder / "labelsTs").exists()
