"""Per-patient patch sampling and the background loader, on tiny preprocessed folders written in the real format
(<case>.npz with data/seg + <case>.json with class_locations)."""
from __future__ import annotations

import copy
import gc
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpunet.planning.augmentation import default_augmentation_params, source_patch_size
from dpunet.training.dataloading import (
    PatientPatchSampler,
    PreprocessedCaseStore,
    iterate_micro_batches,
    stable_patient_key,
)
from dpunet.training.loader_workers import BackgroundPatientLoader, measure_loader_throughput
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import save_npz, write_json

STRIDES_3D = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def write_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray, patient_id: str,
               labels=(1, 2)) -> None:
    """One preprocessed case: data (C, Z, Y, X) float32, seg (Z, Y, X)."""
    locations = {str(lab): np.argwhere(seg == lab).tolist() for lab in labels}
    save_npz(folder / f"{case_id}.npz", data=data.astype(np.float32), seg=seg[None].astype(np.int16))
    write_json({"case_id": case_id, "patient_id": patient_id, "spacing": [1.0, 1.0, 1.0],
                "shape_after_crop": list(seg.shape), "class_locations": locations}, folder / f"{case_id}.json")


@pytest.fixture
def constant_cases(tmp_path):
    """3 patients x 2 cases; every case is filled with its own value (case i -> i + 1) in both channels, with a
    small label-1 blob."""
    patients, value = {}, {}
    for p in range(3):
        for c in range(2):
            cid = f"case_{p}{c}"
            v = float(10 * (p + 1) + c + 1)
            data = np.full((2, 12, 14, 13), v, np.float32)
            seg = np.zeros((12, 14, 13), np.int16)
            seg[5:7, 6:9, 5:8] = 1
            write_case(tmp_path, cid, data, seg, f"pat{p}")
            patients.setdefault(f"pat{p}", []).append(cid)
            value[cid] = v
    store = PreprocessedCaseStore(tmp_path, [c for cs in patients.values() for c in cs])
    return store, patients, value


def no_intensity_aug(patch, dim, order_data=0):
    params = default_augmentation_params(patch, dim)
    for key in ("gaussian_noise", "gaussian_blur", "brightness_multiplicative", "contrast", "low_resolution",
                "gamma_inverted", "gamma"):
        params[key] = None
    params["spatial"].update(p_rotation=1.0, p_scale=1.0, order_data=order_data, order_seg=order_data)
    params["source_patch_size"] = source_patch_size(params)
    return params


def test_shapes_dtypes_and_deep_supervision_levels(constant_cases):
    store, patients, _ = constant_cases
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 3, 0.33, default_augmentation_params([8, 8, 8], 3),
                                  3, None, STRIDES_3D)
    batch = sampler.make_patient_batch(["pat0", "pat2"], step=0, seed=1)
    assert batch.data.shape == (2, 3, 2, 8, 8, 8) and batch.data.dtype == torch.float32
    assert [tuple(t.shape) for t in batch.targets] == [(2, 3, 1, 8, 8, 8), (2, 3, 1, 4, 4, 4), (2, 3, 1, 2, 2, 2)]
    assert all(t.dtype == torch.int64 for t in batch.targets)
    # level l is the full-resolution label map taken every 2**l-th voxel
    assert torch.equal(batch.targets[1], batch.targets[0][..., ::2, ::2, ::2])
    assert torch.equal(batch.targets[2], batch.targets[0][..., ::4, ::4, ::4])

    empty = sampler.make_patient_batch([], step=0, seed=1)
    assert empty.num_patients == 0 and empty.data.shape == (0, 3, 2, 8, 8, 8)
    assert [tuple(t.shape) for t in empty.targets] == [(0, 3, 1, 8, 8, 8), (0, 3, 1, 4, 4, 4), (0, 3, 1, 2, 2, 2)]

    single = PatientPatchSampler(store, patients, [8, 8, 8], 2, 0.33, None, 3)
    assert [tuple(t.shape) for t in single.make_patient_batch(["pat1"], 0, 0).targets] == [(1, 2, 1, 8, 8, 8)]


def test_patches_come_from_the_patients_own_cases(constant_cases):
    store, patients, value = constant_cases
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 10, 0.33, None, 3)
    batch = sampler.make_patient_batch(["pat2", "pat0", "pat1"], step=4, seed=0)
    for i, pid in enumerate(["pat2", "pat0", "pat1"]):
        own = {value[c] for c in patients[pid]}
        seen = set()
        for k in range(10):
            vals = set(torch.unique(batch.data[i, k]).tolist())
            assert len(vals) == 1 and vals <= own  # the case fits the patch: no padding, one case per patch
            seen |= vals
        assert seen == own  # K=10 patches pick among both of the patient's cases


