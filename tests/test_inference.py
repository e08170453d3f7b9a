"""Inference: sliding window against direct forward passes and a numpy oracle, mirroring TTA, exact output
geometry for 3D and 2D multi-channel tasks (MSD and nnU-Net channel naming), fold ensembling, the ensemble
privacy note against the accountant, EMA weights, and clean failures (no partial files)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.architectures import build_network
from dpunet.dataset.io import Geometry, read_image, read_label, write_image
from dpunet.inference import cli, predictor
from dpunet.inference.case_io import find_input_cases
from dpunet.inference.ensemble_privacy import (ModelPrivacy, ensemble_privacy_note, read_model_privacy,
                                               training_membership)
from dpunet.inference.predictor import load_fold_model, predict_folder
from dpunet.inference.sliding_window import (gaussian_importance, mirrored_softmax, predict_case,
                                             predict_sliding_window, sliding_window_weight_sum, tile_starts)
from dpunet.privacy.accounting import epsilon_for_history, epsilon_for_repeated_training, epsilon_spent
from dpunet.privacy.report import build_privacy_report
from dpunet.release import write_release
from dpunet.training.ema import WeightEMA
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import load_json, write_json
from tests.conftest import shared_path

RUN = "unet__{config}__eps8"


pytestmark = pytest.mark.usefixtures("single_thread")

REPORT = {"epsilon_prv": 7.9, "epsilon_rdp": 8.4, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.5,
          "steps": 60, "clip_norm": 1.0}


# ------------------------------------------------------------------------------------------ tiny models
class Pointwise(nn.Module):
    """1x1 convolution: the output at a voxel depends on that voxel only (translation and flip equivariant)."""

    def __init__(self, in_ch: int, classes: int, dim: int) -> None:
        super().__init__()
        self.conv = (nn.Conv3d if dim == 3 else nn.Conv2d)(in_ch, classes, 1)
        torch.manual_seed(0)
        nn.init.normal_(self.conv.weight, std=2.0)

    def forward(self, x):
        return self.conv(x)


class PositionBias(Pointwise):
    """Pointwise logits plus a fixed map over the tile position: the output depends on where the tile lies,
    so a sliding window average is a real weighted mixture of different tiles' predictions."""

    def __init__(self, in_ch: int, classes: int, patch: tuple[int, ...]) -> None:
        super().__init__(in_ch, classes, len(patch))
        g = torch.Generator().manual_seed(1)
        self.bias = nn.Parameter(torch.randn((classes,) + patch, generator=g) * 2)

    def forward(self, x):
        return self.conv(x) + self.bias


def _softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


# -------------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("size,patch,step", [(50, 16, 0.5), (16, 16, 0.5), (17, 16, 0.5), (33, 8, 0.25),
                                             (10, 1, 0.5), (100, 30, 1.0)])
def test_tiles_cover_every_voxel_with_bounded_steps(size, patch, step):
    (starts,) = tile_starts([size], [patch], step)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert starts == sorted(set(starts))
    assert all(0 < b - a <= max(1, patch * step) + 1e-9 for a, b in zip(starts, starts[1:]))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()


def test_gaussian_weights_and_their_sum():
    g = gaussian_importance((8, 12, 10))
    assert g.max() == pytest.approx(1.0) and g.min() > 0
    assert np.unravel_index(g.argmax(), g.shape) == (4, 6, 5)
    # the normaliser equals an independent sum over tiles placed by hand, and is positive everywhere
    total = sliding_window_weight_sum((20, 12, 25), (8, 12, 10), 0.5)
    oracle = np.zeros((20, 12, 25))
    for z in (0, 4, 8, 12):
        for x in (0, 5, 10, 15):
            oracle[z:z + 8, :, x:x + 10] += g
    np.testing.assert_allclose(total, oracle, rtol=1e-6)
    assert total.min() > 0


@pytest.mark.parametrize("shape,patch", [((2, 21, 30, 17), (8, 16, 16)), ((1, 5, 40, 9), (8, 16, 16))])
def test_pointwise_model_full_image_equals_direct_forward(shape, patch):
    """Weighted averaging of identical tile predictions must give exactly the direct prediction: the
    normalisation is right and every voxel (also of an image smaller than the patch) is covered."""
    model = Pointwise(shape[0], 3, 3).eval()
    image = torch.randn(shape)
    out = predict_sliding_window(model, image, patch, 3, step_size=0.5, tile_batch_size=3)
    direct = torch.softmax(model(image[None]), 1)[0]
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)


