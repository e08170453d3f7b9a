"""Attacks by someone who reads our released files (issue: the guarantee must survive an attacker with the code,
every released output and all training data but one patient).

Each attack is run twice: on a default run, where it must fail, and on a run with --insecure-reproducible-noise,
where the same attack must succeed: that is what shows the attack is real and its failure meaningful.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpunet.architectures import build_network, select_trainable
from dpunet.privacy.randomness import PrivateRandomness, hardened_normal
from dpunet.privacy.sampling import PoissonPatientSampler
from dpunet.privacy.statistics import dp_bounded_means
from dpunet.training.config import merge_plan_and_options
from dpunet.training.trainer import DPTrainer, load_training_inputs
from dpunet.utils.errors import DpunetError
from tests.conftest import plan_synthetic_task

DEFAULT_SEED = 0
STEPS = 6


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return plan_synthetic_task(tmp_path_factory.mktemp("privacy_attacks"), "-c", "2d", "--width", "0.25", "--steps",
                               str(STEPS), "--patients-per-step", "3", "--patches-per-patient", "2")


@pytest.fixture
def env(roots, use_roots):
    return use_roots(roots)


def train(out: Path, **options) -> tuple[DPTrainer, list[list[str]]]:
    """A DP run with a linear optimiser (the attacker's best case: w1 - w0 = -lr * noisy mean gradient) and the
    final weights released; returns the trainer and the patients it really drew at each step (ground truth)."""
    _, _, plan_config, _, _ = load_training_inputs("990", "2d")
    opts = dict(task="990", fold="0", epsilon=8.0, configuration="2d", engine="functorch", augmentation=False,
                device="cpu", validation=False, init_from="none", optimizer="sgd", momentum=0.0,
                learning_rate=0.5, warmup_steps=0, lr_schedule="constant", evaluate_ema=False)
    opts.update(options)
    trainer = DPTrainer(merge_plan_and_options(plan_config, opts), output_dir=out)
    drawn: list[list[str]] = []
    sample = trainer.sampler.sample
    trainer.sampler.sample = lambda step: drawn.append(sample(step)) or drawn[-1]
    trainer.run()
    return trainer, drawn


def released_files(trainer: DPTrainer) -> list[Path]:
    return sorted(p for p in (trainer.output_dir / "release").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------- 1. regenerate the noise
def _attack_noise(release_dir: Path, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """From the release file and the code alone: rebuild the seeded initialisation, regenerate the noise of
    every step as if derived from the (public) seed, and return the recovered noise-free sum of clipped
    gradients summed over the steps."""
    model_file = torch.load(release_dir / "model_release.pt", weights_only=True)
    report = model_file["privacy"]
    torch.manual_seed(seed)  # --seed seeds the initialisation (harmless, and known to the attacker)
    net = build_network(model_file["architecture"], model_file["num_channels"], model_file["num_classes"], True)
    select_trainable(net, "all")
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    guess = PrivateRandomness.insecure_from_seed(seed)
    std = report["noise_multiplier"] * report["clip_norm"]
    noise = {n: torch.zeros_like(w) for n, w in w0.items()}
    for step in range(steps):
        generator = guess.torch_generator("noise", step)
        for n in w0:  # the trainer's order: engine.params = named parameters in order
            noise[n] += hardened_normal(w0[n].shape, std, generator)
    lr, divisor = 0.5, report["expected_batch_size"]
    return {n: -(model_file["weights"][n] - w0[n]) * divisor / lr - noise[n] for n in w0}


def _true_clipped_sum(trainer: DPTrainer, drawn: list[list[str]]) -> dict[str, torch.Tensor]:
    """Ground truth from the private data: the sum over steps of the clipped gradients, at the weights of each
    step (replayed)."""
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    torch.manual_seed(DEFAULT_SEED)
    replay = build_network(trainer.arch, trainer.task.num_channels, trainer.num_classes, True)
    weights = {n: p.detach().clone() for n, p in replay.named_parameters()}
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    release = torch.load(trainer.release_dir / "model_release.pt", weights_only=True)["weights"]
    # one step: the weights before it are the initial ones
    assert len(drawn) == 1
    trainer.model.load_state_dict(weights, strict=False)
    trainer.engine.zero()
    if drawn[0]:
        trainer.engine.accumulate(trainer.patch_sampler.make_patient_batch(drawn[0], 0, trainer.cfg.seed))
    for n, g in zip(names, trainer.engine.summed_grad):
        total[n] += g
    assert set(release) >= set(names)
    return total


def _relative_error(recovered: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    a = torch.cat([recovered[n].flatten().double() for n in truth])
    b = torch.cat([truth[n].flatten().double() for n in truth])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("insecure", [False, True])
def test_the_noise_cannot_be_regenerated_from_released_files(env, tmp_path, insecure):
    trainer, drawn = train(tmp_path / "run", steps=1, patients_per_step=6, insecure_reproducible_noise=insecure)
    recovered = _attack_noise(trainer.release_dir, DEFAULT_SEED, steps=1)
    error = _relative_error(recovered, _true_clipped_sum(trainer, drawn))
    if insecure:
        assert error < 1e-3, "with the seed known the attack recovers the noise-free gradient sum"
    else:
        # what is left is the full noise: sigma * sqrt(d) against a signal of at most N*C
        assert error > 1.0, "the released weights must not reveal the noise-free sum"


# ------------------------------------------------------------------------------- 2. re-draw the batches
@pytest.mark.parametrize("insecure", [False, True])
def test_the_batches_cannot_be_redrawn(env, tmp_path, insecure):
    trainer, drawn = train(tmp_path / "run", steps=STEPS, insecure_reproducible_noise=insecure)
    report = json.loads((trainer.release_dir / "privacy_report.json").read_text())
    # the attacker knows every patient id but the victim's; give them all, and the seed
    attacker = PoissonPatientSampler(sorted(trainer.patients), report["sample_rate"],
                                     PrivateRandomness.insecure_from_seed(DEFAULT_SEED))
    guesses = [attacker.sample(t) for t in range(STEPS)]
    if insecure:
        assert guesses == drawn
    else:
        # 6 steps x N Bernoulli(1/2) draws: matching all by chance has probability 2^-(6N)
        assert guesses != drawn


# ------------------------------------------------------------------------------- 3. read the training set
def test_release_files_hold_no_patient_id_seed_or_state(env, tmp_path):
    trainer, _ = train(tmp_path / "run", steps=2, seed=123457)
    files = released_files(trainer)
    assert {p.name for p in files} == {"model_release.pt", "model_release.json", "privacy_report.json",
                                       "privacy_report.md"}
    identities = set(trainer.patients) | set(trainer.train_cases) | set(trainer.val_cases)
    for path in files:
        raw = path.read_bytes()
        for identity in identities:
            assert identity.encode() not in raw, f"{path.name} names {identity}"
        assert b"123457" not in raw, f"{path.name} holds the seed"
    state = torch.load(trainer.release_dir / "model_release.pt", weights_only=True)
    forbidden_parts = ("seed", "generator", "sampler", "optimizer", "patient_id", "ledger")
    forbidden_keys = {"config", "ema", "training_config", "randomness_key", "key"}

    def keys(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield f"{prefix}{k}"
                yield from keys(v, f"{prefix}{k}.")

    found = [k for k in keys({k: v for k, v in state.items() if k != "weights"})
             if any(f in k.split(".")[-1].lower() for f in forbidden_parts)
             or k.split(".")[-1].lower() in forbidden_keys]
    assert found == []
    # the private checkpoint holds no generator or sampler state either: nothing to steal from it
    private = torch.load(trainer.output_dir / "private" / "checkpoint_latest.pt", weights_only=True)
    assert "noise_generator" not in private and "sampler" not in private and private["randomness"] == "secret"


def test_the_release_file_alone_predicts(env, tmp_path):
    from dpunet.inference.predictor import load_fold_model

    trainer, _ = train(tmp_path / "run", steps=1)
    lone = tmp_path / "received" / "model_release.pt"
    lone.parent.mkdir()
    lone.write_bytes((trainer.release_dir / "model_release.pt").read_bytes())
    model = load_fold_model(lone)
    x = torch.randn(1, model.num_channels, *model.plan_configuration["patch_size"])
    expected = trainer.model.eval()(x)
    got = model.network(x)
    torch.testing.assert_close(got, expected[0] if isinstance(expected, (list, tuple)) else expected)


# ------------------------------------------------------------------------------- 4. the DP fingerprint
def test_fingerprint_noise_cannot_be_undone():
    lower, upper = np.array([-1000.0, 0.0]), np.array([1000.0, 1000.0])
    rng = np.random.default_rng(7)
    data = np.vstack([rng.uniform([-200, 50], [200, 400], size=(40, 2)), [[612.0, 333.0]]])
    release = dp_bounded_means(data, lower, upper, 0.1, 1e-6)  # the default: OS entropy
    # the former attack: regenerate the noise from seed 0 and subtract it
    g = np.random.default_rng(0)
    std = release.noise_multiplier * math.sqrt(3)
    noise_sum, noise_count = g.normal(0.0, std, size=2), g.normal(0.0, std)
    centre, half = (upper + lower) / 2, (upper - lower) / 2
    recovered = (release.means - centre) / half * max(len(data) + noise_count, 1.0) - noise_sum
    exact = ((np.clip(data, lower, upper) - centre) / half).sum(0)
    assert np.abs(recovered - exact).max() > 1.0  # off by the noise (std ~ 70), not by rounding
    # and a public seed cannot be handed in by mistake
    with pytest.raises(TypeError, match="PrivateRandomness"):
        dp_bounded_means(data, lower, upper, 0.1, 1e-6, np.random.default_rng(0))


# ------------------------------------------------------------------------------- same command, other noise
def _report_without_paths(trainer: DPTrainer) -> dict:
    return json.loads((trainer.release_dir / "privacy_report.json").read_text())


def test_two_default_runs_differ_in_noise_but_not_in_account(env, tmp_path):
    a, _ = train(tmp_path / "a", steps=2)
    b, _ = train(tmp_path / "b", steps=2)
    assert _report_without_paths(a) == _report_without_paths(b)
    assert any(not torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
    c, _ = train(tmp_path / "c", steps=2, insecure_reproducible_noise=True)
    d, _ = train(tmp_path / "d", steps=2, insecure_reproducible_noise=True)
    for k, v in c.model.state_dict().items():
        assert torch.equal(d.model.state_dict()[k], v)
    insecure = _report_without_paths(c)
    assert insecure["statement"].startswith("NOT PRIVATE against anyone who knows the seed")
    assert insecure["randomness"].startswith("REPRODUCIBLE")


def test_a_kill_after_the_release_resumes_without_training_again(env, tmp_path):
    trainer, _ = train(tmp_path / "run", steps=2)
    old = torch.load(trainer.release_dir / "model_release.pt", weights_only=True)["weights"]
    state = torch.load(trainer.output_dir / "private" / "checkpoint_latest.pt", weights_only=True)
    assert state["step"] == 2  # saved before the release was written
    resumed = DPTrainer(trainer.cfg, output_dir=trainer.output_dir)
    resumed.run(resume=True)
    # no new step, so no second set of weights computed from the private data: the same release, bit for bit
    assert resumed.ledger.steps_taken == 2
    new = torch.load(trainer.release_dir / "model_release.pt", weights_only=True)["weights"]
    assert all(torch.equal(new[k], v) for k, v in old.items())


def test_a_second_process_on_the_same_run_refuses(env, tmp_path):
    import fcntl

    first = DPTrainer(merge_plan_and_options(load_training_inputs("990", "2d")[2],
                                             dict(task="990", fold="0", epsilon=8.0, configuration="2d", steps=1,
                                                  engine="functorch", validation=False, init_from="none")),
                      output_dir=tmp_path / "run" / "fold_0")
    lock = tmp_path / "run" / ".fold_0.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:  # as a running dpunet_train holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DpunetError, match="in use by another dpunet_train"):
            first.run()
    # --continue on a run that never started: a clear error and no folder left behind
    with pytest.raises(DpunetError, match="not found"):
        first.run(resume=True)
    assert not (tmp_path / "run" / "fold_0").exists()
    first.run()
    assert (tmp_path / "run" / "fold_0" / "release" / "model_release.pt").is_file()


def test_the_training_log_is_written_as_training_goes(env, tmp_path):
    trainer = DPTrainer(merge_plan_and_options(load_training_inputs("990", "2d")[2],
                                               dict(task="990", fold="0", epsilon=8.0, configuration="2d", steps=4,
                                                    engine="functorch", validation=False, init_from="none",
                                                    checkpoint_every_steps=2, checkpoint_minutes=1000.0)),
                        output_dir=tmp_path / "run")
    step = trainer.train_step

    def killed_after_three_steps():
        if trainer.step == 3:
            raise KeyboardInterrupt  # as a kill: no checkpoint, no log write on the way out
        return step()

    trainer.train_step = killed_after_three_steps
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    rows = (trainer.private_dir / "training_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # every step on disk, not only the checkpointed ones (step 2)
    resumed = DPTrainer(trainer.cfg, output_dir=trainer.output_dir)
    resumed.run(resume=True)  # from the checkpoint at step 2: step 3 is redone, its old row dropped
    rows = (trainer.private_dir / "training_log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
