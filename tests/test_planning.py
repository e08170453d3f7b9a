"""Fingerprint and planner: nnU-Net's topology rules, the DP block, and the real hippocampus reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import KFold

from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.dataset.msd import load_task
from dpunet.fingerprint.extract import extract_fingerprint
from dpunet.planning.planner import plan_experiment
from dpunet.planning.splits import make_splits
from dpunet.privacy.randomness import PrivateRandomness
from dpunet.planning.topology import fullres_target_spacing, plan_topology
from dpunet.utils.errors import DpunetError
from tests.conftest import shared_path


def run_cli(module: str, *args: str, env_roots: dict[str, Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, path in env_roots.items():
        env[f"DPUNET_{key.upper()}"] = str(path)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)


def test_topology_follows_nnunet_rules():
    topo = plan_topology([1.0, 1.0, 1.0], [36, 50, 35])
    assert topo.patch_size == [40, 56, 40]
    assert topo.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    # anisotropic: the coarse axis is not pooled until the others catch up, and gets 1-wide kernels first
    aniso = plan_topology([4.0, 1.0, 1.0], [20, 160, 160])
    assert aniso.strides[1] == [1, 2, 2] and aniso.kernel_sizes[0] == [1, 3, 3]
    assert all(s % d == 0 for s, d in zip(aniso.patch_size, aniso.divisor))
    # feature maps never pooled below 4 voxels
    for axis, pools in enumerate(aniso.pools_per_axis):
        assert aniso.patch_size[axis] / 2 ** pools >= 4


def test_anisotropic_target_spacing_uses_tenth_percentile():
    spacings = [[5.0, 0.8, 0.8]] * 8 + [[2.5, 0.8, 0.8]] * 2
    shapes = [[20, 300, 300]] * 10
    target = fullres_target_spacing(spacings, shapes)
    assert target[1:] == [0.8, 0.8]
    assert target[0] == pytest.approx(np.percentile([s[0] for s in spacings], 10))


def test_kfold_splits_equal_nnunet_kfold_over_sorted_case_ids():
    ids = [f"case_{i:03d}" for i in range(23)]
    splits = make_splits({c: [c] for c in ids}, scheme="kfold")
    for split, (tr, va) in zip(splits, KFold(5, shuffle=True, random_state=12345).split(sorted(ids))):
        assert split["train"] == sorted(np.array(sorted(ids))[tr].tolist())
        assert split["val"] == sorted(np.array(sorted(ids))[va].tolist())


@pytest.mark.parametrize("scheme", ["patient_hash", "kfold"])
def test_splits_keep_patients_together(scheme):
    patients = {f"p{i}": [f"p{i}_a", f"p{i}_b"] for i in range(10)}
    seen = []
    for split in make_splits(patients, scheme=scheme):
        train_p = {c.split("_")[0] for c in split["train"]}
        val_p = {c.split("_")[0] for c in split["val"]}
        assert not train_p & val_p and train_p | val_p == set(patients)
        seen += sorted(val_p)
    assert sorted(seen) == sorted(patients)  # every patient validated exactly once


def _folds_of(splits: list[dict]) -> dict[str, int]:
    return {c: f for f, split in enumerate(splits) for c in split["val"]}


def test_patient_hash_folds_do_not_move_when_a_patient_is_added_or_removed():
    ids = [f"patient_{i:03d}" for i in range(200)]
    base = _folds_of(make_splits({p: [p] for p in ids}))
    for neighbour in (ids[:-1], ids[1:], ids + ["patient_new"]):
        moved = {p for p, f in _folds_of(make_splits({p: [p] for p in neighbour})).items() if base.get(p, f) != f}
        assert moved == set()
    # KFold over the sorted list, which the report must caveat, moves many: the test can tell the difference
    kfold = _folds_of(make_splits({p: [p] for p in ids}, scheme="kfold"))
    kfold_added = _folds_of(make_splits({p: [p] for p in ids + ["patient_new"]}, scheme="kfold"))
    assert sum(kfold[p] != kfold_added[p] for p in ids) > 20
    # and the hash folds are reasonably balanced (multinomial: 40 expected each)
    sizes = np.bincount(list(base.values()), minlength=5)
    assert sizes.min() >= 25 and sizes.max() <= 55


@pytest.fixture(scope="module")
def synthetic_task(tmp_path_factory) -> Path:
    return generate_synthetic_task(tmp_path_factory.mktemp("raw"), num_cases=20, cases_per_patient=2, seed=3)


def test_fingerprint_separates_public_from_pixel_derived(synthetic_task):
    fp = extract_fingerprint(load_task(synthetic_task))
    assert fp["num_cases"] == 20 and fp["num_patients"] == 10
    assert len(fp["header_metadata"]["spacings"]) == 20
    assert "shapes_after_crop" in fp["derived_from_pixels"]
    assert "shapes_after_crop" not in fp["header_metadata"]
    # synthetic images have an exact-zero border: cropping shrinks them
    crop = np.array(fp["derived_from_pixels"]["shapes_after_crop"])
    assert np.all(crop <= np.array(fp["header_metadata"]["shapes"])) and np.any(crop < np.array(fp["header_metadata"]["shapes"]))
    assert fp["intensity"]["0"]["scheme"] == "zscore_per_image"
    assert fp["privacy"]["epsilon"] == 0.0


def test_ct_statistics_dp_estimate_is_charged(synthetic_task, tmp_path, monkeypatch):
    task = load_task(synthetic_task)
    task.channel_names = {0: "CT"}
    fp = extract_fingerprint(task, ct_statistics="dp", ct_epsilon=0.5, ct_delta=1e-6)
    info = fp["intensity"]["0"]
    assert info["scheme"] == "ct_window" and info["source"] == "DP estimate"
    assert info["epsilon"] == 0.5 and fp["privacy"]["epsilon"] == 0.5
    assert info["noise_multiplier"] > 0
    # the noise is secret: a second extraction draws other noise, and a seeded generator (tests only) repeats it.
    # Compared on the noisy count, which is never clipped (the released mean and std may sit at their bounds).
    from dpunet.fingerprint import extract as extract_module

    counts = []
    release = extract_module.dp_bounded_means
    monkeypatch.setattr(extract_module, "dp_bounded_means",
                        lambda *a, **k: counts.append(release(*a, **k)) or counts[-1])
    for randomness in (None, None, PrivateRandomness.insecure_from_seed(1), PrivateRandomness.insecure_from_seed(1)):
        extract_fingerprint(task, ct_statistics="dp", ct_epsilon=0.5, ct_delta=1e-6, randomness=randomness)
    noisy = [c.num_patients_noisy for c in counts]
    assert noisy[0] != noisy[1] and noisy[2] == noisy[3]
    fp_prior = extract_fingerprint(task, ct_statistics="prior")
    assert fp_prior["privacy"]["epsilon"] == 0.0 and fp_prior["intensity"]["0"]["source"].startswith("public")


def test_plan_dp_block_and_overrides(synthetic_task):
    task = load_task(synthetic_task)
    fp = extract_fingerprint(task)
    plans, splits = plan_experiment(task, fp, ["3d_fullres"], epsilon=4.0, patients_per_step=4, steps=100,
                                    patches_per_patient=2, width=0.5)
    cfg = plans["configurations"]["3d_fullres"]
    dp = cfg["dp"]
    n_train = dp["num_patients"]
    assert dp["num_patients"] == 8  # 10 patients, fold 0 trains on 4/5 of them
    assert dp["sample_rate"] == pytest.approx(4 / n_train)
    assert dp["patches_per_patient"] == 2 and dp["steps"] == 100 and dp["privacy_unit"] == "patient"
    from dpunet.privacy.accounting import epsilon_spent
    assert epsilon_spent(dp["noise_multiplier"], dp["sample_rate"], 100, dp["delta"], "prv") <= 4.0 + 1e-6
    assert dp["noise_to_signal"] == pytest.approx(dp["noise_multiplier"] / 4)
    assert dp["warnings"], "8 patients at eps 4 must warn that the noise is too large"
    arch = cfg["architecture"]["kwargs"]
    assert arch["features_per_stage"][0] == 16  # width 0.5
    assert arch["norm"] in ("GroupNorm", "InstanceNorm") and "Batch" not in json.dumps(cfg)
    assert arch["nonlin_kwargs"].get("inplace", False) is False
    # anisotropic synthetic spacing (3, 1, 1): first stage does not pool z
    assert arch["strides"][1][0] == 1
    nonprivate, _ = plan_experiment(task, fp, ["3d_fullres"], epsilon=float("inf"))
    assert nonprivate["configurations"]["3d_fullres"]["dp"]["noise_multiplier"] == 0.0


def test_impossible_budget_is_a_clear_error(synthetic_task):
    task = load_task(synthetic_task)
    with pytest.raises(DpunetError):
        plan_experiment(task, extract_fingerprint(task), ["3d_fullres"], epsilon=1e-4, steps=10000,
                        patients_per_step=1)


@pytest.mark.shared
def test_hippocampus_plans_match_nnunet_reference(hippocampus_dir, tmp_path):
    ref = json.loads(shared_path("reference", "nnunetv2_Task04_Hippocampus", "nnUNetPlans.json").read_text())
    roots = {"raw": tmp_path / "raw", "preprocessed": tmp_path / "pre", "results": tmp_path / "res"}
    roots["raw"].mkdir()
    (roots["raw"] / "Task04_Hippocampus").symlink_to(hippocampus_dir)
    proc = run_cli("dpunet.pipeline.cli", "-t", "4", "--no-preprocess", "-np", "2", env_roots=roots)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = json.loads((roots["preprocessed"] / "Task04_Hippocampus" / "dpunet_plans.json").read_text())
    for name in ("3d_fullres", "2d"):
        mine, theirs = plans["configurations"][name], ref["configurations"][name]
        assert mine["spacing"][-len(theirs["spacing"]):] == pytest.approx(theirs["spacing"])
        assert mine["median_shape"][-len(theirs["median_image_size_in_voxels"]):] == \
            pytest.approx(theirs["median_image_size_in_voxels"])
        for p, q in zip(mine["patch_size"], theirs["patch_size"]):
            assert abs(p - q) <= 0.25 * q
        assert mine["architecture"]["kwargs"]["n_stages"] == theirs["architecture"]["arch_kwargs"]["n_stages"]
        assert mine["architecture"]["kwargs"]["strides"] == theirs["architecture"]["arch_kwargs"]["strides"]
    assert "3d_lowres" not in plans["configurations"]
    splits = json.loads((roots["preprocessed"] / "Task04_Hippocampus" / "splits_final.json").read_text())
    assert len(splits) == 5 and plans["split_scheme"] == "patient_hash"
    assert sorted(c for split in splits for c in split["val"]) == sorted(splits[0]["train"] + splits[0]["val"])
    assert all(120 <= len(split["train"]) <= 180 for split in splits)


def test_plan_picks_its_public_start_from_declared_metadata_only(synthetic_task, capsys):
    """dataset.json's declared modality and anatomy choose the pretraining source: an MR hippocampus task starts
    from the hippocampus prior, anything else (CT, another structure, mixed channels) from random images."""
    import dataclasses

    from dpunet.planning.dp_plan import default_pretraining_source

    assert default_pretraining_source("Hippocampus", "Left and right hippocampus segmentation", ["MRI"],
                                      ["background", "Anterior", "Posterior"])[0] == "synthetic_hippocampus"
    assert default_pretraining_source("Task99", "", ["T1w", "FLAIR"], ["background", "hippocampus"])[0] \
        == "synthetic_hippocampus"
    for name, channels, labels in (("Hippocampus", ["CT"], ["background", "hippocampus"]),
                                   ("Hippocampus", ["MRI", "CT"], ["background", "hippocampus"]),
                                   ("Heart", ["MRI"], ["background", "left atrium"]),
                                   ("Hippocampus", [], ["background"])):
        assert default_pretraining_source(name, "", channels, labels)[0] == "random_images", (name, channels)

    task = load_task(synthetic_task)
    fp = extract_fingerprint(task)
    plain = plan_experiment(task, fp, ["2d"])[0]["configurations"]["2d"]["training"]
    assert plain["init_from"] == "random_images" and "random processes" in plain["init_from_rule"]
    hippocampus = dataclasses.replace(task, name="Task990_Hippocampus", channel_names={0: "MRI"})
    full_plans = plan_experiment(hippocampus, fp, ["2d", "3d_fullres"])[0]
    plans = full_plans["configurations"]
    assert {c["training"]["init_from"] for c in plans.values()} == {"synthetic_hippocampus"}
    assert all("names the hippocampus" in c["training"]["init_from_rule"] for c in plans.values())
    from dpunet.planning.run import print_plan_summary

    print_plan_summary(full_plans)
    assert capsys.readouterr().out.count("start: pretrained on synthetic_hippocampus (dataset.json declares") == 2


def test_predict_and_cv_find_a_run_trained_from_the_plans_start(tmp_path, monkeypatch, capsys):
    """A run trained without --init-from carries the plan's start in its name when that is not random_images;
    dpunet_predict and dpunet_cv_summary, also given no --init-from, must look for that name."""
    from dpunet.evaluation.cross_validation import main as cv_main
    from dpunet.inference.predictor import run_directory

    monkeypatch.setenv("DPUNET_PREPROCESSED", str(tmp_path / "pre"))
    monkeypatch.setenv("DPUNET_RESULTS", str(tmp_path / "res"))
    plan_dir = tmp_path / "pre" / "Task990_Hippocampus"
    plan_dir.mkdir(parents=True)
    (plan_dir / "dpunet_plans.json").write_text(json.dumps(
        {"configurations": {"2d": {"training": {"init_from": "synthetic_hippocampus"}}}}))
    run = tmp_path / "res" / "Task990_Hippocampus" / "unet__2d__eps8__init-synthetic_hippocampus"
    run.mkdir(parents=True)
    assert run_directory("Task990_Hippocampus", "2d", 8.0, "unet") == run
    assert run_directory("Task990_Hippocampus", "2d", 8.0, "unet", {"init_from": "synthetic_hippocampus"}) == run
    with pytest.raises(SystemExit):  # the right folder was looked in: it holds no evaluated fold yet
        cv_main(["-t", "Task990_Hippocampus", "-c", "2d", "--eps", "8", "-f", "0"])
    assert f"{run.name}/fold_0" in capsys.readouterr().err
