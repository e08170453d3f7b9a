"""One-run empirical privacy audit of a training configuration (Steinke, Nasr, Jagielski 2023).

m Dirac canary patients (dpunet.audit.canaries) are each put into the training set with probability 1/2 by the
auditor's own coin (OS entropy). One DP training run of the configuration follows, through the real trainer:
Poisson sampling, clipping, noise and secret randomness as in any run. The auditor then reads only the released
model file (what an attacker would get) and scores each canary by how far its coordinate moved against the
canary's gradient, guesses "in" for the highest scores and "out" for the lowest, and converts the number of
correct guesses into a lower bound on epsilon that holds with the chosen confidence if the run really is
(epsilon, delta)-DP (dpunet.privacy.audit_bound).

The run uses a linear optimiser (SGD without momentum, constant learning rate, no EMA): the weights then move by
exactly -lr/(qN) times the noisy gradient sums, the strongest view an attacker can have of the final model. DP
does not depend on the optimiser (it post-processes the noisy gradients), so the audit's claimed epsilon is the
configuration's. What the bound means and what it cannot show: documentation/privacy_model.md ("Empirical audit").

`broken` injects a known bug, for the audit's own tests: "noise_off" (sigma 0 while the account claims the
calibrated sigma), "clipping_off" (canary gradients not clipped), "reproducible_noise" (noise from --seed, which
the auditor regenerates and subtracts, the attack of a public seed).
"""
from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpunet.audit.canaries import DiracCanaries
from dpunet.paths import results_root
from dpunet.privacy.audit_bound import audit_outcome
from dpunet.privacy.randomness import PrivateRandomness, hardened_normal
from dpunet.release import load_release
from dpunet.training.config import merge_plan_and_options
from dpunet.training.trainer import DPTrainer, load_training_inputs
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import write_json

BROKEN_VARIANTS = ("noise_off", "clipping_off", "reproducible_noise")
# the linear view of the weights (see the module docstring); validation and pretraining are not needed
AUDIT_OVERRIDES = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "constant",
                   "warmup_steps": 0, "evaluate_ema": False, "validation": False, "init_from": "none"}


@dataclass
class AuditSettings:
    task: str
    fold: str = "0"
    configuration: str = "2d"
    epsilon: float = 8.0
    num_canaries: int = 1000
    canary_magnitude_in_C: float = 10.0  # canaries far above the clip norm: clipping must cap them
    guess_fraction: float = 0.25  # guesses "in" for this fraction of canaries and "out" for as many
    confidence: float = 0.95
    options: dict[str, Any] = field(default_factory=dict)  # any dpunet_train option (steps, width, ...)
    broken: str | None = None


def _auditor_rng() -> np.random.Generator:
    """The auditor's coins (inclusion, canary coordinates): independent of the run's secret randomness."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def _make_trainer(settings: AuditSettings, canaries: DiracCanaries, output_dir: Path) -> DPTrainer:
    _, _, plan_config, _, _ = load_training_inputs(settings.task, settings.configuration)
    options = {**settings.options, **AUDIT_OVERRIDES, "task": settings.task, "fold": settings.fold,
               "epsilon": settings.epsilon, "configuration": settings.configuration}
    if settings.broken == "reproducible_noise":
        options["insecure_reproducible_noise"] = True
    cfg = merge_plan_and_options(plan_config, options)
    if not cfg.private:
        raise DpunetError("an audit needs a private run (finite --eps)")
    trainer = DPTrainer(cfg, output_dir=output_dir, canaries=canaries)
    if settings.broken == "noise_off":
        trainer.noise_multiplier = 0.0  # the ledger keeps the calibrated sigma: the account now lies
    return trainer


def _regenerated_noise_sums(trainer: DPTrainer, canaries: DiracCanaries) -> np.ndarray:
    """The attack of a public seed: the noise of every step regenerated from --seed, summed, at the canaries'
    coordinates."""
    guess = PrivateRandomness.insecure_from_seed(trainer.cfg.seed)
    std = trainer.noise_multiplier * trainer.cfg.clip_norm
    total = np.zeros(len(canaries.ids))
    for step in range(trainer.cfg.steps):
        generator = guess.torch_generator("noise", step, trainer.device)
        total += canaries.gather([hardened_normal(p.shape, std, generator) for p in trainer.engine.params])
    return total


def canary_scores(trainer: DPTrainer, canaries: DiracCanaries, initial: list[torch.Tensor],
                  released: dict[str, torch.Tensor], subtract_regenerated_noise: bool) -> np.ndarray:
    """How far each canary's coordinate moved against its gradient, in units of clipped-gradient sums."""
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    final = [released[n] for n in names]
    scale = trainer.cfg.patients_per_step / trainer.cfg.learning_rate
    scores = (canaries.gather(initial) - canaries.gather(final)) * scale
    if subtract_regenerated_noise:
        scores = scores - _regenerated_noise_sums(trainer, canaries)
    return scores


