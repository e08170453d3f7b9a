"""Accounting against an independent oracle: Google's dp-accounting (PLD for PRV, RDP for RDP)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

from dpunet.privacy.accounting import (
    RDP_ORDERS,
    PrivacyLedger,
    accountant_info,
    calibrate_noise_multiplier,
    epsilon_for_history,
    epsilon_for_repeated_training,
    epsilon_spent,
)
from dpunet.utils.errors import DpunetError

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import dp_event, pld, rdp  # noqa: E402

DELTA = 1e-5

# (q, sigma, T): the design brief's feasibility points (N=41/131/484 at q=0.25, T=250, eps 8 and 1),
# the Opacus recipe (q=0.32, T=300), full batch, small-q long runs
CASES = [
    (0.25, 2.67, 250),
    (0.25, 16.1, 250),
    (0.25, 2.42, 250),
    (0.32, 3.0, 300),
    (1.0, 5.0, 10),
    (0.05, 1.0, 1000),
    (0.01, 0.9, 3000),
]


def _oracle_event(q: float, sigma: float, steps: int):
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def oracle_pld(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(_oracle_event(q, sigma, steps))
    return acc.get_epsilon(delta)


def oracle_rdp(q: float, sigma: float, steps: int, delta: float, orders) -> float:
    acc = rdp.RdpAccountant(list(orders), neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(_oracle_event(q, sigma, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q,sigma,steps", CASES)
def test_prv_matches_dp_accounting_pld(q, sigma, steps):
    ours = epsilon_spent(sigma, q, steps, DELTA, "prv")
    theirs = oracle_pld(q, sigma, steps, DELTA)
    assert ours == pytest.approx(theirs, rel=0.01)
    # PRV reports an upper bound; it must not be below the (tight) PLD value by more than PLD's own error
    assert ours >= theirs * (1 - 1e-3)


@pytest.mark.parametrize("q,sigma,steps", CASES)
def test_rdp_matches_dp_accounting_rdp(q, sigma, steps):
    ours = epsilon_spent(sigma, q, steps, DELTA, "rdp")
    theirs = oracle_rdp(q, sigma, steps, DELTA, RDP_ORDERS)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_rdp_integer_orders_agree_exactly():
    # on integer orders both libraries evaluate the same closed-form binomial sum: any disagreement is a bug
    orders = [o for o in RDP_ORDERS if float(o).is_integer()]
    from opacus.accountants import RDPAccountant

    for q, sigma, steps in CASES:
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        expected = oracle_rdp(q, sigma, steps, DELTA, orders)
        assert acc.get_epsilon(DELTA, alphas=orders) == pytest.approx(expected, rel=1e-9)


@pytest.mark.filterwarnings("ignore:Optimal order")  # single-order accountants: expected
def test_fractional_order_rdp_matches_numerical_integral():
    """Where Opacus and dp-accounting differ (fractional orders, small sigma) Opacus equals the definition
    A_alpha = E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2 s^2)))^alpha]; dp-accounting's series is an upper bound."""
    from opacus.accountants.analysis.rdp import compute_rdp

    for q, sigma, alpha in [(0.32, 1.2, 2.5), (0.5, 0.7, 1.8), (0.25, 2.67, 3.5)]:
        def integrand(z, q=q, sigma=sigma, alpha=alpha):
            likelihood_ratio = (1 - q) + q * np.exp((2 * z - 1) / (2 * sigma**2))
            return stats.norm.pdf(z, 0, sigma) * likelihood_ratio**alpha

        a_alpha, _ = integrate.quad(integrand, -60, 60, limit=400, points=[0.0, 0.5, 1.0])
        exact = math.log(a_alpha) / (alpha - 1)
        assert compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0] == pytest.approx(exact, rel=1e-7)
        # dp-accounting's bound at this single order is not tighter than the exact value
        from opacus.accountants import RDPAccountant

        ours = RDPAccountant()
        ours.history = [(sigma, q, 1)]
        assert oracle_rdp(q, sigma, 1, DELTA, [alpha]) >= ours.get_epsilon(DELTA, alphas=[alpha]) * (1 - 1e-9)