def test_patch_sized_image_equals_direct_forward_of_a_unet():
    arch = {"class_name": "PlainConvUNet", "kwargs": {
        "dim": 3, "n_stages": 2, "features_per_stage": [4, 8], "kernel_sizes": [[3, 3, 3]] * 2,
        "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1],
        "conv_bias": True, "norm": "GroupNorm", "norm_kwargs": {"num_groups": 2, "eps": 1e-5, "affine": True},
        "nonlin": "LeakyReLU", "nonlin_kwargs": {"negative_slope": 0.01}, "downsampling": "strided_conv",
        "upsampling": "transposed_conv", "weight_standardization": False}}
    net = build_network(arch, 2, 3, deep_supervision=False).eval()
    image = torch.randn(2, 8, 12, 16)
    probs = predict_case(net, image.numpy(), [8, 12, 16], 3)
    with torch.no_grad():
        direct = torch.softmax(net(image[None]), 1)[0].numpy()
    np.testing.assert_allclose(probs, direct, atol=1e-5)


def _oracle_sliding_window(model: PositionBias, image: np.ndarray, patch, step) -> np.ndarray:
    """Independent re-implementation: per tile, softmax of conv(x) + bias, weighted by the Gaussian."""
    w = model.conv.weight.detach().numpy().reshape(model.conv.out_channels, -1)
    b = model.conv.bias.detach().numpy()
    bias = model.bias.detach().numpy()
    g = gaussian_importance(patch).astype(np.float64)
    acc = np.zeros((w.shape[0],) + image.shape[1:])
    norm = np.zeros(image.shape[1:])
    for start in itertools.product(*tile_starts(image.shape[1:], patch, step)):
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
        tile = image[(slice(None),) + sl]
        logits = np.tensordot(w, tile, axes=(1, 0)) + b.reshape((-1,) + (1,) * len(patch)) + bias
        acc[(slice(None),) + sl] += _softmax_np(logits) * g
        norm[sl] += g
    return acc / norm


@pytest.mark.parametrize("step", [0.5, 0.3])
def test_position_dependent_model_matches_numpy_oracle(step):
    patch = (6, 10, 8)
    model = PositionBias(2, 3, patch).eval()
    image = np.random.default_rng(0).normal(size=(2, 13, 23, 19)).astype(np.float32)
    out = predict_case(model, image, patch, 3, step_size=step, tile_batch_size=5)
    np.testing.assert_allclose(out, _oracle_sliding_window(model, image, patch, step), atol=1e-5)
    assert np.allclose(out.sum(0), 1, atol=1e-5)


def test_2d_network_runs_slice_by_slice():
    patch = (10, 8)
    model = PositionBias(2, 3, patch).eval()
    image = np.random.default_rng(1).normal(size=(2, 4, 23, 19)).astype(np.float32)
    out = predict_case(model, image, patch, 3, step_size=0.5, tile_batch_size=7)
    for z in range(image.shape[1]):
        slice_oracle = _oracle_sliding_window(model, image[:, z], patch, 0.5)
        np.testing.assert_allclose(out[:, z], slice_oracle, atol=1e-5)


def test_mirroring_of_an_equivariant_model_changes_nothing():
    model = Pointwise(1, 3, 3).eval()
    image = np.random.default_rng(2).normal(size=(1, 9, 20, 14)).astype(np.float32)
    plain = predict_case(model, image, (8, 16, 8), 3)
    tta = predict_case(model, image, (8, 16, 8), 3, mirror_axes=(0, 1, 2))
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_mirroring_averages_all_flips():
    patch = (4, 6, 8)
    model = PositionBias(1, 2, patch).eval()
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        got = mirrored_softmax(model, x, (0, 2))
        expected = sum(torch.flip(torch.softmax(model(torch.flip(x, d)), 1), d)
                       for d in ([], [2], [4], [2, 4])) / 4
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, torch.softmax(model(x), 1).detach())  # the flips did matter


