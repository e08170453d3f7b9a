"""What a privacy report states must be true: the total budget with the DP fingerprint, delta below 1/N, N
declared public, the split assumption, where the hyperparameters came from."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpunet.planning.dp_plan import DEFAULTS_TUNED_ON_TASK, hyperparameter_statement
from dpunet.planning.splits import split_statement
from dpunet.privacy.accounting import epsilon_spent
from dpunet.training.config import merge_plan_and_options
from dpunet.training.trainer import DPTrainer, load_training_inputs
from dpunet.utils.errors import DpunetError
from tests.conftest import plan_synthetic_task


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return plan_synthetic_task(tmp_path_factory.mktemp("privacy_statements"), "-c", "2d", "--width", "0.25", "--steps", "3",
                               "--patients-per-step", "3", "--patches-per-patient", "1")


@pytest.fixture
def env(roots, use_roots):
    return use_roots(roots)


def _plans_path(roots) -> Path:
    return roots["preprocessed"] / "Task990_Synthetic3D" / "dpunet_plans.json"


@pytest.fixture
def fingerprint_spent(env):
    """The plan as if the fingerprint had released DP statistics with (0.5, 1e-6)."""
    path = _plans_path(env)
    original = path.read_text()
    plans = json.loads(original)
    plans["fingerprint_privacy"] = {"epsilon": 0.5, "delta": 1e-6}
    path.write_text(json.dumps(plans))
    yield
    path.write_text(original)


def trainer(tmp_path: Path, **options) -> DPTrainer:
    _, _, plan_config, _, _ = load_training_inputs("990", "2d")
    opts = dict(task="990", fold="0", epsilon=8.0, configuration="2d", engine="functorch", augmentation=False,
                device="cpu", validation=False, init_from="none")
    opts.update(options)
    return DPTrainer(merge_plan_and_options(plan_config, opts), output_dir=tmp_path / "run")


def test_the_fingerprint_budget_is_subtracted_and_the_headline_gives_the_total(fingerprint_spent, tmp_path):
    t = trainer(tmp_path)
    assert t.training_epsilon == pytest.approx(7.5) and t.training_delta == pytest.approx(9e-6)
    t.run()
    report = json.loads((t.release_dir / "privacy_report.json").read_text())
    dp_sgd = epsilon_spent(t.noise_multiplier, t.sample_rate, 3, 9e-6, "prv")
    assert dp_sgd <= 7.5 and report["epsilon"]["prv"] == pytest.approx(dp_sgd, rel=1e-6)
    assert report["total"]["epsilon"] == pytest.approx(dp_sgd + 0.5) and report["total"]["delta"] == pytest.approx(1e-5)
    assert report["total"]["epsilon"] <= 8.0
    assert report["statement"].startswith(f"({report['total']['epsilon']:.4g}, 1e-05)-differential privacy")
    assert "fingerprint statistics' epsilon 0.5" in report["statement"]


def test_a_budget_the_fingerprint_already_spent_is_refused(fingerprint_spent, tmp_path):
    with pytest.raises(DpunetError, match="leaves nothing for training"):
        trainer(tmp_path, epsilon=0.4)


def test_delta_of_one_over_n_is_refused_unless_allowed_and_then_flagged(env, tmp_path):
    with pytest.raises(DpunetError, match=r"not below 1/N.*--allow-large-delta"):
        trainer(tmp_path, delta=0.2)
    t = trainer(tmp_path, delta=0.2, allow_large_delta=True, steps=1)
    t.run()
    report = json.loads((t.release_dir / "privacy_report.json").read_text())
    assert any(c.startswith("LARGE DELTA") for c in report["caveats"])


def test_report_states_n_public_the_split_and_the_hyperparameter_provenance(env, tmp_path):
    t = trainer(tmp_path, steps=1)
    t.run()
    report = json.loads((t.release_dir / "privacy_report.json").read_text())
    assert any("treated as public" in a and f"N = {t.num_patients}" in a for a in report["assumptions"])
    assert split_statement("patient_hash", "0") in report["assumptions"]
    assert hyperparameter_statement("Task990_Synthetic3D") in report["caveats"]
    assert "not chosen on this data" in hyperparameter_statement("Task990_Synthetic3D")
    assert "THIS task" in hyperparameter_statement(DEFAULTS_TUNED_ON_TASK)
    assert "FIXED SPLIT ASSUMED" in split_statement("kfold", "0")
    assert "FIXED SPLIT ASSUMED" in split_statement("custom", "1")
    assert report["randomness"].startswith("secret") and math.isfinite(report["epsilon"]["prv"])


def test_hand_edited_splits_are_kept_and_reported_as_a_fixed_split(env, tmp_path):
    from dpunet.pipeline import cli as plan_and_preprocess

    splits_path = env["preprocessed"] / "Task990_Synthetic3D" / "splits_final.json"
    original, plans_before = splits_path.read_text(), _plans_path(env).read_text()
    splits = json.loads(original)
    splits[0]["train"], splits[1]["train"] = splits[1]["train"], splits[0]["train"]  # any non-generated split
    splits[0]["val"], splits[1]["val"] = splits[1]["val"], splits[0]["val"]
    splits_path.write_text(json.dumps(splits))
    try:
        with pytest.raises(SystemExit):
            plan_and_preprocess.main(["-t", "990", "-c", "2d", "--width", "0.25", "--steps", "3",
                                      "--patients-per-step", "3", "--patches-per-patient", "1", "-np", "1",
                                      "--no-preprocess"])
        assert json.loads(splits_path.read_text()) == splits
        assert json.loads(_plans_path(env).read_text())["split_scheme"] == "custom"
    finally:
        splits_path.write_text(original)
        _plans_path(env).write_text(plans_before)
