"""The DP trainer end to end on a small synthetic task: outputs, privacy report, resume, refusals."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset_conversion.generate_synthetic import generate_synthetic_task
from dpunet.privacy.accounting import epsilon_spent
from dpunet.privacy.public_subspace import project_onto_basis
from dpunet.training.config import merge_plan_and_options
from dpunet.training.trainer import DPTrainer, load_training_inputs
from dpunet.utils.errors import DpunetError

STEPS = 4


def _env(roots: dict[str, Path]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({f"DPUNET_{k.upper()}": str(v) for k, v in roots.items()})
    return env


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("train")
    roots = {"raw": base / "raw", "preprocessed": base / "pre", "results": base / "res"}
    generate_synthetic_task(roots["raw"], num_cases=16, cases_per_patient=2, base_shape=(10, 32, 32),
                            spacing=(2.0, 1.0, 1.0), seed=5)
    proc = subprocess.run([sys.executable, "-m", "dpunet.pipeline.cli", "-t", "990", "-c", "3d_fullres",
                           "2d", "--width", "0.25", "--steps", str(STEPS), "--patients-per-step", "3",
                           "--patches-per-patient", "2", "-np", "1"], env=_env(roots), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return roots


@pytest.fixture
def env(roots, monkeypatch):
    for k, v in roots.items():
        monkeypatch.setenv(f"DPUNET_{k.upper()}", str(v))
    return roots


def make_trainer(tmp_path: Path, configuration="3d_fullres", **options) -> DPTrainer:
    _, _, plan_config, _, _ = load_training_inputs("990", configuration)
    opts = dict(task="990", fold="0", epsilon=8.0, configuration=configuration, engine="functorch",
                augmentation=False, patients_per_micro_batch=2, device="cpu", validation=False, init_from="none")
    opts.update(options)
    return DPTrainer(merge_plan_and_options(plan_config, opts), output_dir=tmp_path / "run")


def test_patients_are_the_privacy_unit(env, tmp_path):
    trainer = make_trainer(tmp_path)
    # 16 cases, 2 per patient; fold 0 trains on the patients outside its validation fold, never splitting one
    assert set(trainer.train_cases) == {c for cases in trainer.patients.values() for c in cases}
    assert 0 < trainer.num_patients < 8
    assert all(len(cases) == 2 for cases in trainer.patients.values())
    assert trainer.sample_rate == pytest.approx(3 / trainer.num_patients)


def test_train_run_writes_every_output(env, tmp_path):
    trainer = make_trainer(tmp_path, validation=True)
    result = trainer.run()
    out = trainer.output_dir
    released = {"release/model_release.pt", "release/model_release.json", "release/privacy_report.json",
                "release/privacy_report.md"}
    private = {"private/checkpoint_latest.pt", "private/training_log.csv", "private/progress.png",
               "private/validation/summary.json", "private/run_config.json"}
    for name in released | private:
        assert (out / name).is_file(), name
    # nothing else beside the two folders, and release/ holds exactly the releasable files
    assert {p.name for p in out.iterdir()} == {"release", "private"}
    assert {str(p.relative_to(out)) for p in (out / "release").iterdir()} == released
    state = torch.load(out / "private" / "checkpoint_latest.pt", weights_only=True)
    assert state["step"] == STEPS
    model = torch.load(out / "release" / "model_release.pt", weights_only=True)
    assert model["inference_weights"] == "ema"
    for key, value in trainer.ema.weights().items():
        assert torch.equal(model["weights"][key], value)
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    assert report["unit"] == "patient" and report["steps_taken"] == STEPS
    assert report["num_patients"] == trainer.num_patients and report["patches_per_patient"] == 2
    assert report["noise_multiplier"] > 0 and report["clip_norm"] == 1.0
    prv = epsilon_spent(report["noise_multiplier"], report["sample_rate"], STEPS, report["delta"], "prv")
    assert report["epsilon"]["prv"] == pytest.approx(prv, rel=1e-6) and prv <= 8.0
    assert report["epsilon"]["rdp"] == pytest.approx(
        epsilon_spent(report["noise_multiplier"], report["sample_rate"], STEPS, report["delta"], "rdp"), rel=1e-6)
    rows = (out / "private" / "training_log.csv").read_text().strip().splitlines()
    assert len(rows) == STEPS + 1
    assert result["validation"]["metric_per_case"], "validation ran on the held-out patients"


def test_nonprivate_run_uses_same_code_without_noise(env, tmp_path):
    trainer = make_trainer(tmp_path, epsilon=math.inf)
    assert trainer.noise_multiplier == 0.0 and trainer.engine.clip_norm is None
    trainer.run()
    report = json.loads((trainer.output_dir / "release" / "privacy_report.json").read_text())
    assert report["private"] is False and report["clip_norm"] is None


def test_2d_configuration_trains(env, tmp_path):
    trainer = make_trainer(tmp_path, configuration="2d", steps=2)
    trainer.run()
    assert (trainer.output_dir / "release" / "model_release.pt").is_file()


@pytest.mark.parametrize("subset", ["bias_norm_head", "decoder"])
def test_trained_subset_leaves_frozen_weights_at_their_seeded_values(env, tmp_path, subset):
    trainer = make_trainer(tmp_path, configuration="2d", steps=2, trainable=subset, engine="fast")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert frozen and trained
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert any(not torch.equal(after[n], before[n]) for n in trained)
    report = json.loads((trainer.output_dir / "release" / "privacy_report.json").read_text())
    assert report["extra"]["trainable_subset"] == subset
    trained_count = sum(trainer.model.get_parameter(n).numel() for n in trained)
    assert report["extra"]["trained_parameters"] == trained_count
    assert report["extra"]["noise_norm_per_step_in_units_of_C"] == pytest.approx(
        trainer.noise_multiplier * math.sqrt(trained_count) / trainer.cfg.patients_per_step)


def _one_sgd_step(tmp_path, **options):
    trainer = make_trainer(tmp_path, configuration="2d", engine="fast", insecure_reproducible_noise=True,
                           optimizer="sgd", momentum=0.0, learning_rate=0.1, warmup_steps=0, lr_schedule="constant",
                           ema_decay=0.0, **options)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run(stop_after_steps=1)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    delta = torch.cat([(trainer.model.state_dict()[n] - before[n]).reshape(-1) for n in names])
    return trainer, before, delta


def test_projected_step_is_the_projection_of_the_same_dp_release(env, tmp_path):
    plain, before, delta_plain = _one_sgd_step(tmp_path / "plain")
    projected, before_p, delta_projected = _one_sgd_step(tmp_path / "projected", public_subspace=3,
                                                     public_subspace_batch=2)
    assert all(torch.equal(before[k], before_p[k]) for k in before)
    assert plain.noise_multiplier == projected.noise_multiplier
    basis = projected.public_subspace.basis(before_p, 0)
    assert basis.shape[1] == 3
    oracle = project_onto_basis([delta_plain], basis)[0]
    assert torch.allclose(delta_projected, oracle, rtol=1e-4, atol=1e-7)
    assert delta_projected.norm() < 0.5 * delta_plain.norm()  # 3 of thousands of directions kept


def test_public_subspace_run_reports_its_public_data(env, tmp_path):
    trainer = make_trainer(tmp_path, configuration="2d", steps=2, engine="fast", public_subspace=2,
                           public_subspace_batch=2)
    trainer.run()
    report = json.loads((trainer.output_dir / "release" / "privacy_report.json").read_text())
    assert report["extra"]["public_subspace_dimension"] == 2
    public = " ".join(report["public_data_and_priors"])
    assert "public gradient subspace (--public-subspace 2)" in public and "random processes" in public
    assert "seed drawn per step" in public  # a released file names the generator, never the run's seed
    assert report["epsilon"]["prv"] <= 8.0 + 1e-6


def _comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("extra",)}


def test_interrupt_and_resume_equals_uninterrupted_with_reproducible_noise(env, tmp_path):
    straight = make_trainer(tmp_path / "a", insecure_reproducible_noise=True)
    straight.run()
    interrupted = make_trainer(tmp_path / "b", insecure_reproducible_noise=True)
    assert interrupted.run(stop_after_steps=2) is None
    resumed = make_trainer(tmp_path / "b", insecure_reproducible_noise=True)
    resumed.run(resume=True)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    a = json.loads((straight.output_dir / "release" / "privacy_report.json").read_text())
    b = json.loads((resumed.output_dir / "release" / "privacy_report.json").read_text())
    assert _comparable(a) == _comparable(b)
    assert a["statement"].startswith("NOT PRIVATE against anyone who knows the seed")
    rows = (resumed.output_dir / "private" / "training_log.csv").read_text().strip().splitlines()
    assert len(rows) == STEPS + 1


def test_resume_with_secret_noise_gives_the_same_account_and_fresh_noise(env, tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.run()
    interrupted = make_trainer(tmp_path / "b")
    assert interrupted.run(stop_after_steps=2) is None
    resumed = make_trainer(tmp_path / "b")
    resumed.run(resume=True)
    a = json.loads((straight.output_dir / "release" / "privacy_report.json").read_text())
    b = json.loads((resumed.output_dir / "release" / "privacy_report.json").read_text())
    assert _comparable(a) == _comparable(b) and a["steps_taken"] == STEPS
    assert not a["statement"].startswith("NOT PRIVATE")
    # the resumed session drew a new key: its steps 3-4 did not reuse any noise of the first session
    assert interrupted.randomness.key != resumed.randomness.key
    assert any(not torch.equal(resumed.model.state_dict()[k], v) for k, v in straight.model.state_dict().items())


def test_continue_refuses_changed_privacy_parameters(env, tmp_path):
    first = make_trainer(tmp_path)
    first.run(stop_after_steps=1)
    changed = make_trainer(tmp_path, clip_norm=0.5)
    with pytest.raises(DpunetError, match="changed privacy parameters"):
        changed.run(resume=True)
    reshaped = make_trainer(tmp_path, trainable="bias_norm_head")
    with pytest.raises(DpunetError, match=r"changed model or optimiser \(trainable: all -> bias_norm_head\)"):
        reshaped.run(resume=True)
    fresh = make_trainer(tmp_path)
    with pytest.raises(DpunetError, match="already holds a run"):
        fresh.run()


def test_impossible_budget_exits_before_training(env):
    proc = subprocess.run([sys.executable, "-m", "dpunet.training.cli", "990", "0", "--eps", "0.001",
                           "--steps", "5000", "--patients-per-step", "6",
                           "--init-from", "none"], env=_env(env), capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "epsilon" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(env["results"].rglob("checkpoint_*.pt"))


def test_unknown_fold_and_configuration_are_clear_errors(env):
    for args, text in ((["990", "7", "--eps", "8"], "fold 7"), (["990", "0", "--eps", "8", "-c", "3d_lowres"],
                                                                "3d_lowres")):
        proc = subprocess.run([sys.executable, "-m", "dpunet.training.cli", *args], env=_env(env),
                              capture_output=True, text=True)
        assert proc.returncode != 0 and text in proc.stderr and "Traceback" not in proc.stderr


def _train_cli(roots: dict[str, Path], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpunet.training.cli", *args], env=_env(roots),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_options_are_one_line_errors(env):
    runs = {"fold a": (["990", "a", "--eps", "8"], "fold 'a' does not exist"),
            "fold 1.5": (["990", "1.5", "--eps", "8"], "fold '1.5' does not exist"),
            "lr": (["990", "0", "--eps", "8", "--lr", "-1"], "--lr must be a positive number"),
            # before: minutes inside the noise calibration, without a word
            "eps 1e6": (["990", "0", "--eps", "1e6"], "above 1000"),
            "eps 1e308": (["990", "0", "--eps", "1e308"], "above 1000")}
    procs = {name: _train_cli(env, *args) for name, (args, _) in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-2000:])
        assert err.strip().splitlines()[-1].startswith("dpunet error:") and runs[name][1] in err, (name, err)
        assert "Traceback" not in err, name


def test_more_patients_per_step_than_patients_is_clamped_with_a_warning(env, tmp_path):
    proc = _train_cli({**env, "results": tmp_path / "res"}, "990", "0", "--eps", "inf", "--patients-per-step",
                      "100", "--steps", "1", "--init-from", "none", "--no-validation", "--no-augmentation",
                      "--engine", "functorch", "--device", "cpu")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "dpunet warning: --patients-per-step 100 is more than the 6 training patients" in err and "q = 1" in err


def test_run_time_counts_the_fast_engine_s_plans_of_new_micro_batch_sizes(env, tmp_path, monkeypatch):
    from dpunet.training import trainer as trainer_module
    from dpunet.training.runtime_estimate import MicroBatchTiming

    # a known first-size cost of 2 s per patient; 6 patients, q 3/6, micro-batches of 2, 4 steps, size 2 timed
    monkeypatch.setattr(trainer_module, "time_micro_batch",
                        lambda accumulate, n, device: MicroBatchTiming(1.0, n, 2.0))
    trainer = make_trainer(tmp_path, engine="fast")
    assert trainer.num_patients == 6 and trainer.patients_per_micro_batch == 2
    # sizes of micro-batches of 2 are 1 and 2 only: 2 is planned by the estimate, 1 needs no plan
    assert trainer.run_time_estimate.new_size_seconds == 0
    trainer = make_trainer(tmp_path / "b", engine="fast", patients_per_micro_batch=4)
    # m ~ Binomial(6, 1/2) patients per step, micro-batches of 3 (the timed size: min(4, 3 per step)) known;
    # new sizes: 2 (m = 2 or 6: 15+1 of 64), 4 (m >= 4: 22 of 64); over 4 steps
    p2, p4 = 1 - (1 - 16 / 64) ** STEPS, 1 - (1 - 22 / 64) ** STEPS
    assert trainer.run_time_estimate.timed_patients == 3
    assert trainer.run_time_estimate.new_size_seconds == pytest.approx(2.0 * (2 * p2 + 4 * p4))


def test_loader_benchmark_compares_delivery_with_consumption(env, capsys):
    from dpunet.benchmark import loader_bench

    assert loader_bench.main.__wrapped__(["-t", "990", "--patients", "2", "--workers", "0", "--steps", "1",
                                          "--engine", "functorch"]) == 0
    out = capsys.readouterr().out
    assert "consumes" in out and "0 worker(s), delivers" in out


def test_run_time_is_estimated_before_training_and_max_hours_refuses(env, tmp_path, capsys, monkeypatch):
    from dpunet.privacy.engines.functorch_vmap import FunctorchEngine

    sizes, accumulate = [], FunctorchEngine.accumulate
    monkeypatch.setattr(FunctorchEngine, "accumulate",
                        lambda self, batch: sizes.append(batch.num_patients) or accumulate(self, batch))
    trainer = make_trainer(tmp_path, init_from="random_images", pretraining_steps=3, pretraining_batch_size=2)
    estimate = trainer.run_time_estimate
    assert estimate.steps == STEPS and estimate.patients_per_step == 3 and estimate.patches_per_patient == 2
    # timed on the run's micro-batch, min(2 per micro-batch, 3 per step), after a one-patient probe and a warm-up
    assert sizes == [1, 2, 2] and estimate.timed_patients == estimate.micro_batch_patients == 2
    assert estimate.new_size_seconds == 0  # functorch makes no per-shape plans
    assert estimate.seconds_per_patient > 0 and estimate.noise_seconds_per_step > 0
    assert estimate.pretraining_steps == 3 and estimate.pretraining_seconds_per_step > 0
    assert "estimated wall time on cpu" in capsys.readouterr().out
    # the pretraining checkpoint is now cached: the next run's estimate has no pretraining
    assert make_trainer(tmp_path / "again", init_from="random_images", pretraining_steps=3,
                        pretraining_batch_size=2).run_time_estimate.pretraining_steps == 0
    with pytest.raises(DpunetError, match=r"--max-hours 1e-09: estimated wall time on cpu: .* steps fit \(--steps 0\)"):
        make_trainer(tmp_path / "refused", max_hours=1e-9)
    assert not (tmp_path / "refused").exists()


def test_probe_phase_trains_only_the_heads_then_every_parameter_at_the_same_account(env, tmp_path):
    # functorch: the fast engine picks its per-layer strategy by timing, which may move the last bit
    common = dict(configuration="2d", engine="functorch", insecure_reproducible_noise=True)
    probed = make_trainer(tmp_path / "probe", probe_steps=2, probe_trainable="head", **common)
    before = {k: v.clone() for k, v in probed.model.state_dict().items()}
    assert probed.run(stop_after_steps=2) is None  # interrupted exactly at the phase boundary
    heads = {n for n, _ in probed.model.named_parameters() if n.startswith("decoder.heads.")}
    after_probe = probed.model.state_dict()
    assert heads and all(not torch.equal(after_probe[n], before[n]) for n in heads)
    assert all(torch.equal(after_probe[n], before[n]) for n, _ in probed.model.named_parameters() if n not in heads)

    resumed = make_trainer(tmp_path / "probe", probe_steps=2, probe_trainable="head", **common)
    resumed.run(resume=True)
    straight = make_trainer(tmp_path / "straight", probe_steps=2, probe_trainable="head", **common)
    straight.run()
    for key, value in straight.model.state_dict().items():  # resuming across the boundary changes nothing
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    final = straight.model.state_dict()
    encoder = [n for n, _ in straight.model.named_parameters() if n.startswith("encoder.")]
    assert encoder and all(not torch.equal(final[n], after_probe[n]) for n in encoder)

    plain = make_trainer(tmp_path / "plain", **common)
    assert plain.noise_multiplier == straight.noise_multiplier  # every step is the same Gaussian mechanism
    report = json.loads((straight.output_dir / "release" / "privacy_report.json").read_text())
    assert report["steps_taken"] == STEPS and report["epsilon"]["prv"] <= 8.0 + 1e-6
    assert report["extra"]["probe_steps"] == 2 and report["extra"]["probe_trainable"] == "head"
    assert report["extra"]["probe_trained_parameters"] == sum(
        straight.model.get_parameter(n).numel() for n in heads)


def test_probe_steps_refuse_impossible_settings(env, tmp_path):
    with pytest.raises(DpunetError, match="--probe-steps must lie between"):
        make_trainer(tmp_path / "a", configuration="2d", probe_steps=STEPS)
    with pytest.raises(DpunetError, match="equals --trainable"):
        make_trainer(tmp_path / "b", configuration="2d", probe_steps=1, probe_trainable="all")
    with pytest.raises(DpunetError, match="cannot be combined"):
        make_trainer(tmp_path / "c", configuration="2d", probe_steps=1, public_subspace=2)