# ------------------------------------------------------------------------------- synthetic tasks + runs
def _trained_like_checkpoint(run_dir: Path, plan_config: dict, num_channels: int, num_classes: int, seed: int,
                             inference_weights: str = "ema", report: dict | None = None) -> None:
    """release/model_release.pt as the trainer writes it (no training): the EMA (or the final weights, which
    differ) of a randomly initialised net, and the run's privacy report."""
    torch.manual_seed(seed)
    net = build_network(plan_config["architecture"], num_channels, num_classes, deep_supervision=True)
    ema = WeightEMA(net, 0.99)
    with torch.no_grad():
        for k, v in ema.shadow.items():
            if v.dtype.is_floating_point:
                v.add_(0.05 * torch.randn_like(v))
    weights = ema.weights() if inference_weights == "ema" else net.state_dict()
    write_release(run_dir / "release", weights=weights, architecture=plan_config["architecture"],
                  num_channels=num_channels, num_classes=num_classes, plan_configuration=plan_config,
                  description={"task": "Task990_Synthetic3D", "fold": run_dir.name.removeprefix("fold_"),
                               "inference_weights": inference_weights}, privacy_report=report or REPORT)
    write_json(report or REPORT, run_dir / "release" / "privacy_report.json")
    return weights


def _plan(task_id: int, configuration: str) -> None:
    from dpunet.pipeline import cli as plan_and_preprocess

    with pytest.raises(SystemExit) as exit_info:
        plan_and_preprocess.main(["-t", str(task_id), "-c", configuration, "--width", "0.25", "-np", "1",
                                  "--no-verify", "--eps", "8"])
    assert exit_info.value.code == 0


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("dpunet")
    paths = {k: base / k for k in ("raw", "preprocessed", "results")}
    with pytest.MonkeyPatch.context() as mp:
        for k, p in paths.items():
            p.mkdir()
            mp.setenv(f"DPUNET_{k.upper()}", str(p))
        yield paths


@pytest.fixture(scope="module")
def task3d(roots):
    folder = generate_synthetic_task(roots["raw"], task_id=990, name="Syn3D", num_cases=5, base_shape=(8, 24, 24),
                                     spacing=(3.0, 1.0, 1.0), num_test=2, seed=3)
    _plan(990, "3d_fullres")
    pc = load_json(roots["preprocessed"] / folder.name / "dpunet_plans.json")["configurations"]["3d_fullres"]
    run = roots["results"] / folder.name / RUN.format(config="3d_fullres")
    for fold in (0, 1):
        _trained_like_checkpoint(run / f"fold_{fold}", pc, 1, 3, seed=fold)
    return {"folder": folder, "name": folder.name, "plan": pc, "run": run}


@pytest.fixture(scope="module")
def task2d(roots):
    folder = generate_synthetic_task(roots["raw"], task_id=991, name="Syn2D", num_cases=5, ndim=2, num_channels=2,
                                     base_shape=(36, 30), spacing=(0.8, 0.6), num_test=2, seed=4)
    _plan(991, "2d")
    pc = load_json(roots["preprocessed"] / folder.name / "dpunet_plans.json")["configurations"]["2d"]
    run = roots["results"] / folder.name / RUN.format(config="2d")
    for fold in (0, 1):
        _trained_like_checkpoint(run / f"fold_{fold}", pc, 2, 3, seed=10 + fold)
    return {"folder": folder, "name": folder.name, "plan": pc, "run": run}


def _assert_same_geometry(inputs: Path, outputs: Path, case_ids: list[str], num_classes: int) -> None:
    for case in case_ids:
        image, g_in = read_image(inputs / f"{case}.nii.gz")
        seg, g_out = read_label(outputs / f"{case}.nii.gz")
        assert g_in.matches(g_out) == [], case
        assert seg.shape == image.shape[1:] == g_in.shape
        assert set(np.unique(seg)) <= set(range(num_classes))


def _no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".tmp.")]


