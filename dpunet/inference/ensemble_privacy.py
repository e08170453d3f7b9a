"""The privacy guarantee of an ensemble of fold models (OUT/privacy_note.json and privacy_note.md).

Releasing (or querying) several models releases every one of them, so a patient's privacy loss is the
composition of the DP-SGD trainings that used that patient. With the cross-validation folds 0..4 a patient
is in the training set of 4 of the 5 models; which models exactly is read from splits_final.json (the max
over patients of the number of chosen models whose training set holds them).

How the numbers are computed: the steps of all those trainings, each fold's (sigma, q, T) from its
privacy_report.json, are composed by the same accountants as a single training (`accounting.
epsilon_for_repeated_training` when the folds share (sigma, q, T), else `accounting.epsilon_for_history` on
the concatenated histories). The accountants compose privacy-loss distributions (PRV) or Renyi divergences
(RDP) of all r*T steps and convert to (epsilon, delta) once at the end, so the ensemble's epsilon holds at
the folds' own delta: delta is NOT multiplied by r. Adding the per-model (epsilon_i, delta) pairs (basic
composition) would give sum(epsilon_i) at r*delta, a looser bound that the note also shows for comparison.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpunet.dataset.msd import load_task
from dpunet.privacy.accounting import (CROSS_CHECK_ACCOUNTANT, PRIMARY_ACCOUNTANT, epsilon_for_history,
                                       epsilon_for_repeated_training)
from dpunet.utils.errors import DpunetError
from dpunet.utils.files import read_json_file, write_json, write_text

NOTE_VERSION = 1
ACCOUNTANTS = (PRIMARY_ACCOUNTANT, CROSS_CHECK_ACCOUNTANT)
UNIT = "patient"
ADJACENCY = "add/remove one patient"
DELTA_EXPLANATION = (
    "The accountant composes all steps of all trainings a patient was in (privacy-loss distributions for PRV, "
    "Renyi divergences for RDP) and converts the composition to (epsilon, delta) once, so the ensemble's "
    "epsilon holds at the models' own delta; delta is not multiplied by the number of models. Basic composition "
    "of the per-model guarantees (epsilons add, deltas add) is shown for comparison: it is looser."
)
SPLIT_CAVEAT = (
    "The count of models per patient treats the fold assignment (splits_final.json) as fixed. Under add/remove "
    "adjacency the split of the other patients could change when one patient is added; 'epsilon if in every "
    "model' is the bound that does not rely on the split."
)

PATIENT_HASH_NOTE = (
    "Folds are assigned by patient_hash, a function of each patient's own id: any patient, present or added, is in "
    "every chosen model except the one validating its own fold, whatever the other patients. The count of models "
    "per patient is taken over all folds a patient could fall in, so it does not assume the split fixed."
)
PATIENT_HASH_SOURCE = "patient_hash folds (worst case over the fold a patient can fall in)"

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class ModelPrivacy:
    """One fold model's DP-SGD training, as recorded in its privacy_report.json."""

    fold: str
    private: bool
    history: tuple[tuple[float, float, int], ...]  # (noise multiplier sigma, sample rate q, steps T)
    delta: float | None
    epsilon_reported: dict[str, float | None] = field(default_factory=dict)
    source: str = ""
    fingerprint_epsilon: float = 0.0
    fingerprint_delta: float = 0.0