def test_augmentation_never_mixes_patients(constant_cases):
    store, patients, value = constant_cases
    # spatial augmentation always on (order 0 keeps values exact): each patch shows its own case or border zeros
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 4, 0.5, no_intensity_aug([8, 8, 8], 3), 3)
    batch = sampler.make_patient_batch(["pat0", "pat1", "pat2"], step=2, seed=5)
    for i, pid in enumerate(["pat0", "pat1", "pat2"]):
        own = {value[c] for c in patients[pid]}
        for k in range(4):
            vals = set(torch.unique(batch.data[i, k]).tolist()) - {0.0}
            assert len(vals) == 1 and vals <= own

    # with every augmentation: a patient's patches do not depend on who else is in the micro-batch
    full = PatientPatchSampler(store, patients, [8, 8, 8], 3, 0.33, default_augmentation_params([8, 8, 8], 3), 3)
    together = full.make_patient_batch(["pat0", "pat1", "pat2"], step=9, seed=5)
    alone = full.make_patient_batch(["pat1"], step=9, seed=5)
    other_order = full.make_patient_batch(["pat2", "pat1"], step=9, seed=5)
    assert torch.equal(together.data[1], alone.data[0]) and torch.equal(together.data[1], other_order.data[1])
    assert torch.equal(together.targets[0][1], alone.targets[0][0])


def _sparse_store(tmp_path, ignore_label=None):
    patients = {}
    for p in range(4):
        data = np.random.default_rng(p).normal(size=(1, 24, 40, 40)).astype(np.float32)
        seg = np.zeros((24, 40, 40), np.int16)
        seg[3 + p:5 + p, 30:32, 7:9] = 1  # a 2x2x2 blob in a 38400-voxel volume
        labels = (1,)
        if ignore_label is not None:
            seg[12:, :, :] = ignore_label  # a large ignore region: must not count as foreground
            labels = (1, ignore_label)
        write_case(tmp_path, f"s{p}", data, seg, f"p{p}", labels=labels)
        patients[f"p{p}"] = [f"s{p}"]
    return PreprocessedCaseStore(tmp_path, [f"s{p}" for p in range(4)]), patients


def _foreground_fraction(sampler, steps=8):
    hits = []
    for step in range(steps):
        seg = sampler.make_patient_batch(list(sampler.patients), step, seed=3).targets[0]
        hits.append((seg == 1).flatten(2).any(-1).flatten())
    return torch.cat(hits).float().mean().item()


def test_foreground_oversampling_rate(tmp_path):
    store, patients = _sparse_store(tmp_path)
    rates = {}
    for fraction in (0.0, 0.33, 1.0):
        sampler = PatientPatchSampler(store, patients, [8, 8, 8], 8, fraction, None, 3)
        rates[fraction] = _foreground_fraction(sampler)  # 256 patches each
    # uniform placement hits the blob with probability ~ (9*9*9)/(17*33*33) ~ 4 %
    assert rates[0.0] < 0.12
    assert abs(rates[0.33] - (0.33 + 0.67 * rates[0.0])) < 0.1
    assert rates[1.0] == 1.0


def test_ignore_label_is_not_oversampled(tmp_path):
    store, patients = _sparse_store(tmp_path, ignore_label=5)
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 8, 1.0, None, 3, ignore_label=5)
    assert _foreground_fraction(sampler, steps=2) == 1.0
    # oversampling the ignore label instead would mostly miss the real foreground
    naive = PatientPatchSampler(store, patients, [8, 8, 8], 8, 1.0, None, 3, ignore_label=None)
    assert _foreground_fraction(naive, steps=2) < 0.8