def test_predict_3d_cli_geometry_probabilities_and_note(task3d, tmp_path, capsys):
    images = task3d["folder"] / "imagesTs"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["-i", str(images), "-o", str(out), "-t", "990", "-f", "0", "1", "-np", "0",
                  "--save_probabilities", "--device", "cpu"])
    assert e.value.code == 0
    cases = [c.case_id for c in find_input_cases(images)]
    assert len(cases) == 2
    _assert_same_geometry(images, out, cases, 3)
    for case in cases:
        probs = np.load(out / f"{case}.npz")["probabilities"]
        seg, _ = read_label(out / f"{case}.nii.gz")
        assert probs.dtype == np.float16 and probs.shape == (3,) + seg.shape
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=3e-3)
        top2 = np.sort(probs.astype(np.float32), 0)[-2:]
        clear = top2[1] - top2[0] > 1e-2  # float16 rounding can only flip near-ties
        assert np.array_equal(probs.argmax(0)[clear], seg[clear])
        info = load_json(out / f"{case}.json")
        assert Geometry.from_dict(info["geometry"]).matches(read_image(images / f"{case}.nii.gz")[1]) == []
    assert _no_temporary_files(out)

    # the note: folds 0 and 1 of 5-fold CV share 3 of 5 patients -> 2 trainings compose, PRV and RDP
    note = load_json(out / "privacy_note.json")
    splits = load_json(Path(os.environ["DPUNET_PREPROCESSED"]) / task3d["name"] / "splits_final.json")
    per_case = [sum(case in splits[f]["train"] for f in (0, 1)) for case in splits[0]["train"] + splits[0]["val"]]
    assert note["max_models_per_patient"] == max(per_case) == 2  # one case per patient here
    assert note["models_per_patient_histogram"] == {str(k): per_case.count(k) for k in sorted(set(per_case))}
    sigma, q, steps, delta = REPORT["noise_multiplier"], REPORT["sample_rate"], REPORT["steps"], REPORT["delta"]
    for acc in ("prv", "rdp"):
        assert note["epsilon"][acc] == pytest.approx(epsilon_for_repeated_training(sigma, q, steps, 2, delta, acc))
        single = epsilon_spent(sigma, q, steps, delta, acc)
        assert note["models"][0]["epsilon_at_delta"][acc] == pytest.approx(single)
    assert note["delta"] == delta
    assert note["basic_composition_bound"]["delta"] == pytest.approx(2 * delta)
    assert note["basic_composition_bound"]["epsilon"] == pytest.approx(2 * epsilon_spent(sigma, q, steps, delta))
    assert note["epsilon"]["prv"] < note["basic_composition_bound"]["epsilon"]
    md = (out / "privacy_note.md").read_text()
    assert f"{note['epsilon']['prv']:.4g}" in md
    assert "epsilon" in capsys.readouterr().out


def test_ensemble_is_the_mean_of_the_folds(task3d, tmp_path):
    images = task3d["folder"] / "imagesTs"
    probs = {}
    for folds in ([0], [1], [0, 1]):
        out = tmp_path / "_".join(map(str, folds))
        predict_folder(images, out, "990", "3d_fullres", folds, 8.0, num_processes=0, save_probabilities=True,
                       use_mirroring=False, progress=False)
        probs[tuple(folds)] = {p.name: np.load(p)["probabilities"].astype(np.float32) for p in out.glob("*.npz")}
    for name, both in probs[(0, 1)].items():
        np.testing.assert_allclose(both, (probs[(0,)][name] + probs[(1,)][name]) / 2, atol=2e-3)
        assert not np.allclose(probs[(0,)][name], probs[(1,)][name], atol=1e-2)  # the folds really differ
    single = load_json(tmp_path / "0" / "privacy_note.json")
    assert single["max_models_per_patient"] == 1
    assert single["epsilon"]["prv"] == pytest.approx(epsilon_spent(REPORT["noise_multiplier"], REPORT["sample_rate"],
                                                                   REPORT["steps"], REPORT["delta"]))