def test_design_brief_feasibility_guide():
    # brief: N=41, q=0.25, T=250, RDP: noise std on the mean gradient 0.26 C at eps 8 and 1.57 C at eps 1
    for eps, expected in [(8.0, 0.26), (1.0, 1.57)]:
        sigma = calibrate_noise_multiplier(eps, DELTA, 0.25, 250, accountant="rdp")
        assert sigma / (0.25 * 41) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("accountant,target", [("prv", 8.0), ("prv", 1.0), ("rdp", 4.0)])
def test_calibration_round_trip(accountant, target):
    tol = 0.01
    sigma = calibrate_noise_multiplier(target, DELTA, 0.25, 250, accountant=accountant, epsilon_tolerance=tol)
    spent = epsilon_spent(sigma, 0.25, 250, DELTA, accountant)
    assert spent <= target
    assert target - spent <= 2 * tol  # bisection tolerance plus the PRV estimate's own error
    # a slightly smaller sigma must overspend: the calibrated sigma is (nearly) minimal
    assert epsilon_spent(sigma * 0.98, 0.25, 250, DELTA, accountant) > target - tol


def test_calibration_of_infinite_epsilon_is_non_private():
    assert calibrate_noise_multiplier(math.inf, DELTA, 0.25, 250) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0.01, delta=DELTA, sample_rate=0.25, steps=250), "cannot be reached"),
        (dict(epsilon=0.0, delta=DELTA, sample_rate=0.25, steps=250), "epsilon"),
        (dict(epsilon=-1.0, delta=DELTA, sample_rate=0.25, steps=250), "epsilon"),
        (dict(epsilon=math.nan, delta=DELTA, sample_rate=0.25, steps=250), "epsilon"),
        (dict(epsilon=1.0, delta=0.0, sample_rate=0.25, steps=250), "delta"),
        (dict(epsilon=1.0, delta=1.0, sample_rate=0.25, steps=250), "delta"),
        (dict(epsilon=1.0, delta=DELTA, sample_rate=0.0, steps=250), "sample rate"),
        (dict(epsilon=1.0, delta=DELTA, sample_rate=1.5, steps=250), "sample rate"),
        (dict(epsilon=1.0, delta=DELTA, sample_rate=0.25, steps=0), "steps"),
        (dict(epsilon=1.0, delta=DELTA, sample_rate=0.25, steps=2.5), "steps"),
        (dict(epsilon=1.0, delta=DELTA, sample_rate=0.25, steps=250, accountant="gdp"), "accountant"),
        # needs sigma ~ 6: refused below the caller's maximum
        (dict(epsilon=1.0, delta=DELTA, sample_rate=0.25, steps=50, max_noise_multiplier=3.0), "cannot be reached"),
    ],
)
def test_impossible_requests_raise(kwargs, match):
    with pytest.raises(DpunetError, match=match):
        calibrate_noise_multiplier(**kwargs)


def test_epsilon_spent_edge_cases():
    assert epsilon_spent(1.0, 0.25, 0, DELTA) == 0.0
    assert math.isinf(epsilon_spent(0.0, 0.25, 10, DELTA))
    assert math.isinf(epsilon_spent(0.0, 0.25, 10, DELTA, "rdp"))
    with pytest.raises(DpunetError):
        epsilon_spent(-1.0, 0.25, 10, DELTA)
    # more steps or less noise never spend less
    assert epsilon_spent(2.0, 0.25, 200, DELTA) < epsilon_spent(2.0, 0.25, 400, DELTA)
    assert epsilon_spent(3.0, 0.25, 200, DELTA) < epsilon_spent(2.0, 0.25, 200, DELTA)


def test_repeated_training_composes_like_more_steps():
    # 5-fold ensemble: each patient trains 4 models of 250 steps = 1000 steps of the same mechanism
    ours = epsilon_for_repeated_training(2.67, 0.25, 250, 4, DELTA, "prv")
    assert ours == pytest.approx(oracle_pld(0.25, 2.67, 1000, DELTA), rel=0.01)
    assert ours > epsilon_spent(2.67, 0.25, 250, DELTA, "prv")
    once = epsilon_for_repeated_training(2.67, 0.25, 250, 1, DELTA, "rdp")
    assert once == epsilon_spent(2.67, 0.25, 250, DELTA, "rdp")


