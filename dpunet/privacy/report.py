"""The privacy report of a training run: privacy_report.json and a human-readable card (Markdown).

It states exactly what is protected (the patient, add/remove adjacency, Poisson sampling), with which
mechanism (K patches averaged, flat per-patient clipping to C, Gaussian noise sigma*C once per step), what it
cost (epsilon by PRV, cross-checked by RDP), which touches of the data the guarantee covers and which it
does not. Non-finite numbers are written as the string "inf" (strict JSON has no infinity).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from dpunet.privacy.accounting import (
    CROSS_CHECK_ACCOUNTANT,
    PRIMARY_ACCOUNTANT,
    PrivacyLedger,
    accountant_info,
    epsilon_for_history,
)
from dpunet.privacy.dp_step import noise_std_on_mean_gradient
from dpunet.utils.files import write_json, write_text

REPORT_VERSION = 1
UNIT = "patient"
ADJACENCY = "add/remove one patient"
SAMPLING = "Poisson (each patient independently with probability q at every step; batch sizes vary)"
CLIPPING = "flat, per patient, all K patches averaged before clipping"
NOISE = "Gaussian N(0, sigma^2 C^2) added once per logical step to the sum of clipped gradients"
NORMALISATION = "noisy sum divided by the expected batch size q*N"
FINGERPRINT_COMPOSITION = "basic composition: training and fingerprint epsilons and deltas add"

RANDOMNESS = {
    "secret": "secret: Poisson sampling and noise seeded per step by a keyed hash of a 256-bit key drawn from the "
              "operating system's entropy for this session (never from --seed, never written to any file); "
              "hardened Gaussian sampling (Opacus' secure_mode construction)",
    "reproducible": "REPRODUCIBLE FROM THE SEED (--insecure-reproducible-noise): anyone who knows --seed can "
                    "regenerate the noise and the batches",
}
INSECURE_PREFIX = ("NOT PRIVATE against anyone who knows the seed (--insecure-reproducible-noise: noise and "
                   "sampling are derived from --seed). Only against an attacker without the seed: ")

NON_PRIVATE_STATEMENT = (
    "NOT PRIVATE: this model was trained without differential privacy (no noise); it may memorise and "
    "reveal its training patients. epsilon = inf."
)


def _json_number(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def as_float(x: float | str | None) -> float:
    """A number from a report ("inf" back to float('inf'))."""
    return float("nan") if x is None else float(x)


def build_privacy_report(
    *,
    num_patients: int,
    sample_rate: float,
    noise_multiplier: float,
    clip_norm: float | None,
    delta: float,
    target_epsilon: float,
    steps_planned: int,
    patches_per_patient: int,
    steps_taken: int | None = None,
    ledger: PrivacyLedger | None = None,
    ensemble_repetitions: int = 1,
    data_touches_covered: Sequence[str] = (),
    data_touches_not_covered: Sequence[str] = (),
    fingerprint_epsilon: float | None = None,
    fingerprint_delta: float = 0.0,
    public_data: Sequence[str] = (),
    caveats: Sequence[str] = (),
    assumptions: Sequence[str] = (),
    randomness: str = "secret",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect every field of the privacy report and compute the epsilons (PRV and RDP).

    The spent epsilon comes from `ledger` when given (its history of (sigma, q, steps)), else from
    `steps_taken` steps of (noise_multiplier, sample_rate). `ensemble_repetitions`: number of models each
    patient trains (4 for a 5-fold cross-validation ensemble); the reported epsilon composes them.
    `fingerprint_epsilon`: epsilon of a DP estimate of dataset statistics, added by basic composition; the
    statement then gives the total. `randomness`: "secret" or "reproducible" (the insecure mode, which the
    statement's first words flag). `assumptions`: what the guarantee takes as given (N public, the fold split).
    """
    if randomness not in RANDOMNESS:
        raise ValueError(f"randomness must be one of {sorted(RANDOMNESS)}, got {randomness!r}")
    if ledger is not None:
        history = ledger.history
        if steps_taken is not None and steps_taken != ledger.steps_taken:
            raise ValueError(f"steps_taken={steps_taken} but the ledger recorded {ledger.steps_taken} steps")
        steps_taken = ledger.steps_taken
    else:
        if steps_taken is None:
            raise ValueError("give steps_taken or a ledger")
        history = [(float(noise_multiplier), float(sample_rate), int(steps_taken))]
    if ensemble_repetitions < 1:
        raise ValueError(f"ensemble_repetitions must be >= 1, got {ensemble_repetitions}")

    private = clip_norm is not None and noise_multiplier > 0 and all(s > 0 for s, _, t in history if t > 0)
    reps = int(ensemble_repetitions)

    def eps(hist: list, accountant: str) -> float:
        if not private:
            return math.inf
        return epsilon_for_history([(s, q, t * reps) for s, q, t in hist], delta, accountant)

    planned_history = [(float(noise_multiplier), float(sample_rate), int(steps_planned))]
    epsilon = {acc: eps(history, acc) for acc in (PRIMARY_ACCOUNTANT, CROSS_CHECK_ACCOUNTANT)}
    expected_batch = float(sample_rate) * int(num_patients)

    spent_fingerprint = bool(fingerprint_epsilon or fingerprint_delta)
    headline_epsilon = epsilon[PRIMARY_ACCOUNTANT] + float(fingerprint_epsilon or 0.0)
    headline_delta = float(delta) + float(fingerprint_delta or 0.0)
    statement = NON_PRIVATE_STATEMENT
    if private:
        statement = (f"({_fmt(headline_epsilon)}, {headline_delta:g})-differential privacy per {UNIT} "
                     f"({ADJACENCY}), accounted with {PRIMARY_ACCOUNTANT.upper()}"
                     + (f", composed over {reps} models per patient" if reps > 1 else "")
                     + (f"; in total: DP-SGD epsilon {_fmt(epsilon[PRIMARY_ACCOUNTANT])} plus the DP fingerprint "
                        f"statistics' epsilon {_fmt(float(fingerprint_epsilon or 0.0))} (basic composition)"
                        if spent_fingerprint else ""))
        if randomness == "reproducible":
            statement = INSECURE_PREFIX + statement
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "private": private,
        "statement": statement,
        "randomness": RANDOMNESS[randomness] if private else "no noise",
        "unit": UNIT,
        "adjacency": ADJACENCY,
        "sampling": SAMPLING,
        "accountant": accountant_info(),
        "epsilon": {acc: _json_number(v) for acc, v in epsilon.items()},
        "epsilon_planned": {
            acc: _json_number(eps(planned_history, acc)) for acc in (PRIMARY_ACCOUNTANT, CROSS_CHECK_ACCOUNTANT)
        },
        "target_epsilon": _json_number(target_epsilon),
        "delta": float(delta),
        "num_patients": int(num_patients),
        "sample_rate": float(sample_rate),
        "expected_batch_size": expected_batch,
        "steps_planned": int(steps_planned),
        "steps_taken": int(steps_taken),
        "history": [[s, q, t] for s, q, t in history],
        "patches_per_patient": int(patches_per_patient),
        "noise_multiplier": float(noise_multiplier),
        "clip_norm": None if clip_norm is None else float(clip_norm),
        "clipping": CLIPPING if clip_norm is not None else "none",
        "noise": NOISE if private else "none",
        "normalisation": NORMALISATION,
        "noise_std_on_mean_gradient_in_units_of_C": (
            _json_number(noise_std_on_mean_gradient(noise_multiplier, expected_batch)) if expected_batch > 0 else None
        ),
        "ensemble_repetitions": reps,
        "data_touches_covered": list(data_touches_covered),
        "data_touches_not_covered": list(data_touches_not_covered),
        "public_data_and_priors": list(public_data),
        "assumptions": list(assumptions),
        "caveats": list(caveats),
    }
    if reps > 1 and private:
        report["epsilon_per_model"] = {
            acc: _json_number(epsilon_for_history(history, delta, acc))
            for acc in (PRIMARY_ACCOUNTANT, CROSS_CHECK_ACCOUNTANT)
        }
    if spent_fingerprint:  # None or 0: no DP release of dataset statistics
        report["fingerprint"] = {"epsilon": _json_number(fingerprint_epsilon or 0.0), "delta": float(fingerprint_delta)}
        report["total"] = {
            "epsilon": _json_number(headline_epsilon),
            "delta": headline_delta,
            "composition": FINGERPRINT_COMPOSITION,
        }
    if extra:
        report["extra"] = dict(extra)
    return report


