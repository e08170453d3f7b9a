"""dpunet_audit: the one-run empirical lower bound on epsilon must stay below the claim on a correct run and
exceed it on each deliberately broken variant (noise off, clipping off, noise reproducible from the seed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpunet.audit.audit import AuditSettings, run_audit
from tests.conftest import plan_synthetic_task

EPSILON = 2.0
CANARIES = 2000
OPTIONS = dict(steps=10, width=0.25, patches_per_patient=1, augmentation=False, engine="functorch",
               learning_rate=0.1)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return plan_synthetic_task(tmp_path_factory.mktemp("audit"), "-c", "2d", "--width", "0.25")


@pytest.fixture
def env(roots, use_roots):
    return use_roots(roots)


def audit(tmp_path: Path, broken: str | None) -> dict:
    return run_audit(AuditSettings(task="990", epsilon=EPSILON, num_canaries=CANARIES, options=dict(OPTIONS),
                                   broken=broken), tmp_path / "audit")


def test_a_correct_run_stays_below_its_claim(env, tmp_path):
    report = audit(tmp_path, None)
    assert report["claimed_epsilon"] == EPSILON and report["num_guesses"] == CANARIES // 2
    assert 0 <= report["epsilon_lower_bound"] <= EPSILON and not report["bound_exceeds_claim"]
    assert report["mechanism"]["randomness"] == "secret" and report["mechanism"]["canary_clipped"]
    # the canaries are patients: they count in N and so in q*N
    assert report["mechanism"]["num_patients_with_canaries"] > report["canaries_included"]
    assert json.loads((tmp_path / "audit" / "audit.json").read_text()) == report


@pytest.mark.parametrize("broken", ["noise_off", "clipping_off", "reproducible_noise"])
def test_each_broken_variant_exceeds_the_claim(env, tmp_path, broken):
    report = audit(tmp_path, broken)
    assert report["broken_variant"] == broken
    # the claim is what the (unchanged) account says: the audit catches the lie
    assert report["claimed_epsilon"] == EPSILON
    assert report["epsilon_lower_bound"] > EPSILON + 1.0 and report["bound_exceeds_claim"]


def test_command_line(env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpunet.audit.cli", "990", "0", "--eps", "4", "--canaries", "500",
                           "--steps", "3", "--width", "0.25", "--patches-per-patient", "1", "-o",
                           str(tmp_path / "cli")], env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "audit: epsilon lower bound" in proc.stdout and "vs claimed 4" in proc.stdout
    report = json.loads((tmp_path / "cli" / "audit.json").read_text())
    assert report["num_canaries"] == 500 and report["epsilon_lower_bound"] <= 4


@pytest.mark.slow
@pytest.mark.shared
def test_audit_on_hippocampus(tmp_path, monkeypatch, hippocampus_dir):
    from dpunet.pipeline import cli as plan_and_preprocess

    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"DPUNET_{key.upper()}", str(tmp_path / key))
    (tmp_path / "raw" / "Task04_Hippocampus").symlink_to(hippocampus_dir)
    with pytest.raises(SystemExit):
        plan_and_preprocess.main(["-t", "4", "-c", "2d", "--width", "0.25", "-np", "2"])
    torch.set_num_threads(2)
    report = run_audit(AuditSettings(task="4", epsilon=8.0, num_canaries=5000,
                                     options=dict(steps=10, width=0.25, patches_per_patient=1)), tmp_path / "a")
    assert report["epsilon_lower_bound"] <= 8.0
    print(report)