def test_heterogeneous_history_matches_oracle():
    history = [(2.0, 0.25, 100), (4.0, 0.1, 300)]
    ours = epsilon_for_history(history, DELTA, "prv")
    acc = pld.PLDAccountant()
    for q_sigma_t in history:
        sigma, q, t = q_sigma_t
        acc.compose(_oracle_event(q, sigma, t))
    assert ours == pytest.approx(acc.get_epsilon(DELTA), rel=0.01)


def test_ledger_tracks_steps_and_round_trips_state():
    ledger = PrivacyLedger(noise_multiplier=2.67, sample_rate=0.25)
    assert ledger.steps_taken == 0 and ledger.epsilon(DELTA) == 0.0
    for _ in range(120):
        ledger.step()
    ledger.step(num_steps=30)
    assert ledger.steps_taken == 150
    assert ledger.history == [(2.67, 0.25, 150)]  # compressed
    assert ledger.epsilon(DELTA, "prv") == pytest.approx(epsilon_spent(2.67, 0.25, 150, DELTA, "prv"), rel=1e-12)

    state = json.loads(json.dumps(ledger.state_dict()))  # must survive JSON (the checkpoint)
    resumed = PrivacyLedger.from_state_dict(state)
    assert resumed.history == ledger.history and resumed.steps_taken == 150
    assert resumed.noise_multiplier == 2.67 and resumed.sample_rate == 0.25
    resumed.step(num_steps=100)
    # split by the resume or not, 250 steps spend the same epsilon
    assert resumed.epsilon(DELTA, "prv") == epsilon_spent(2.67, 0.25, 250, DELTA, "prv")
    with pytest.raises(DpunetError):
        PrivacyLedger().load_state_dict({"version": 1, "history": [[1.0, 2.0, 3]], "noise_multiplier": None,
                                         "sample_rate": None})


def test_ledger_refuses_to_exceed_budget(monkeypatch):
    sigma = calibrate_noise_multiplier(4.0, DELTA, 0.25, 100, accountant="rdp")
    ledger = PrivacyLedger(sigma, 0.25)
    assert not ledger.would_exceed(4.0, DELTA, extra_steps=100, accountant="rdp")
    # per-step checks inside the verified plan need no accountant run (trainers ask every step)
    import dpunet.privacy.accounting as accounting

    with monkeypatch.context() as m:
        m.setattr(accounting, "epsilon_for_history", lambda *a, **k: pytest.fail("accountant re-run"))
        probe = PrivacyLedger(sigma, 0.25)
        probe._within_budget = ledger._within_budget
        for _ in range(3):
            assert not probe.would_exceed(4.0, DELTA, accountant="rdp")
            probe.step()
    ledger.step(num_steps=100)
    assert ledger.epsilon(DELTA, "rdp") <= 4.0
    assert not ledger.would_exceed(4.0, DELTA, extra_steps=0, accountant="rdp")
    assert ledger.would_exceed(4.0, DELTA, extra_steps=1, accountant="rdp")
    assert not ledger.would_exceed(math.inf, DELTA, extra_steps=10_000, accountant="rdp")
    assert ledger.epsilon(DELTA, "rdp", repetitions=4) > ledger.epsilon(DELTA, "rdp")


def test_accountant_info_records_versions():
    import opacus

    info = accountant_info()
    assert info["primary"] == "prv" and info["cross_check"] == "rdp"
    assert info["opacus_version"] == opacus.__version__


# ----------------------------------------------------------------------------------------- the report
from dpunet.privacy.report import (  # noqa: E402
    NON_PRIVATE_STATEMENT,
    as_float,
    build_privacy_report,
    render_privacy_report_markdown,
    write_privacy_report,
)