def _fmt(x: float | str | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if isinstance(x, float):
        if math.isinf(x):
            return "∞"
        return f"{x:.4g}"
    return str(x)


def _bullets(items: Sequence[str]) -> list[str]:
    return [f"- {item}" for item in items] if items else ["- (none)"]


def render_privacy_report_markdown(report: dict[str, Any]) -> str:
    """The human-readable privacy card."""
    eps, planned = report["epsilon"], report["epsilon_planned"]
    acc = report["accountant"]
    rows = [
        ("Privacy unit", report["unit"]),
        ("Adjacency", report["adjacency"]),
        ("Sampling", report["sampling"]),
        ("Randomness", report.get("randomness", "-")),
        ("Accountant", f"{acc['primary'].upper()} (cross-check {acc['cross_check'].upper()}), "
                       f"{acc['library']} {acc['opacus_version']}"),
        (f"epsilon ({acc['primary'].upper()})", _fmt(eps[acc["primary"]])),
        (f"epsilon ({acc['cross_check'].upper()})", _fmt(eps[acc["cross_check"]])),
        ("Target epsilon", _fmt(report["target_epsilon"])),
        ("delta", f"{report['delta']:g}"),
        ("Patients N", str(report["num_patients"])),
        ("Sample rate q", f"{report['sample_rate']:g}"),
        ("Expected batch q*N", f"{report['expected_batch_size']:.4g}"),
        ("Steps T (taken / planned)", f"{report['steps_taken']} / {report['steps_planned']}"),
        (f"epsilon at planned T ({acc['primary'].upper()})", _fmt(planned[acc["primary"]])),
        ("Patches per patient K", str(report["patches_per_patient"])),
        ("Noise multiplier sigma", f"{report['noise_multiplier']:.4g}"),
        ("Clip norm C", _fmt(report["clip_norm"])),
        ("Clipping", report["clipping"]),
        ("Noise", report["noise"]),
        ("Normalisation", report["normalisation"]),
        ("Noise std on the mean gradient (units of C)", _fmt(report["noise_std_on_mean_gradient_in_units_of_C"])),
        ("Models per patient (ensemble)", str(report["ensemble_repetitions"])),
    ]
    if "epsilon_per_model" in report:
        per_model = report["epsilon_per_model"][acc["primary"]]
        rows.append((f"epsilon per model ({acc['primary'].upper()})", _fmt(per_model)))
    if "fingerprint" in report:
        rows.append(("Fingerprint (dataset statistics) epsilon", _fmt(report["fingerprint"]["epsilon"])))
        rows.append(
            ("Total epsilon / delta", f"{_fmt(report['total']['epsilon'])} / {report['total']['delta']:g} "
                                      f"({report['total']['composition']})")
        )
    lines = ["# Privacy report", "", f"**{report['statement']}**", "", "| Field | Value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    lines += ["", "## Data touches covered by the guarantee", *_bullets(report["data_touches_covered"])]
    lines += ["", "## Data touches NOT covered by the guarantee", *_bullets(report["data_touches_not_covered"])]
    lines += ["", "## Public data and priors used", *_bullets(report["public_data_and_priors"])]
    lines += ["", "## Assumptions of the guarantee", *_bullets(report.get("assumptions", []))]
    lines += ["", "## Caveats", *_bullets(report["caveats"]), ""]
    return "\n".join(lines)


def write_privacy_report(
    report: dict[str, Any], json_path: str | os.PathLike, markdown_path: str | os.PathLike | None = None
) -> None:
    """Write privacy_report.json and (next to it by default) privacy_report.md, both atomically."""
    write_json(report, json_path)
    md = markdown_path if markdown_path is not None else os.path.splitext(os.fspath(json_path))[0] + ".md"
    write_text(render_privacy_report_markdown(report), md)


def key_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The flat figures a results table shows beside the metrics (epsilon by both accountants, delta, sigma,
    q, steps taken, C); figures the report lacks are left out (C is None, not absent, for non-private runs)."""
    eps = report.get("epsilon") if isinstance(report.get("epsilon"), dict) else {}
    sources = {
        "epsilon_prv": (eps, PRIMARY_ACCOUNTANT),
        "epsilon_rdp": (eps, CROSS_CHECK_ACCOUNTANT),
        "delta": (report, "delta"),
        "noise_multiplier": (report, "noise_multiplier"),
        "sample_rate": (report, "sample_rate"),
        "steps": (report, "steps_taken"),
        "clip_norm": (report, "clip_norm"),
    }
    return {name: block[key] for name, (block, key) in sources.items() if key in block}