def _number(value: Any) -> float | None:
    """A number from a report ("inf" -> inf, None stays None)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_model_privacy(fold: str, report_path: str | Path) -> ModelPrivacy:
    """Read a fold's privacy_report.json (the trainer's report, or a flat one with top-level
    noise_multiplier, sample_rate, steps, delta, epsilon_prv, epsilon_rdp, clip_norm)."""
    report_path = Path(report_path)
    report = read_json_file(report_path, f"privacy report (the privacy of fold {fold}'s model is unknown)")
    if not isinstance(report, dict):
        raise DpunetError(f"{report_path}: expected a JSON object")
    try:
        if report.get("history"):
            history = tuple((float(s), float(q), int(t)) for s, q, t in report["history"])
        else:
            steps = report.get("steps_taken", report.get("steps"))
            history = ((float(report["noise_multiplier"]), float(report["sample_rate"]), int(steps)),)
    except (KeyError, TypeError, ValueError) as e:
        raise DpunetError(f"{report_path}: no usable (noise_multiplier, sample_rate, steps) ({e!r})") from None
    epsilon = report.get("epsilon")
    reported = ({acc: _number(epsilon.get(acc)) for acc in ACCOUNTANTS} if isinstance(epsilon, dict)
                else {acc: _number(report.get(f"epsilon_{acc}")) for acc in ACCOUNTANTS})
    if "private" in report:
        private = bool(report["private"])
    else:
        private = report.get("clip_norm") is not None and all(s > 0 for s, _, t in history if t > 0)
    delta = _number(report.get("delta"))
    if private and not (delta is not None and 0 < delta < 1):
        raise DpunetError(f"{report_path}: a private model needs a delta in (0, 1), found {report.get('delta')!r}")
    fingerprint = report.get("fingerprint") or {}
    return ModelPrivacy(fold=str(fold), private=private, history=history, delta=delta, epsilon_reported=reported,
                        source=str(report_path), fingerprint_epsilon=_number(fingerprint.get("epsilon")) or 0.0,
                        fingerprint_delta=_number(fingerprint.get("delta")) or 0.0)


def case_to_patient_map(task_folder: str | Path) -> dict[str, str]:
    """case id -> patient id from a task's dataset.json (cases without "patient_id" are their own patient)."""
    task = load_task(task_folder)
    return {c.case_id: c.patient_id for c in task.training}