def test_deterministic_per_seed_step_and_across_fresh_instances(constant_cases, tmp_path):
    store, patients = _sparse_store(tmp_path / "sparse")
    params = default_augmentation_params([8, 8, 8], 3)
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 2, 0.33, params, 3, None, STRIDES_3D)
    a = sampler.make_patient_batch(["p0", "p3"], step=5, seed=11)
    # a resumed run: a new store and sampler rebuild exactly the same batch
    fresh = PatientPatchSampler(PreprocessedCaseStore(tmp_path / "sparse", store.case_ids), patients, [8, 8, 8], 2,
                                0.33, copy.deepcopy(params), 3, None, STRIDES_3D)
    b = fresh.make_patient_batch(["p0", "p3"], step=5, seed=11)
    assert torch.equal(a.data, b.data) and all(torch.equal(x, y) for x, y in zip(a.targets, b.targets))
    assert not torch.equal(a.data, sampler.make_patient_batch(["p0", "p3"], step=6, seed=11).data)
    assert not torch.equal(a.data, sampler.make_patient_batch(["p0", "p3"], step=5, seed=12).data)
    assert not torch.equal(a.data[0, 0], a.data[0, 1])  # the K patches of a patient differ
    assert stable_patient_key("p0") == stable_patient_key("p0") != stable_patient_key("p1")


def test_2d_patches_are_slices_of_the_volume(tmp_path):
    # slice z of case c holds the value 100*c + z + 1; the foreground sits on slice 3 only
    patients = {}
    for c in range(2):
        data = np.broadcast_to((100 * c + np.arange(1, 7, dtype=np.float32))[:, None, None], (6, 20, 18))[None]
        seg = np.zeros((6, 20, 18), np.int16)
        seg[3, 8:10, 8:10] = 1
        write_case(tmp_path, f"v{c}", data, seg, f"q{c}", labels=(1,))
        patients[f"q{c}"] = [f"v{c}"]
    store = PreprocessedCaseStore(tmp_path, ["v0", "v1"])
    sampler = PatientPatchSampler(store, patients, [12, 10], 16, 0.0, None, 2)
    batch = sampler.make_patient_batch(["q0", "q1"], step=0, seed=0)
    assert batch.data.shape == (2, 16, 1, 12, 10)
    for c in range(2):
        slices = set()
        for k in range(16):
            vals = torch.unique(batch.data[c, k]).tolist()
            assert len(vals) == 1 and 100 * c + 1 <= vals[0] <= 100 * c + 6  # exactly one slice of its own case
            slices.add(vals[0])
        assert len(slices) >= 4  # uniform slice choice
    fg = PatientPatchSampler(store, patients, [12, 10], 6, 1.0, None, 2).make_patient_batch(["q1"], 1, 0)
    assert torch.all(fg.data == 104) and all(bool((fg.targets[0][0, k] == 1).any()) for k in range(6))

    # natural 2D images are stored with Z == 1 and work the same way, with 2D augmentation
    write_case(tmp_path, "img", np.random.default_rng(0).normal(size=(3, 1, 30, 26)),
               np.ones((1, 30, 26), np.int16), "nat", labels=(1,))
    nat = PatientPatchSampler(PreprocessedCaseStore(tmp_path, ["img"]), {"nat": ["img"]}, [16, 16], 2, 0.33,
                              default_augmentation_params([16, 16], 2), 2, None, [[1, 1], [2, 2], [2, 2]])
    out = nat.make_patient_batch(["nat"], step=0, seed=0)
    assert out.data.shape == (1, 2, 3, 16, 16) and [tuple(t.shape) for t in out.targets] == [(1, 2, 1, 16, 16),
                                                                                              (1, 2, 1, 8, 8)]


def test_small_case_is_centred_and_zero_padded(tmp_path):
    data = np.arange(1, 4 * 6 * 5 + 1, dtype=np.float32).reshape(1, 4, 6, 5)
    seg = np.full((4, 6, 5), 2, np.int16)
    write_case(tmp_path, "tiny", data, seg, "t")
    sampler = PatientPatchSampler(PreprocessedCaseStore(tmp_path, ["tiny"]), {"t": ["tiny"]}, [8, 8, 8], 3, 0.5,
                                  None, 3)
    batch = sampler.make_patient_batch(["t"], 0, 0)
    expected = np.zeros((1, 8, 8, 8), np.float32)
    expected[:, 2:6, 1:7, 1:6] = data  # need (4, 2, 3) voxels: floor half before, the rest after
    expected_seg = np.zeros((1, 8, 8, 8), np.int64)
    expected_seg[:, 2:6, 1:7, 1:6] = 2
    for k in range(3):
        assert np.array_equal(batch.data[0, k].numpy(), expected)
        assert np.array_equal(batch.targets[0][0, k].numpy(), expected_seg)
    # with augmentation the padding stays zero and the label stays on the image content
    aug = PatientPatchSampler(PreprocessedCaseStore(tmp_path, ["tiny"]), {"t": ["tiny"]}, [8, 8, 8], 4, 0.5,
                              no_intensity_aug([8, 8, 8], 3), 3)
    out = aug.make_patient_batch(["t"], 0, 0)
    assert torch.equal(out.targets[0] == 2, out.data[:, :, :1] > 0)