def run_audit(settings: AuditSettings, output_dir: Path | None = None) -> dict[str, Any]:
    """Train once with canaries, guess membership from the release file, bound epsilon; writes audit.json."""
    if settings.broken is not None and settings.broken not in BROKEN_VARIANTS:
        raise DpunetError(f"unknown broken variant {settings.broken!r} (known: {', '.join(BROKEN_VARIANTS)})")
    if not 0 < settings.guess_fraction <= 0.5:
        raise DpunetError("--guess-fraction must lie in (0, 0.5]")
    output_dir = Path(output_dir or results_root() / "audits" / f"{settings.task}__{settings.configuration}__"
                      f"eps{settings.epsilon:g}__m{settings.num_canaries}__{time.strftime('%Y%m%d-%H%M%S')}")
    rng = _auditor_rng()
    start = time.time()
    canaries = DiracCanaries(settings.num_canaries, 1.0, rng, clip=settings.broken != "clipping_off")
    trainer = _make_trainer(settings, canaries, output_dir / "run")
    canaries.magnitude = settings.canary_magnitude_in_C * trainer.cfg.clip_norm
    canaries.bind(trainer.engine.params)
    initial = [p.detach().clone() for p in trainer.engine.params]
    trainer.run()
    released = load_release(trainer.release_dir / "model_release.pt").weights  # what an attacker holds
    scores = canary_scores(trainer, canaries, initial, released, settings.broken == "reproducible_noise")
    guesses = max(1, int(settings.guess_fraction * settings.num_canaries))
    outcome = audit_outcome(scores, canaries.included, guesses, guesses, trainer.training_delta,
                            settings.confidence)
    report = {
        "claimed_epsilon": trainer.training_epsilon, "delta": trainer.training_delta,
        "epsilon_lower_bound": outcome.epsilon_lower_bound, "confidence": outcome.confidence,
        "num_canaries": outcome.num_canaries, "canaries_included": int(canaries.included.sum()),
        "num_guesses": outcome.num_guesses, "num_correct": outcome.num_correct,
        "bound_exceeds_claim": bool(outcome.epsilon_lower_bound > trainer.training_epsilon),
        "broken_variant": settings.broken,
        "mechanism": {"noise_multiplier": trainer.noise_multiplier, "sample_rate": trainer.sample_rate,
                      "steps": trainer.cfg.steps, "clip_norm": trainer.cfg.clip_norm,
                      "num_patients_with_canaries": trainer.num_patients,
                      "canary_magnitude": canaries.magnitude, "canary_clipped": canaries.clip,
                      "randomness": "reproducible (insecure)" if trainer.randomness.reproducible else "secret"},
        "settings": {k: v for k, v in asdict(settings).items() if k != "options"},
        "options": {k: v for k, v in settings.options.items()},
        "score": "(w0 - w_release) * qN / lr at each canary's coordinate" +
                 (" minus the noise regenerated from --seed" if settings.broken == "reproducible_noise" else ""),
        "seconds": time.time() - start,
        "meaning": "a lower bound that holds with the stated confidence if the run is (claimed epsilon, delta)-DP; "
                   "above the claim: evidence of a bug; below it: no proof of privacy",
    }
    write_json(report, output_dir / "audit.json")
    return report


def describe(report: dict[str, Any]) -> str:
    verdict = "EXCEEDS the claim: the guarantee does not hold" if report["bound_exceeds_claim"] else \
        "consistent with the claim"
    return (f"audit: epsilon lower bound {report['epsilon_lower_bound']:.3f} at {report['confidence']:.0%} "
            f"confidence vs claimed {report['claimed_epsilon']:.3g} (delta {report['delta']:g}): {verdict}\n"
            f"  {report['num_correct']} of {report['num_guesses']} guesses correct, {report['num_canaries']} canaries "
            f"({report['canaries_included']} included), sigma {report['mechanism']['noise_multiplier']:.3f}, "
            f"q {report['mechanism']['sample_rate']:.3f}, T {report['mechanism']['steps']}, "
            f"{report['seconds']:.0f} s" + (f"; broken variant {report['broken_variant']}"
                                            if report["broken_variant"] else ""))


