"""dpunet_tune_public: the proxy task copies only the target's public metadata, the tuning file lists every candidate
and picks the best, dpunet_train then takes its learning rate (unless --lr is given) and the privacy report says so."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import dpunet.dataset.io as dataset_io
from dpunet.planning.public_tuning import public_tuning_file_name
from dpunet.privacy.accounting import calibrate_noise_multiplier
from dpunet.training.config import merge_plan_and_options
from dpunet.utils.errors import DpunetError
from tests.conftest import plan_synthetic_task

pytestmark = pytest.mark.usefixtures("single_thread")

TASK = "Task990_Synthetic3D"
RATES = (1e-3, 3e-2)
# the target run the tuning is for (and dpunet_train repeats): a few steps of a narrow 2D net from a random start
RUN = {"steps": 3, "patients_per_step": 3, "patches_per_patient": 1, "init_from": "none"}
VALIDATION_PATIENTS = 3


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return plan_synthetic_task(tmp_path_factory.mktemp("public_tuning"), "-c", "2d", "--width", "0.25")


def _fold0_training_patients(roots) -> int:
    """N from the target's files, read here independently of dpunet."""
    pre = roots["preprocessed"] / TASK
    train = set(json.loads((pre / "splits_final.json").read_text())[0]["train"])
    entries = json.loads((roots["raw"] / TASK / "dataset.json").read_text())["training"]
    return len({e.get("patient_id", Path(e["image"]).name) for e in entries
                if Path(e["image"]).name.replace(".nii.gz", "") in train})


@pytest.fixture(scope="module")
def tuned(roots):
    """One tuning run with every read of the target's images, labels and preprocessed arrays recorded (and failed)."""
    from dpunet.tuning import cli

    target_files = [roots["raw"] / TASK, roots["preprocessed"] / TASK / "2d"]
    touched: list[str] = []
    read_sitk, np_load = dataset_io._read_sitk, np.load

    def guarded(reader):
        def read(path, *args, **kwargs):
            if any(Path(path).resolve().is_relative_to(t.resolve()) for t in target_files):
                touched.append(str(path))
                raise AssertionError(f"the tuning read a target data file: {path}")
            return reader(path, *args, **kwargs)
        return read

    with pytest.MonkeyPatch.context() as mp:
        for k, v in roots.items():
            mp.setenv(f"DPUNET_{k.upper()}", str(v))
        mp.setattr(dataset_io, "_read_sitk", guarded(read_sitk))
        mp.setattr(np, "load", guarded(np_load))
        with pytest.raises(SystemExit) as done:
            cli.main(["-t", "990", "-c", "2d", "--eps", "8", "--proxy", "random_images",
                      "--learning-rates", ",".join(f"{r:g}" for r in RATES), "--steps", "3",
                      "--patients-per-step", "3", "--patches-per-patient", "1", "--init-from", "none",
                      "--proxy-validation-patients", str(VALIDATION_PATIENTS), "--device", "cpu"])
        assert done.value.code == 0
    path = roots["preprocessed"] / TASK / public_tuning_file_name("2d", "unet", 8.0)
    return {"path": path, "record": json.loads(path.read_text()), "touched": touched}


def test_the_proxy_has_the_targets_public_metadata_and_no_target_data_was_read(roots, tuned):
    assert tuned["touched"] == []
    record = tuned["record"]
    proxy = Path(record["proxy"]["folder"])
    n = _fold0_training_patients(roots)
    raw_proxy = json.loads((proxy / "raw" / "Task999_PublicProxy" / "dataset.json").read_text())
    target = json.loads((roots["raw"] / TASK / "dataset.json").read_text())
    assert raw_proxy["modality"] == target["modality"] and raw_proxy["labels"] == target["labels"]
    assert raw_proxy["numTraining"] == n + VALIDATION_PATIENTS
    splits = json.loads((proxy / "preprocessed" / "Task999_PublicProxy" / "splits_final.json").read_text())
    assert len(splits[0]["train"]) == n and len(splits[0]["val"]) == VALIDATION_PATIENTS
    plan = json.loads((roots["preprocessed"] / TASK / "dpunet_plans.json").read_text())["configurations"]["2d"]
    proxy_plan = json.loads((proxy / "preprocessed" / "Task999_PublicProxy" / "dpunet_plans.json").read_text())
    proxy_plan = proxy_plan["configurations"]["2d"]
    for key in ("patch_size", "architecture", "spacing", "median_shape", "dp", "training"):
        assert proxy_plan[key] == plan[key], key
    image = sitk.ReadImage(str(proxy / "raw" / "Task999_PublicProxy" / "imagesTr" / "proxy_train_0000.nii.gz"))
    assert list(image.GetSize()[::-1]) == [round(s) for s in plan["median_shape"]]
    assert np.allclose(image.GetSpacing()[::-1], plan["spacing"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(proxy / "raw" / "Task999_PublicProxy" / "labelsTr" /
                                                       "proxy_val_0000.nii.gz")))
    assert set(np.unique(labels)) <= {int(v) for v in target["labels"]} and labels.max() > 0