REPORT_FIELDS = [
    "unit", "adjacency", "sampling", "accountant", "epsilon", "target_epsilon", "delta", "num_patients",
    "sample_rate", "expected_batch_size", "steps_planned", "steps_taken", "patches_per_patient",
    "noise_multiplier", "clip_norm", "clipping", "data_touches_covered", "data_touches_not_covered",
    "public_data_and_priors", "caveats",
]


def _report_kwargs(**changes):
    kwargs = dict(
        num_patients=41, sample_rate=0.25, noise_multiplier=2.67, clip_norm=1.0, delta=DELTA, target_epsilon=8.0,
        steps_planned=250, steps_taken=250, patches_per_patient=2,
        data_touches_covered=["patch gradients of training patients (DP-SGD)"],
        data_touches_not_covered=["image header metadata (spacing, shape): declared public"],
        public_data=["CT window prior"], caveats=["hyperparameters were tuned on this dataset"],
    )
    kwargs.update(changes)
    return kwargs


def test_report_has_every_field_and_oracle_epsilons(tmp_path):
    report = build_privacy_report(**_report_kwargs())
    for field in REPORT_FIELDS:
        assert field in report, field
    assert report["unit"] == "patient" and report["adjacency"] == "add/remove one patient"
    assert "Poisson" in report["sampling"] and report["private"] is True
    assert report["clipping"] == "flat, per patient, all K patches averaged before clipping"
    assert report["expected_batch_size"] == pytest.approx(10.25)
    assert report["epsilon"]["prv"] == pytest.approx(oracle_pld(0.25, 2.67, 250, DELTA), rel=0.01)
    assert report["epsilon"]["rdp"] == pytest.approx(oracle_rdp(0.25, 2.67, 250, DELTA, RDP_ORDERS), rel=0.01)
    assert report["accountant"]["opacus_version"]
    write_privacy_report(report, tmp_path / "privacy_report.json")
    loaded = json.loads((tmp_path / "privacy_report.json").read_text())  # strict JSON: no Infinity/NaN
    assert loaded["epsilon"] == report["epsilon"]
    card = (tmp_path / "privacy_report.md").read_text()
    for text in ["patient", "add/remove one patient", "Poisson", "PRV", "RDP", "CT window prior",
                 "hyperparameters were tuned", "image header metadata", "averaged before clipping", "10.25"]:
        assert text in card, text


def test_report_uses_ledger_and_composes_ensembles_and_fingerprint():
    ledger = PrivacyLedger(2.67, 0.25)
    ledger.step(num_steps=100)
    report = build_privacy_report(**_report_kwargs(steps_taken=None), ledger=ledger, ensemble_repetitions=4,
                                  fingerprint_epsilon=0.5, fingerprint_delta=1e-6)
    assert report["steps_taken"] == 100
    assert report["epsilon"]["prv"] == pytest.approx(epsilon_spent(2.67, 0.25, 400, DELTA, "prv"), rel=1e-9)
    assert report["epsilon_per_model"]["prv"] == pytest.approx(epsilon_spent(2.67, 0.25, 100, DELTA, "prv"), rel=1e-9)
    assert report["epsilon_planned"]["prv"] == pytest.approx(epsilon_spent(2.67, 0.25, 1000, DELTA, "prv"), rel=1e-9)
    assert report["total"]["epsilon"] == pytest.approx(report["epsilon"]["prv"] + 0.5)
    assert report["total"]["delta"] == pytest.approx(DELTA + 1e-6)
    assert "basic composition" in report["total"]["composition"]
    assert "4 models" in report["statement"]
    with pytest.raises(ValueError):
        build_privacy_report(**_report_kwargs(steps_taken=99), ledger=ledger)


def test_non_private_report_says_so():
    report = build_privacy_report(**_report_kwargs(noise_multiplier=0.0, clip_norm=None, target_epsilon=math.inf))
    assert report["private"] is False and report["statement"] == NON_PRIVATE_STATEMENT
    assert report["epsilon"] == {"prv": "inf", "rdp": "inf"} and report["target_epsilon"] == "inf"
    assert math.isinf(as_float(report["epsilon"]["prv"]))
    assert report["clipping"] == "none"
    json.dumps(report, allow_nan=False)
    assert "NOT PRIVATE" in render_privacy_report_markdown(report)