def test_micro_batches_never_split_patients():
    ids = [f"p{i}" for i in range(7)]
    chunks = iterate_micro_batches(ids, 3)
    assert chunks == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6"]]
    assert iterate_micro_batches(ids, 10) == [ids]
    assert iterate_micro_batches([], 4) == []
    with pytest.raises(DpunetError):
        iterate_micro_batches(ids, 0)


def test_store_and_sampler_report_bad_input(tmp_path, constant_cases):
    store, patients, _ = constant_cases
    with pytest.raises(DpunetError, match="missing_case"):
        PreprocessedCaseStore(store.folder, ["missing_case"])
    with pytest.raises(DpunetError, match="not in the preprocessed store"):
        PatientPatchSampler(store, {"x": ["nope"]}, [8, 8, 8], 2)
    with pytest.raises(DpunetError, match="augmentation plan"):
        PatientPatchSampler(store, patients, [8, 8, 8], 2, 0.33, default_augmentation_params([8, 8, 6], 3), 3)
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 2)
    with pytest.raises(DpunetError, match="unknown patient"):
        sampler.make_patient_batch(["ghost"], 0, 0)
    save_npz(tmp_path / "bad.npz", data=np.zeros((1, 4, 4, 4), np.float32), seg=np.zeros((1, 4, 4, 5), np.int16))
    write_json({"class_locations": {}}, tmp_path / "bad.json")
    with pytest.raises(DpunetError, match="bad.npz"):
        PreprocessedCaseStore(tmp_path, ["bad"]).load("bad")


# -- background loader --------------------------------------------------------------------------------------

def _schedule(patients, steps):
    ids = sorted(patients)
    return [(s, iterate_micro_batches(ids[s % 2:], 2)) for s in range(steps)]


def _no_children(pids):
    alive = {p.pid for p in mp.active_children()}
    return all(pid not in alive and not Path(f"/proc/{pid}").exists() for pid in pids)


def test_loader_output_is_independent_of_worker_count(constant_cases):
    store, patients, _ = constant_cases
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 2, 0.33, default_augmentation_params([8, 8, 8], 3), 3,
                                  None, STRIDES_3D)
    results = {}
    for workers in (0, 1, 3):
        with BackgroundPatientLoader(sampler, workers, seed=4, prefetch_steps=2) as loader:
            results[workers] = list(loader.iterate(_schedule(patients, 4)))
    for workers in (1, 3):
        for (s0, b0), (s1, b1) in zip(results[0], results[workers]):
            assert s0 == s1 and len(b0) == len(b1)
            for x, y in zip(b0, b1):
                assert torch.equal(x.data, y.data) and all(torch.equal(u, v) for u, v in zip(x.targets, y.targets))
    # and equal to building the batch directly
    direct = sampler.make_patient_batch(_schedule(patients, 4)[3][1][0], 3, 4)
    assert torch.equal(results[3][3][1][0].data, direct.data)
    assert measure_loader_throughput(sampler, ["pat0", "pat1"], steps=2, num_workers=0) > 0


def test_close_and_garbage_collection_leave_no_child_processes(constant_cases):
    store, patients, _ = constant_cases
    sampler = PatientPatchSampler(store, patients, [8, 8, 8], 1)
    loader = BackgroundPatientLoader(sampler, 2, seed=0)
    pids = list(loader.worker_pids)
    assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
    loader.submit(0, [["pat0"], ["pat1"]])
    assert len(loader.get(0)) == 2
    loader.close()
    loader.close()  # idempotent
    assert _no_children(pids)
    with pytest.raises(DpunetError, match="closed"):
        loader.submit(1, [["pat0"]])

    dropped = BackgroundPatientLoader(sampler, 2, seed=0)
    pids = list(dropped.worker_pids)
    del dropped  # no close(): the finalizer must reap the workers
    gc.collect()
    assert _no_children(pids)


class SuicidalSampler(PatientPatchSampler):
    """Its worker process is killed (as by the OOM killer) while building patient `victim`'s patches."""

    victim = "pat1"

    def make_patient_arrays(self, patient_ids, step, seed):
        if self.victim in patient_ids:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().make_patient_arrays(patient_ids, step, seed)