def test_the_tuning_file_lists_every_candidate_and_picks_the_best(roots, tuned):
    record = tuned["record"]
    scores = {c["learning_rate"]: c["proxy_mean_foreground_dice"] for c in record["candidates"]}
    assert sorted(scores) == sorted(RATES)
    assert all(isinstance(s, float) and math.isfinite(s) and 0 <= s <= 1 for s in scores.values())
    assert record["chosen"]["learning_rate"] == max(scores, key=scores.get)
    # the proxy runs ran at the target's privacy parameters: sigma for (8, 1e-5, q = 3/N, T = 3)
    n = _fold0_training_patients(roots)
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 3 / n, 3, accountant="prv")
    assert all(math.isclose(c["noise_multiplier"], sigma, rel_tol=1e-9) for c in record["candidates"])
    assert record["privacy_parameters"]["num_patients"] == n and record["settings"]["steps"] == 3


def test_dpunet_train_takes_the_chosen_learning_rate_and_the_report_says_so(roots, tuned, use_roots):
    import dpunet

    use_roots(roots)
    run = dpunet.train(990, 0, epsilon=8, configuration="2d", validation=False, device="cpu", **RUN)
    chosen = tuned["record"]["chosen"]["learning_rate"]
    assert run.options["learning_rate"] == chosen
    sha = hashlib.sha256(tuned["path"].read_bytes()).hexdigest()
    statement = [c for c in run.privacy_report["caveats"] if c.startswith("hyperparameters:")]
    assert len(statement) == 1
    assert tuned["path"].name in statement[0] and sha in statement[0] and "public proxy" in statement[0]
    assert "random_images" in statement[0] and "not chosen on this data" not in statement[0]
    assert math.isclose(run.privacy_report["noise_multiplier"], tuned["record"]["candidates"][0]["noise_multiplier"])


def _merged(roots, **options):
    from dpunet.planning.plans import load_training_inputs

    _, _, plan_config, _, _ = load_training_inputs(TASK, "2d")
    return merge_plan_and_options(plan_config, {"task": "990", "fold": "0", "epsilon": 8.0, "configuration": "2d",
                                                **RUN, **options})


def test_an_explicit_learning_rate_wins_over_the_file(roots, tuned, use_roots):
    use_roots(roots)
    assert _merged(roots).learning_rate == tuned["record"]["chosen"]["learning_rate"]
    cfg = _merged(roots, learning_rate=5e-3)
    assert cfg.learning_rate == 5e-3 and cfg.public_tuning is None


def test_a_file_tuned_for_other_settings_is_not_used(roots, tuned, use_roots, capsys):
    use_roots(roots)
    plan_lr = json.loads((roots["preprocessed"] / TASK / "dpunet_plans.json").read_text()
                         )["configurations"]["2d"]["training"]["learning_rate"]
    cfg = _merged(roots, steps=4)
    assert cfg.learning_rate == plan_lr and cfg.public_tuning is None
    assert "steps: tuned 3, run 4" in capsys.readouterr().err


def test_a_proxy_from_the_pretraining_source_is_refused(roots, use_roots):
    from dpunet.tuning.tune import tune_public

    use_roots(roots)
    before = sorted(p.name for p in (roots["preprocessed"] / TASK).iterdir())
    with pytest.raises(DpunetError, match="same generator"):
        tune_public(TASK, "2d", 8.0, proxy="random_images", learning_rates=RATES, device="cpu",
                    **{**RUN, "init_from": "random_images"})
    assert sorted(p.name for p in (roots["preprocessed"] / TASK).iterdir()) == before