def training_membership(splits: Sequence[Mapping[str, Sequence[str]]], folds: Sequence[str],
                        case_to_patient: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """patient id -> the chosen folds whose training set holds (one of) the patient's cases."""
    if not splits:
        raise DpunetError("splits_final.json holds no folds")
    all_cases = sorted(set(splits[0]["train"]) | set(splits[0]["val"]))
    membership: dict[str, set[str]] = {case_to_patient.get(c, c): set() for c in all_cases}
    for fold in folds:
        if str(fold) == "all":  # the 'all' model trains on every case (as dpunet_train does)
            train = all_cases
        elif str(fold).isdigit() and int(fold) < len(splits):
            train = splits[int(fold)]["train"]
        else:
            raise DpunetError(f"fold {fold} does not exist in splits_final.json (0..{len(splits) - 1} or 'all')")
        for case in train:
            membership.setdefault(case_to_patient.get(case, case), set()).add(str(fold))
    return {p: frozenset(f) for p, f in membership.items()}


def _composed_epsilons(models: Sequence[ModelPrivacy], delta: float) -> dict[str, float]:
    """Epsilon of the composition of the given models' trainings, per accountant."""
    histories = [list(m.history) for m in models]
    if not models:
        return {acc: 0.0 for acc in ACCOUNTANTS}
    if all(h == histories[0] for h in histories) and len(histories[0]) == 1:
        sigma, q, steps = histories[0][0]
        return {acc: epsilon_for_repeated_training(sigma, q, steps, len(models), delta, acc) for acc in ACCOUNTANTS}
    combined: History = [entry for h in histories for entry in h]
    return {acc: epsilon_for_history(combined, delta, acc) for acc in ACCOUNTANTS}


def _json_number(x: float) -> float | str:
    return "inf" if math.isinf(x) else float(x)


def _fmt(x: float | str | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    return "∞" if math.isinf(x) else f"{x:.4g}"


def patient_hash_membership(folds: Sequence[str], num_folds: int) -> dict[str, frozenset[str]]:
    """Membership under patient_hash folds for every fold a patient can fall in (fold 'all' trains everyone)."""
    return {f"any patient of fold {k}": frozenset(f for f in folds if f != str(k)) for k in range(num_folds)}


def ensemble_privacy_note(models: Sequence[ModelPrivacy], membership: Mapping[str, frozenset[str]] | None,
                          context: Mapping[str, Any] | None = None,
                          membership_source: str = "splits_final.json") -> dict[str, Any]:
    """The privacy note of predictions made by the ensemble of `models`.

    `membership`: patient -> folds whose training held the patient (from `training_membership`); None when
    the splits are not available, in which case every patient is assumed to be in every model."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    folds = [m.fold for m in models]
    by_fold = {m.fold: m for m in models}
    note: dict[str, Any] = {
        "version": NOTE_VERSION,
        **dict(context or {}),
        "folds": folds,
        "num_models": len(models),
        "unit": UNIT,
        "adjacency": ADJACENCY,
        "models": [{"fold": m.fold, "private": m.private, "history": [list(h) for h in m.history],
                    "delta": m.delta, "epsilon_reported": {k: _json_number(v) if v is not None else None
                                                           for k, v in m.epsilon_reported.items()},
                    "privacy_report": m.source} for m in models],
        "notes": [],
    }
    if membership is None:
        patterns = {frozenset(folds)}
        note["membership_source"] = "splits not available: every patient assumed to be in every model"
        note["models_per_patient_histogram"] = {}
    else:
        patterns = set(membership.values()) or {frozenset()}
        note["membership_source"] = membership_source
        counts = Counter(len(p) for p in membership.values())
        note["models_per_patient_histogram"] = {str(k): counts[k] for k in sorted(counts)}
    max_models = max(len(p) for p in patterns)
    note["max_models_per_patient"] = max_models

    non_private = [m.fold for m in models if not m.private]
    if non_private:
        note.update({
            "private": False,
            "epsilon": {acc: "inf" for acc in ACCOUNTANTS},
            "delta": None,
            "statement": (f"NOT PRIVATE: the model(s) of fold(s) {', '.join(non_private)} were trained without "
                          f"differential privacy; the ensemble may reveal their training patients. epsilon = inf."),
        })
        return note

    deltas = sorted({float(m.delta) for m in models})
    delta = deltas[0]
    if len(deltas) > 1:
        note["notes"].append(f"the models were trained for different deltas {deltas}; every epsilon here is "
                             f"computed at the smallest, {delta:g}")
    for entry, m in zip(note["models"], models):
        entry["epsilon_at_delta"] = {k: _json_number(v) for k, v in _composed_epsilons([m], delta).items()}

    # the guarantee per patient is the composition of the models that patient trained; the worst patient bounds all
    per_pattern: dict[frozenset[str], dict[str, float]] = {}
    for pattern in patterns:
        per_pattern[pattern] = _composed_epsilons([by_fold[f] for f in folds if f in pattern], delta)
    epsilon = {acc: max(v[acc] for v in per_pattern.values()) for acc in ACCOUNTANTS}
    worst = max(per_pattern, key=lambda p: (per_pattern[p][PRIMARY_ACCOUNTANT], len(p)))
    worst_models = [f for f in folds if f in worst]
    identical = len({m.history for m in models}) == 1 and len(models[0].history) == 1
    note.update({
        "private": True,
        "epsilon": {acc: _json_number(v) for acc, v in epsilon.items()},
        "delta": delta,
        "worst_case_models": worst_models,
        "computed_with": ("accounting.epsilon_for_repeated_training(sigma, q, T, repetitions, delta)" if identical
                          else "accounting.epsilon_for_history(concatenated (sigma, q, T) histories, delta)"),
        "delta_explanation": DELTA_EXPLANATION,
    })
    per_model_primary = [_composed_epsilons([by_fold[f]], delta)[PRIMARY_ACCOUNTANT] for f in worst_models]
    note["basic_composition_bound"] = {
        "epsilon": _json_number(sum(per_model_primary)),
        "delta": delta * len(worst_models),
        "explanation": "sum of the per-model epsilons (PRV) of the worst-case patient's models, deltas added",
    }
    if len(models) > 1:
        if len(worst) < len(models):
            every = _composed_epsilons(list(models), delta)
            note["epsilon_if_in_every_model"] = {acc: _json_number(v) for acc, v in every.items()}
        else:
            note["epsilon_if_in_every_model"] = dict(note["epsilon"])
        note["notes"].append(PATIENT_HASH_NOTE if membership_source == PATIENT_HASH_SOURCE else SPLIT_CAVEAT)

    fingerprints = {(m.fingerprint_epsilon, m.fingerprint_delta) for m in models}
    fp_eps, fp_delta = max(fingerprints)
    if len(fingerprints) > 1:
        note["notes"].append("the models report different fingerprint epsilons; the largest is used")
    if fp_eps > 0:
        # the DP dataset statistics were computed once, before the folds were split: counted once
        note["fingerprint"] = {"epsilon": fp_eps, "delta": fp_delta}
        note["total"] = {"epsilon": _json_number(epsilon[PRIMARY_ACCOUNTANT] + fp_eps), "delta": delta + fp_delta,
                         "composition": "basic composition of the ensemble and the DP dataset statistics "
                                        "(computed once, shared by all folds)"}

    if len(models) == 1:
        note["statement"] = (f"({_fmt(epsilon[PRIMARY_ACCOUNTANT])}, {delta:g})-differential privacy per {UNIT} "
                             f"({ADJACENCY}) for the single model of fold {folds[0]} (PRV; RDP "
                             f"{_fmt(epsilon[CROSS_CHECK_ACCOUNTANT])}).")
    else:
        note["statement"] = (
            f"({_fmt(epsilon[PRIMARY_ACCOUNTANT])}, {delta:g})-differential privacy per {UNIT} ({ADJACENCY}) for "
            f"the ensemble of the {len(models)} models of folds {', '.join(folds)}: each training patient was in "
            f"up to {max_models} of them, and those trainings compose (PRV; RDP "
            f"{_fmt(epsilon[CROSS_CHECK_ACCOUNTANT])}).")
    return note


def render_privacy_note_markdown(note: Mapping[str, Any]) -> str:
    """The note as a short Markdown card."""
    lines = ["# Privacy note for these predictions", "", f"**{note['statement']}**", ""]
    context = [(k, note[k]) for k in ("task", "configuration", "arch", "epsilon_target") if k in note]
    rows = context + [("Folds (models)", ", ".join(note["folds"])),
                      ("Privacy unit", note["unit"]), ("Adjacency", note["adjacency"]),
                      ("Models per patient (max)", note["max_models_per_patient"]),
                      ("Patients by number of models", ", ".join(f"{k}: {v}" for k, v in
                                                                note["models_per_patient_histogram"].items())),
                      ("Membership from", note["membership_source"])]
    if note["private"]:
        rows += [("Ensemble epsilon (PRV)", _fmt(note["epsilon"][PRIMARY_ACCOUNTANT])),
                 ("Ensemble epsilon (RDP)", _fmt(note["epsilon"][CROSS_CHECK_ACCOUNTANT])),
                 ("delta", f"{note['delta']:g}"),
                 ("Worst-case patient's models", ", ".join(note["worst_case_models"])),
                 ("Computed with", note["computed_with"]),
                 ("Basic composition (looser)", f"{_fmt(note['basic_composition_bound']['epsilon'])} at delta "
                                                f"{note['basic_composition_bound']['delta']:g}")]
        if "epsilon_if_in_every_model" in note:
            rows.append(("Epsilon if in every model (PRV)",
                         _fmt(note["epsilon_if_in_every_model"][PRIMARY_ACCOUNTANT])))
        if "total" in note:
            rows.append(("Total with DP dataset statistics", f"{_fmt(note['total']['epsilon'])} at delta "
                                                             f"{note['total']['delta']:g}"))
    lines += ["| Field | Value |", "|---|---|"] + [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    lines += ["", "## Models", "", "| Fold | sigma, q, T | delta | epsilon PRV | epsilon RDP |", "|---|---|---|---|---|"]
    for m in note["models"]:
        eps = m.get("epsilon_at_delta") or m["epsilon_reported"]
        hist = "; ".join(f"{s:.4g}, {q:.4g}, {t}" for s, q, t in m["history"])
        lines.append(f"| {m['fold']} | {hist} | {m['delta']} | {_fmt(eps.get(PRIMARY_ACCOUNTANT))} | "
                     f"{_fmt(eps.get(CROSS_CHECK_ACCOUNTANT))} |")
    if note["private"]:
        lines += ["", "## About delta", "", note["delta_explanation"]]
    if note["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in note["notes"]]
    return "\n".join(lines) + "\n"


def write_privacy_note(note: Mapping[str, Any], output_folder: str | Path) -> tuple[Path, Path]:
    """OUT/privacy_note.json and OUT/privacy_note.md, both atomically."""
    output_folder = Path(output_folder)
    json_path, md_path = output_folder / "privacy_note.json", output_folder / "privacy_note.md"
    write_json(dict(note), json_path)
    write_text(render_privacy_note_markdown(note), md_path)
    return json_path, md_path
