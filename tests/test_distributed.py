"""Multi-process DP training (torch.distributed, gloo on CPU): two ranks train exactly the single-process model.

The oracle is a single-process run with the same seed and options: two ranks (each accumulating its shard of the
same Poisson draw, summing the shards, adding the same noise once) must give the identical privacy report and the
same weights up to floating-point summation order; so must a single-process run resumed by two ranks.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.training import distributed
from dpunet.training.config import merge_plan_and_options
from dpunet.training.trainer import DPTrainer, load_training_inputs
from dpunet.utils.errors import DpunetError

STEPS = 4
SEED = 3
# SGD (linear in the gradient, unlike Adam) so that a gradient counted twice or noise added twice shows up.
# One patient per micro-batch: each patient's gradient is then computed by the very same kernels in both runs and
# only the order of the sum differs (batched convolutions of other sizes round differently, and this tiny untrained
# GroupNorm network amplifies such 1e-7 differences to ~1e-5 over a few steps).
CLI_OPTIONS = ["--eps", "8", "-c", "3d_fullres", "--engine", "functorch", "--no-augmentation",
               "--patients-per-micro-batch", "1", "--device", "cpu", "--optimizer", "sgd",
               "--lr", "0.05", "--lr-schedule", "constant", "--warmup-steps", "0", "--seed", str(SEED),
               "--pretraining-steps", "2"]
TRAINER_OPTIONS = dict(task="990", fold="0", epsilon=8.0, configuration="3d_fullres", engine="functorch",
                       augmentation=False, patients_per_micro_batch=1, device="cpu", validation=False,
                       optimizer="sgd", learning_rate=0.05, lr_schedule="constant", warmup_steps=0, seed=SEED,
                       pretraining_steps=2)
# the exact comparison with one process needs the same batches and noise on both sides: the insecure
# reproducible mode (the secret default is exercised by the --continue test)
REPRODUCIBLE = {"insecure_reproducible_noise": True}


def _env(roots: dict[str, Path]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({f"DPUNET_{k.upper()}": str(v) for k, v in roots.items()})
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dist")
    roots = {"raw": base / "raw", "preprocessed": base / "pre"}
    generate_synthetic_task(roots["raw"], num_cases=16, cases_per_patient=2, base_shape=(10, 32, 32),
                            spacing=(2.0, 1.0, 1.0), seed=5)
    proc = subprocess.run([sys.executable, "-m", "dpunet.pipeline.cli", "-t", "990", "-c", "3d_fullres",
                           "--width", "0.25", "--steps", str(STEPS), "--patients-per-step", "3",
                           "--patches-per-patient", "2", "-np", "1"], env=_env(roots), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return roots


def _with_results(roots: dict[str, Path], results: Path, monkeypatch=None) -> dict[str, Path]:
    out = {**roots, "results": results}
    if monkeypatch is not None:
        for k, v in out.items():
            monkeypatch.setenv(f"DPUNET_{k.upper()}", str(v))
    return out


def single_process_trainer(**options) -> DPTrainer:
    _, _, plan_config, _, _ = load_training_inputs("990", "3d_fullres")
    return DPTrainer(merge_plan_and_options(plan_config, {**TRAINER_OPTIONS, **options}))


def torchrun(roots: dict[str, Path], *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dpunet.training.cli", "990", "0", *CLI_OPTIONS, *extra],
                          env=_env(roots), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _load(run_dir: Path) -> tuple[dict, dict, list[str], dict]:
    state = torch.load(run_dir / "private" / "checkpoint_latest.pt", weights_only=True)
    report = json.loads((run_dir / "release" / "privacy_report.json").read_text())
    log = (run_dir / "private" / "training_log.csv").read_text().strip().splitlines()
    config = json.loads((run_dir / "private" / "run_config.json").read_text())
    return state, report, log, config


# How far one run's weights may drift from the other's through the order of fp32 sums alone, derived:
# - per step, the two runs sum the same <= N clipped per-patient gradients (every coordinate <= C) in another order
#   (shards, then the all-reduce); two orders of an n-term sum differ by at most 2 (n - 1) u sum|terms|, u = 2^-24
#   the unit roundoff of fp32: 2 (N - 1) u N C; adding the noise (|z| < Z_SIGMAS sigma C per coordinate) rounds
#   once more: 2 u (N C + |z|). The update multiplies this by lr / B (B = q N, the expected batch) and is
#   itself rounded to the weight's precision: 2 u max|w|;
# - a difference in the weights changes the next step's gradients (the update's Jacobian, I - lr/B sum of
#   per-patient Hessians of the clipped loss); that growth is the network's, not the arithmetic's: this tiny
#   untrained GroupNorm net turned 1e-7 kernel-order differences into ~1e-5 over 4 steps (about 3x per step,
#   see CLI_OPTIONS), so each step's difference may grow GROWTH_PER_STEP-fold in every later step.
# 1e-6 (fixed) failed on one machine at 1.96e-6 (issue 15); this gives ~2e-5 here, 1000x below what training
# moves the weights (> 1e-2 asserted), so a gradient counted twice or noise added twice still fails.
UNIT_ROUNDOFF = 2.0 ** -24
Z_SIGMAS = 6.0
GROWTH_PER_STEP = 4.0


def summation_order_tolerance(steps: int, lr: float, num_patients: int, expected_batch: float, clip_norm: float,
                              noise_multiplier: float, max_abs_weight: float) -> float:
    """Largest weight difference two fp32 runs that only sum in different orders can reach (see above)."""
    u, n, c = UNIT_ROUNDOFF, num_patients, clip_norm
    gradient_sum = 2 * (n - 1) * u * n * c + 2 * u * (n * c + Z_SIGMAS * noise_multiplier * c)
    per_step = lr / expected_batch * gradient_sum + 2 * u * max_abs_weight
    growth = sum(GROWTH_PER_STEP ** k for k in range(steps))  # a step-t difference grows over the T - t after it
    return per_step * growth


def test_the_tolerance_covers_the_difference_seen_and_stays_far_below_training():
    # this file's run: T 4, lr 0.05, N 6 patients, q N = 3, C 1, sigma 0.886, max|w| 1.39
    tolerance = summation_order_tolerance(STEPS, 0.05, 6, 3.0, 1.0, 0.886, 1.39)
    assert 1.96e-6 < tolerance < 1e-2 / 100


def _weights_tolerance(report: dict, state: dict) -> float:
    max_abs_weight = max(float(v.abs().max()) for v in state["weights"].values() if v.is_floating_point())
    return summation_order_tolerance(int(report["steps_taken"]), TRAINER_OPTIONS["learning_rate"],
                                     int(report["num_patients"]), float(report["expected_batch_size"]),
                                     float(report["clip_norm"]), float(report["noise_multiplier"]), max_abs_weight)


def _assert_same_training(single_dir: Path, multi_dir: Path, initial: dict[str, torch.Tensor]) -> None:
    s_state, s_report, s_log, s_config = _load(single_dir)
    m_state, m_report, m_log, m_config = _load(multi_dir)
    # like for like: every option equal (the device string and validation aside)
    skip = ("device", "validation")
    assert {k: v for k, v in s_config["training_config"].items() if k not in skip} == \
        {k: v for k, v in m_config["training_config"].items() if k not in skip}
    assert m_config["world_size"] == 2 and s_config["world_size"] == 1
    # the privacy report carries no timing field: identical, sigma, q, T, epsilons and all; the initial weights
    # are the same pretraining (same hash) cached under each run's own results folder
    s_public, m_public = s_report.pop("public_data_and_priors"), m_report.pop("public_data_and_priors")
    assert m_report == s_report
    assert [p.split("sha256 ")[1] for p in m_public] == [p.split("sha256 ")[1] for p in s_public]
    assert m_state["step"] == s_state["step"] == STEPS
    moved = max(float((s_state["weights"][k].float() - v.float()).abs().max()) for k, v in initial.items())
    assert moved > 1e-2, "the runs must actually train for the comparison to mean anything"
    tolerance = _weights_tolerance(s_report, s_state)
    assert tolerance < moved / 100, f"tolerance {tolerance:.3g} too close to the training signal {moved:.3g}"
    for key in ("weights", "ema"):  # the EMA is a convex combination of the weights: the same bound holds
        for name, value in s_state[key].items():
            torch.testing.assert_close(m_state[key][name], value, rtol=0.0, atol=tolerance,
                                       msg=lambda m, key=key, name=name: f"{key} {name}: {m}")
    # the summed statistics: same patients per step and the same loss (up to summation order)
    assert len(m_log) == len(s_log) == STEPS + 1
    for s_row, m_row in zip(s_log[1:], m_log[1:]):
        s_cells, m_cells = s_row.split(","), m_row.split(",")
        assert s_cells[:3] == m_cells[:3] and s_cells[4:7] == m_cells[4:7]  # step, epsilon, patients, clip, lr
        assert float(m_cells[3]) == pytest.approx(float(s_cells[3]), rel=1e-5)  # loss


@pytest.fixture(scope="module")
def single_run(roots, tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """The oracle: (results root, run folder, initial weights) of an uninterrupted single-process run."""
    results = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as mp:
        _with_results(roots, results, mp)
        single = single_process_trainer(**REPRODUCIBLE)
        initial = {k: v.clone() for k, v in single.model.state_dict().items()}
        single.run()
    return results, single.output_dir, initial


def test_two_ranks_train_the_single_process_model(roots, single_run, tmp_path):
    single_results, single_dir, initial = single_run
    # with rank-0-only validation: the other rank waits at the barrier
    proc = torchrun(_with_results(roots, tmp_path / "multi"), "--insecure-reproducible-noise")
    multi_dir = tmp_path / "multi" / single_dir.relative_to(single_results)
    _assert_same_training(single_dir, multi_dir, initial)
    assert (multi_dir / "private" / "validation" / "summary.json").is_file()
    assert proc.stdout.count("privacy: epsilon") == 1, "only rank 0 prints the summary"


def test_two_ranks_continue_a_single_process_checkpoint_with_secret_randomness(roots, single_run, tmp_path,
                                                                              monkeypatch):
    _, single_dir, initial = single_run
    _with_results(roots, tmp_path / "resumed", monkeypatch)
    interrupted = single_process_trainer()
    assert interrupted.run(stop_after_steps=2) is None
    # both ranks load checkpoint_latest.pt (weights, optimiser, EMA, ledger), receive rank 0's new secret key and
    # finish the run; the trainer's final check would fail if their batches or noise differed
    torchrun(_with_results(roots, tmp_path / "resumed"), "--no-validation", "--continue")
    state, report, log, _ = _load(interrupted.output_dir)
    _, single_report, _, _ = _load(single_dir)
    assert state["step"] == STEPS and len(log) == STEPS + 1
    account = ("epsilon", "epsilon_planned", "noise_multiplier", "sample_rate", "steps_taken", "history", "delta")
    assert {k: report[k] for k in account} == {k: single_report[k] for k in account}
    assert single_report["statement"].startswith("NOT PRIVATE") and not report["statement"].startswith("NOT")
    # fresh noise, not the reproducible run's: the weights differ
    assert any(not torch.equal(state["weights"][k], v) for k, v in _load(single_dir)[0]["weights"].items())


# ----- the helpers of dpunet.training.distributed, in two spawned gloo ranks -----------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helpers_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    setup = distributed.init_distributed("cpu")
    try:
        assert setup is not None and (setup.rank, setup.world_size, setup.backend) == (rank, world_size, "gloo")
        assert distributed.is_main_process() == (rank == 0)
        assert distributed.shard(list("abcde")) == [list("ace"), list("bd")][rank]
        grads = [torch.full((2, 3), float(rank + 1)), torch.arange(4.0) * (rank + 1)]
        stats = torch.tensor([0.5 * (rank + 1), rank], dtype=torch.float64)
        distributed.all_reduce_sum([*grads, stats])
        assert torch.equal(grads[0], torch.full((2, 3), 3.0)) and torch.equal(grads[1], torch.arange(4.0) * 3)
        assert stats.tolist() == [1.5, 1.0]
        distributed.assert_replicas_identical(grads, "summed gradients")
        try:
            distributed.assert_replicas_identical([torch.ones(3), torch.full((2,), float(rank))], "weights")
        except DpunetError as e:
            assert "differ between rank 0 and rank 1 (tensor 1 of 2)" in str(e)
        else:
            raise AssertionError("diverged replicas were not detected")
        distributed.barrier()
    finally:
        distributed.destroy_distributed()
    assert not distributed.is_distributed() and distributed.world_size() == 1


def test_distributed_helpers_in_two_gloo_ranks():
    # fork: the ranks need no fresh interpreter (spawn would re-import torch, ~10 s on a loaded machine)
    tmp.start_processes(_helpers_worker, args=(2, _free_port()), nprocs=2, join=True, start_method="fork")


def test_helpers_are_no_ops_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_distributed("cpu") is None
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    tensors = [torch.ones(3)]
    distributed.all_reduce_sum(tensors)
    distributed.assert_replicas_identical(tensors, "weights")
    assert torch.equal(tensors[0], torch.ones(3)) and distributed.shard([1, 2, 3]) == [1, 2, 3]