def test_the_statement_names_what_stays_private_on_the_task_the_defaults_were_tuned_on():
    from dpunet.planning.dp_plan import DEFAULTS_TUNED_ON_TASK
    from dpunet.planning.public_tuning import public_tuning_statement

    on_hippocampus = public_tuning_statement("public_tuning__2d__unet__eps8.json", "ab" * 32, "synthetic_brain",
                                             DEFAULTS_TUNED_ON_TASK)
    elsewhere = public_tuning_statement("public_tuning__2d__unet__eps8.json", "ab" * 32, "synthetic_brain",
                                        "Task990_Synthetic3D")
    assert "pretraining length and start were chosen on private data of THIS task" in on_hippocampus
    assert "THIS task" not in elsewhere and "public proxy" in elsewhere and "ab" * 32 in elsewhere


def test_a_file_that_is_not_a_tuning_record_is_refused(tmp_path):
    from dpunet.planning.public_tuning import load_public_tuning

    bad = tmp_path / "public_tuning__2d__unet__eps8.json"
    bad.write_text(json.dumps({"format": "dpunet-public-tuning-v1", "chosen": {"learning_rate": -1}}))
    with pytest.raises(DpunetError, match="positive"):
        load_public_tuning(bad)
    bad.write_text(json.dumps({"chosen": {"learning_rate": 0.01}}))
    with pytest.raises(DpunetError, match="not a dpunet public tuning file"):
        load_public_tuning(bad)


def test_continue_refuses_a_run_whose_tuning_file_changed(roots, tuned, use_roots, tmp_path):
    """The report names the file the learning rate came from: a file that appears, goes or changes between the
    start and --continue would make it wrong."""
    import dpunet

    use_roots(roots)
    options = dict(configuration="2d", validation=False, device="cpu", run_tag="resume_tuning", **RUN)
    dpunet.train(990, 0, 8, **options)
    moved = tmp_path / "moved.json"
    tuned["path"].rename(moved)
    try:
        with pytest.raises(DpunetError, match="public_tuning"):
            dpunet.train(990, 0, 8, resume=True, **options)
    finally:
        moved.rename(tuned["path"])


# --- tuning steps and patients per step as well (a grid of candidates) ---

GRID_STEPS, GRID_PATIENTS, GRID_WIDTHS = (2, 3), (2, 3), (0.25, 0.5)


@pytest.fixture(scope="module")
def grid_roots(tmp_path_factory) -> dict[str, Path]:
    return plan_synthetic_task(tmp_path_factory.mktemp("public_tuning_grid"), "-c", "2d", "--width", "0.25")


@pytest.fixture(scope="module")
def grid_tuned(grid_roots):
    from dpunet.tuning import cli

    with pytest.MonkeyPatch.context() as mp:
        for k, v in grid_roots.items():
            mp.setenv(f"DPUNET_{k.upper()}", str(v))
        with pytest.raises(SystemExit) as done:
            cli.main(["-t", "990", "-c", "2d", "--eps", "8", "--proxy", "random_images", "--learning-rates", "3e-2",
                      "--steps", ",".join(map(str, GRID_STEPS)), "--patients-per-step",
                      ",".join(map(str, GRID_PATIENTS)), "--width", ",".join(map(str, GRID_WIDTHS)),
                      "--patches-per-patient", "1", "--init-from", "none",
                      "--proxy-validation-patients", str(VALIDATION_PATIENTS), "--device", "cpu"])
        assert done.value.code == 0
    path = grid_roots["preprocessed"] / TASK / public_tuning_file_name("2d", "unet", 8.0)
    return {"path": path, "record": json.loads(path.read_text())}


def test_a_grid_has_one_candidate_per_combination_each_with_its_own_noise(grid_roots, grid_tuned):
    record = grid_tuned["record"]
    n = _fold0_training_patients(grid_roots)
    assert record["tuned"] == ["learning_rate", "steps", "patients_per_step", "width"]
    combos = sorted((c["steps"], c["patients_per_step"], c["width"]) for c in record["candidates"])
    assert combos == sorted((t, b, w) for t in GRID_STEPS for b in GRID_PATIENTS for w in GRID_WIDTHS)
    # each width is its own network: the candidate runs record it
    for c in record["candidates"]:
        run_config = json.loads((Path(c["run_folder"]) / "private" / "run_config.json").read_text())
        assert run_config["training_config"]["width"] == c["width"]
    for c in record["candidates"]:
        sigma = calibrate_noise_multiplier(8.0, 1e-5, c["patients_per_step"] / n, c["steps"], accountant="prv")
        assert math.isclose(c["noise_multiplier"], sigma, rel_tol=1e-9)
        assert c["patches_per_patient"] == 1 and c["learning_rate"] == 3e-2
    best = max(record["candidates"], key=lambda c: c["proxy_mean_foreground_dice"])
    chosen = record["chosen"]
    assert (chosen["steps"], chosen["patients_per_step"], chosen["width"]) == (
        best["steps"], best["patients_per_step"], best["width"])
    assert record["settings"]["steps"] == chosen["steps"]
    assert record["privacy_parameters"]["noise_multiplier"] == best["noise_multiplier"]