def test_worker_killed_mid_task_raises_dpunet_error_quickly(constant_cases):
    store, patients, _ = constant_cases
    loader = BackgroundPatientLoader(SuicidalSampler(store, patients, [8, 8, 8], 1), 2, seed=0, timeout_s=60)
    pids = list(loader.worker_pids)
    loader.submit(0, [["pat0"], ["pat1"], ["pat2"]])
    start = time.monotonic()
    with pytest.raises(DpunetError, match=r"worker \d \(pid \d+\) was killed by signal SIGKILL"):
        loader.get(0)
    assert time.monotonic() - start < 5  # far below the 60 s batch timeout: death is detected, not waited out
    assert _no_children(pids)  # the error closed the loader


def test_worker_killed_between_steps_fails_the_next_step(constant_cases):
    store, patients, _ = constant_cases
    loader = BackgroundPatientLoader(PatientPatchSampler(store, patients, [8, 8, 8], 1), 2, seed=0, timeout_s=60)
    pids = list(loader.worker_pids)
    loader.submit(0, [["pat0"]])
    assert len(loader.get(0)) == 1
    os.kill(pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while loader.alive_workers == 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    # the surviving worker could build this step alone, but the loader must not limp on silently
    loader.submit(1, [["pat1"], ["pat2"]])
    with pytest.raises(DpunetError, match="worker 1 .*SIGKILL"):
        loader.get(1)
    assert _no_children(pids)


def test_worker_exception_and_timeout_become_dpunet_errors(constant_cases, tmp_path):
    store, patients, _ = constant_cases
    lazy = PreprocessedCaseStore(store.folder, store.case_ids)  # nothing loaded yet: workers read the files
    sampler = PatientPatchSampler(lazy, patients, [8, 8, 8], 1)
    os.remove(store.folder / "case_20.npz")  # both of pat2's cases: whichever the patch picks is missing
    os.remove(store.folder / "case_21.npz")
    with BackgroundPatientLoader(sampler, 1, seed=0) as loader:
        loader.submit(0, [["pat2"]])
        with pytest.raises(DpunetError, match=r"worker failed .*case_2[01]\.npz is missing"):
            loader.get(0)

    class SlowSampler(PatientPatchSampler):
        def make_patient_arrays(self, patient_ids, step, seed):
            time.sleep(30)
            return super().make_patient_arrays(patient_ids, step, seed)

    slow = SlowSampler(store, patients, [8, 8, 8], 1)
    loader = BackgroundPatientLoader(slow, 1, seed=0, timeout_s=0.5, join_timeout_s=0.2)
    pids = list(loader.worker_pids)
    loader.submit(0, [["pat0"]])
    start = time.monotonic()
    with pytest.raises(DpunetError, match="within"):
        loader.get(0)
    assert time.monotonic() - start < 5
    assert _no_children(pids)


def test_real_hippocampus_cases_with_nnunet_patch(hippocampus_dir, tmp_path):
    """Two real MRI volumes (smaller than nnU-Net's 40x56x40 patch along some axes) through the full default
    3D pipeline: padding, foreground oversampling on real labels, augmentation, deep-supervision targets."""
    from dpunet.dataset.io import read_image, read_label

    ids = ["hippocampus_001", "hippocampus_003"]
    for cid in ids:
        image, _ = read_image(hippocampus_dir / "imagesTr" / f"{cid}.nii.gz")
        label, _ = read_label(hippocampus_dir / "labelsTr" / f"{cid}.nii.gz")
        image = (image - image.mean()) / image.std()  # per-image z-score, as preprocessing would
        write_case(tmp_path, cid, image, label, cid)
    store = PreprocessedCaseStore(tmp_path, ids)
    patch = [40, 56, 40]
    sampler = PatientPatchSampler(store, {cid: [cid] for cid in ids}, patch, 2, 1.0,
                                  default_augmentation_params(patch, 3), 3, None, STRIDES_3D)
    batch = sampler.make_patient_batch(ids, step=0, seed=0)
    assert batch.data.shape == (2, 2, 1, 40, 56, 40)
    assert [tuple(t.shape[-3:]) for t in batch.targets] == [(40, 56, 40), (20, 28, 20), (10, 14, 10)]
    assert torch.isfinite(batch.data).all()
    fg = batch.targets[0].flatten(2)
    assert bool(((fg == 1) | (fg == 2)).any(-1).all())  # every oversampled patch shows hippocampus
    assert set(torch.unique(batch.targets[0]).tolist()) <= {0, 1, 2}