def test_predict_2d_multichannel_msd_and_nnunet_naming(task2d, tmp_path):
    images = task2d["folder"] / "imagesTs"
    cases = [c.case_id for c in find_input_cases(images)]
    out_msd = tmp_path / "msd"
    predict_folder(images, out_msd, "Task991_Syn2D", None, [0, 1], 8.0, num_processes=2, progress=False)
    _assert_same_geometry(images, out_msd, cases, 3)
    assert read_image(images / f"{cases[0]}.nii.gz")[0].shape[:2] == (2, 1)  # really 2 channels, Z == 1

    # the same images as one file per channel, nnU-Net style
    split = tmp_path / "split"
    for case in cases:
        data, geometry = read_image(images / f"{case}.nii.gz")
        for c in range(data.shape[0]):
            write_image(data[c], geometry, split / f"{case}_{c:04d}.nii.gz")
    found = find_input_cases(split)
    assert [c.case_id for c in found] == cases and all(len(c.files) == 2 for c in found)
    out_split = tmp_path / "from_split"
    predict_folder(split, out_split, "991", "2d", [0, 1], 8.0, num_processes=0, progress=False)
    for case in cases:
        a, ga = read_label(out_msd / f"{case}.nii.gz")
        b, gb = read_label(out_split / f"{case}.nii.gz")
        assert np.array_equal(a, b) and ga.matches(gb) == []


def test_the_release_file_carries_the_weights_the_run_chose(task3d, tmp_path):
    pc = task3d["plan"]
    for which in ("ema", "final"):
        run = tmp_path / which
        expected = _trained_like_checkpoint(run, pc, 1, 3, seed=5, inference_weights=which)
        model = load_fold_model(run / "release" / "model_release.pt", "0")
        assert model.weights_used == which
        got = model.network.state_dict()
        assert set(got) == set(expected)
        for k in got:
            torch.testing.assert_close(got[k], expected[k].to(got[k].dtype))
        assert model.network.deep_supervision is False


# ----------------------------------------------------------------------------------------- privacy note
def test_note_composes_different_folds_with_the_accountant():
    a = ModelPrivacy("0", True, ((1.0, 0.3, 40),), 1e-5)
    b = ModelPrivacy("1", True, ((1.3, 0.25, 70),), 1e-5)
    c = ModelPrivacy("2", True, ((0.9, 0.3, 30),), 1e-5)
    splits = [{"train": ["c1", "c2", "c3"], "val": ["c4"]}, {"train": ["c1", "c3", "c4"], "val": ["c2"]},
              {"train": ["c2", "c3", "c4"], "val": ["c1"]}]
    patients = {"c1": "p1", "c2": "p2", "c3": "p3", "c4": "p3"}  # p3 has two cases, in every fold's training
    membership = training_membership(splits, ["0", "1", "2"], patients)
    assert membership == {"p1": {"0", "1"}, "p2": {"0", "2"}, "p3": {"0", "1", "2"}}
    note = ensemble_privacy_note([a, b, c], membership)
    for acc in ("prv", "rdp"):
        assert note["epsilon"][acc] == pytest.approx(epsilon_for_history([a.history[0], b.history[0], c.history[0]],
                                                                          1e-5, acc))
    assert note["max_models_per_patient"] == 3 and note["worst_case_models"] == ["0", "1", "2"]
    assert "epsilon_for_history" in note["computed_with"]

    # without p3 the worst patient is p1 (folds 0, 1): the larger of the two pairs
    two = training_membership(splits[:2], ["0", "1"], {"c1": "p1", "c2": "p2", "c3": "p3", "c4": "p4"})
    note2 = ensemble_privacy_note([a, b], two)
    assert note2["epsilon"]["prv"] == pytest.approx(epsilon_for_history([a.history[0], b.history[0]], 1e-5))
    assert note2["models_per_patient_histogram"] == {"1": 2, "2": 2}


def test_note_single_fold_nonprivate_and_unknown_splits():
    a = ModelPrivacy("3", True, ((1.2, 0.2, 50),), 1e-6)
    single = ensemble_privacy_note([a], None)
    assert single["epsilon"]["rdp"] == pytest.approx(epsilon_spent(1.2, 0.2, 50, 1e-6, "rdp"))
    assert "single model of fold 3" in single["statement"] and "epsilon_if_in_every_model" not in single
    # splits unknown: every patient in every model
    both = ensemble_privacy_note([a, ModelPrivacy("4", True, ((1.2, 0.2, 50),), 1e-6)], None)
    assert both["epsilon"]["prv"] == pytest.approx(epsilon_for_repeated_training(1.2, 0.2, 50, 2, 1e-6))
    open_model = ModelPrivacy("all", False, ((0.0, 0.2, 50),), None)
    nonprivate = ensemble_privacy_note([a, open_model], None)
    assert nonprivate["private"] is False and nonprivate["epsilon"]["prv"] == "inf"
    assert "NOT PRIVATE" in nonprivate["statement"]