def test_dpunet_train_takes_the_tuned_steps_and_patients_and_accounts_for_them(grid_roots, grid_tuned, use_roots):
    import dpunet

    use_roots(grid_roots)
    run = dpunet.train(990, 0, epsilon=8, configuration="2d", validation=False, device="cpu",
                       patches_per_patient=1, init_from="none")
    chosen = grid_tuned["record"]["chosen"]
    n = _fold0_training_patients(grid_roots)
    assert run.options["steps"] == chosen["steps"] and run.options["patients_per_step"] == chosen["patients_per_step"]
    assert run.options["width"] == chosen["width"]
    report = run.privacy_report
    assert report["steps_taken"] == chosen["steps"]
    assert math.isclose(report["sample_rate"], chosen["patients_per_step"] / n, rel_tol=1e-12)
    sigma = calibrate_noise_multiplier(8.0, 1e-5, chosen["patients_per_step"] / n, chosen["steps"],
                                       accountant="prv")
    assert math.isclose(report["noise_multiplier"], sigma, rel_tol=1e-9)
    statement = [c for c in report["caveats"] if c.startswith("hyperparameters:")][0]
    assert "the number of steps T" in statement and "the expected patients per step" in statement


def test_a_tuned_setting_given_on_the_command_line_must_equal_the_chosen_one(grid_roots, grid_tuned, use_roots,
                                                                          capsys):
    from dpunet.planning.plans import load_training_inputs

    use_roots(grid_roots)
    chosen = grid_tuned["record"]["chosen"]
    _, _, plan_config, _, _ = load_training_inputs(TASK, "2d")
    base = {"task": "990", "fold": "0", "epsilon": 8.0, "configuration": "2d", "patches_per_patient": 1,
            "init_from": "none"}
    same = merge_plan_and_options(plan_config, {**base, "steps": chosen["steps"]})
    assert same.public_tuning is not None and same.learning_rate == chosen["learning_rate"]
    assert same.public_tuning["taken"] == {"learning_rate": chosen["learning_rate"],
                                           "patients_per_step": chosen["patients_per_step"],
                                           "width": chosen["width"]}
    other = [t for t in GRID_STEPS if t != chosen["steps"]][0]
    differ = merge_plan_and_options(plan_config, {**base, "steps": other})
    assert differ.public_tuning is None and differ.steps == other
    assert f"steps: tuned {chosen['steps']}, run {other}" in capsys.readouterr().err


def test_candidate_values_are_checked():
    from dpunet.tuning.tune import candidate_grid

    assert candidate_grid([1e-2], {"width": [0.25, 0.5], "steps": [50.0]}) == ([1e-2], {"width": [0.25, 0.5],
                                                                                      "steps": [50]})
    for bad in ({"steps": [2.5]}, {"width": [0.5, 0.5]}, {"patients_per_step": [0]}, {"clip_norm": [1.0]}):
        with pytest.raises(DpunetError):
            candidate_grid([1e-2], bad)
    for rates in ([], [1e-2, 1e-2], [0.0], [float("nan")], [True]):
        with pytest.raises(DpunetError, match="--learning-rates candidates must be distinct positive numbers"):
            candidate_grid(rates, {})


def test_the_tuned_sample_rate_carries_over_to_folds_of_another_size():
    from dpunet.planning.public_tuning import settings_mismatch, transferred_patients_per_step

    record = {"target": {"num_patients": 161}, "chosen": {"patients_per_step": 161},
              "settings": {"patients_per_step": 161}}
    assert transferred_patients_per_step(record, 157) == 157  # every patient stays every patient
    record_64 = {"target": {"num_patients": 161}, "chosen": {"patients_per_step": 64},
                 "settings": {"patients_per_step": 64}}
    assert transferred_patients_per_step(record_64, 157) == 62  # q = 64/161 of 157
    assert not [d for d in settings_mismatch(record_64, {"patients_per_step": 63}, 157) if "patients" in d]
    assert [d for d in settings_mismatch(record_64, {"patients_per_step": 70}, 157) if "patients" in d]
    # without N the count itself must match (as before)
    assert [d for d in settings_mismatch(record_64, {"patients_per_step": 63}) if "patients" in d]