def test_read_the_trainers_privacy_report(tmp_path):
    report = build_privacy_report(num_patients=40, sample_rate=0.25, noise_multiplier=1.5, clip_norm=1.0, delta=1e-5,
                                  target_epsilon=8.0, steps_planned=30, patches_per_patient=2, steps_taken=30,
                                  fingerprint_epsilon=0.1, fingerprint_delta=1e-7)
    write_json(report, tmp_path / "privacy_report.json")
    model = read_model_privacy("2", tmp_path / "privacy_report.json")
    assert model.history == ((1.5, 0.25, 30),) and model.private and model.delta == 1e-5
    assert model.epsilon_reported["prv"] == pytest.approx(report["epsilon"]["prv"])
    note = ensemble_privacy_note([model], None)
    assert note["epsilon"]["prv"] == pytest.approx(report["epsilon"]["prv"])
    assert note["total"]["epsilon"] == pytest.approx(report["epsilon"]["prv"] + 0.1)


# ----------------------------------------------------------------------------------------------- errors
def test_cli_errors_exit_nonzero_and_leave_no_files(task3d, task2d, roots, tmp_path):
    images = task3d["folder"] / "imagesTs"
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "a_case.nii.gz").symlink_to(images / f"{find_input_cases(images)[0].case_id}.nii.gz")
    two_channel = next((task2d["folder"] / "imagesTs").glob("*.nii.gz"))
    (wrong / "b_case.nii.gz").symlink_to(two_channel)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update({f"DPUNET_{k.upper()}": str(v) for k, v in roots.items()})
    runs = {
        "fold": (["-i", str(images), "-f", "0", "7"], "fold '7' does not exist"),
        "checkpoint": (["-i", str(images), "-f", "0", "3"],
                       f"{task3d['run'] / 'fold_3' / 'release' / 'model_release.pt'} not found: train fold 3 with "
                       f"dpunet_train"),
        "channels": (["-i", str(wrong), "-f", "0"], f"{wrong / 'b_case.nii.gz'}: image has 2 channel(s)"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "dpunet.inference.cli", *args, "-o", str(tmp_path / name),
                                     "-t", "990", "-np", "0"], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (args, _) in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert runs[name][1] in err, (name, err)
        assert "Traceback" not in err
        assert not (tmp_path / name).exists()


def test_unknown_configuration_and_task(task3d, tmp_path):
    with pytest.raises(DpunetError, match="configuration 'weird' is not planned"):
        predict_folder(task3d["folder"] / "imagesTs", tmp_path / "o", "990", "weird", [0], 8.0)
    with pytest.raises(DpunetError, match="no folder Task555"):
        predict_folder(task3d["folder"] / "imagesTs", tmp_path / "o", "555", None, [0], 8.0)
    with pytest.raises(DpunetError, match="eps 4"):
        predict_folder(task3d["folder"] / "imagesTs", tmp_path / "o", "990", "3d_fullres", [0], 4.0)


def test_failure_mid_prediction_leaves_only_complete_files(task3d, tmp_path, monkeypatch):
    original = predictor.EnsemblePredictor.predict
    calls = []

    def failing(self, data):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, data)

    monkeypatch.setattr(predictor.EnsemblePredictor, "predict", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_folder(task3d["folder"] / "imagesTs", out, "990", "3d_fullres", [0], 8.0, num_processes=0,
                       save_probabilities=True, use_mirroring=False, progress=False)
    assert _no_temporary_files(out)
    first = find_input_cases(task3d["folder"] / "imagesTs")[0].case_id
    # the folder says it is unfinished: the marker stays and the privacy note (written last) is not there
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{first}.nii.gz", f"{first}.npz", f"{first}.json", "PREDICTION_INCOMPLETE.txt"])
    read_label(out / f"{first}.nii.gz")
    np.load(out / f"{first}.npz")["probabilities"]


# ------------------------------------------------------------------------------------------ real data
def test_hippocampus_prediction_has_the_input_geometry(tmp_path, monkeypatch):
    image = shared_path("data", "Task04_Hippocampus", "imagesTs", "hippocampus_118.nii.gz")
    for k in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"DPUNET_{k.upper()}", str(tmp_path / k))
    plan = {
        "data_identifier": "3d_fullres", "dim": 3, "spacing": [1.2, 0.9, 1.1], "patch_size": [16, 16, 16],
        "mirror_axes": [0, 1, 2],
        "normalization_schemes": [{"name": "zscore_per_image", "use_nonzero_mask": True}],
        "resampling": {"data": {"order": 3, "order_z": 0}, "seg": {"order": 1, "order_z": 0},
                       "probabilities": {"order": 1, "order_z": 0}, "anisotropy_threshold": 3.0},
        "architecture": {"class_name": "PlainConvUNet", "kwargs": {
            "dim": 3, "n_stages": 2, "features_per_stage": [4, 8], "kernel_sizes": [[3, 3, 3]] * 2,
            "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1],
            "conv_bias": True, "norm": "GroupNorm", "norm_kwargs": {"num_groups": 2, "eps": 1e-5, "affine": True},
            "nonlin": "LeakyReLU", "nonlin_kwargs": {"negative_slope": 0.01}, "downsampling": "strided_conv",
            "upsampling": "transposed_conv", "weight_standardization": False}},
    }
    run = tmp_path / "results" / "Task04_Hippocampus" / RUN.format(config="3d_fullres")
    _trained_like_checkpoint(run / "fold_0", plan, 1, 3, seed=0)
    out = tmp_path / "out"
    predict_folder(image.parent, out, "Task04_Hippocampus", None, [0], 8.0, num_processes=0,
                   use_mirroring=False, progress=False)
    _, g_in = read_image(image)
    seg, g_out = read_label(out / "hippocampus_118.nii.gz")
    assert g_in.matches(g_out) == [] and seg.shape == g_in.shape
    import SimpleITK as sitk
    a, b = sitk.ReadImage(str(image)), sitk.ReadImage(str(out / "hippocampus_118.nii.gz"))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    note = load_json(out / "privacy_note.json")
    assert note["membership_source"].startswith("splits not available")
    # training-set cases (validation cases of some fold; 003 has a float32 label) land on their labels' grid
    cases = tmp_path / "cases"
    cases.mkdir()
    for case in ("hippocampus_001", "hippocampus_003"):
        (cases / f"{case}.nii.gz").symlink_to(image.parent.parent / "imagesTr" / f"{case}.nii.gz")
    predict_folder(cases, tmp_path / "out_tr", "Task04_Hippocampus", None, [0], 8.0, num_processes=0,
                   use_mirroring=False, progress=False)
    for case in ("hippocampus_001", "hippocampus_003"):
        _, g_label = read_label(image.parent.parent / "labelsTr" / f"{case}.nii.gz")
        seg, g_pred = read_label(tmp_path / "out_tr" / f"{case}.nii.gz")
        assert g_label.matches(g_pred) == [] and seg.shape == g_label.shape


def test_patient_hash_folds_count_models_without_assuming_the_split():
    from dpunet.inference.ensemble_privacy import (PATIENT_HASH_NOTE, PATIENT_HASH_SOURCE,
                                                   patient_hash_membership)

    models = [ModelPrivacy(str(f), True, ((1.0, 0.3, 40),), 1e-5) for f in range(5)]
    note = ensemble_privacy_note(models, patient_hash_membership([m.fold for m in models], 5), None,
                                 PATIENT_HASH_SOURCE)
    # all five folds: every patient, whatever its id, trains exactly four of them
    assert note["max_models_per_patient"] == 4 and PATIENT_HASH_NOTE in note["notes"]
    assert note["epsilon"]["prv"] == pytest.approx(epsilon_for_repeated_training(1.0, 0.3, 40, 4, 1e-5))
    # folds 0 and 1 only: a patient of fold 2, 3 or 4 (or one added there) trains both
    two = ensemble_privacy_note(models[:2], patient_hash_membership(["0", "1"], 5), None, PATIENT_HASH_SOURCE)
    assert two["max_models_per_patient"] == 2
