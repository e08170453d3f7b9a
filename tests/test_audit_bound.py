"""One-run audit bound (dpunet.privacy.audit_bound) against independent oracles: closed forms, a literal
re-implementation of the paper's formula, Monte Carlo on exactly-DP mechanisms and the Gaussian mechanism."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom, norm

from dpunet.privacy.audit_bound import (AuditOutcome, audit_outcome, epsilon_lower_bound, guess_from_scores,
                                        one_run_p_value)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The (eps, delta) bound of arXiv:2305.08846 (Sec. 5) written out term by term, sharing no code."""
    q = math.exp(eps) / (1.0 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1.0 - q) ** (r - k) for k in range(r + 1)]
    tail = math.fsum(pmf[v:])
    worst = max((math.fsum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=0.0)
    return min(tail + 2 * m * delta * worst, 1.0)


# --- guesses -------------------------------------------------------------------------------------------------

def test_guesses_take_extremes_and_break_ties_by_position():
    scores = np.array([0.5, 3.0, -1.0, 3.0, 0.5, 2.0, -1.0])
    g = guess_from_scores(scores, num_positive=2, num_negative=1)
    np.testing.assert_array_equal(g, [0, 1, -1, 1, 0, 0, 0])  # tied lowest: the earlier index counts as lower
    g = guess_from_scores(scores, num_positive=1, num_negative=2)
    np.testing.assert_array_equal(g, [0, 0, -1, 1, 0, 0, -1])  # tied highest: the later index counts as higher
    np.testing.assert_array_equal(guess_from_scores(scores, 0, 0), np.zeros(7))
    assert set(guess_from_scores(scores, 4, 3)) == {-1, 1}


@pytest.mark.parametrize("args", [(np.zeros(3), 2, 2), (np.zeros(3), -1, 0), (np.array([0.0, np.nan]), 1, 0),
                                  (np.zeros((2, 2)), 1, 1), (np.zeros(3), 1.0, 0)])
def test_guesses_refuse_invalid_input(args):
    with pytest.raises(ValueError):
        guess_from_scores(*args)


# --- the bound ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_perfect_guesses_match_closed_form_and_grow(confidence):
    # P[Binom(r, p) >= r] = p^r <= 1 - confidence  <=>  p >= (1 - confidence)^(1/r)
    previous = 0.0
    for r in [1, 2, 3, 5, 10, 30, 100, 1000, 10000]:
        expected = max(0.0, _logit((1.0 - confidence) ** (1.0 / r)))
        got = epsilon_lower_bound(r, r, confidence=confidence)
        assert got == pytest.approx(expected, abs=1e-8)
        assert got >= previous
        previous = got
    assert previous > 7.0


def test_no_correct_or_no_guesses_concludes_nothing():
    assert epsilon_lower_bound(0, 0) == 0.0
    assert epsilon_lower_bound(100, 0) == 0.0
    assert epsilon_lower_bound(100, 50) == 0.0
    assert epsilon_lower_bound(100, 58) == 0.0  # 58/100 is not significant at 95% (P[Binom(100, .5) >= 58] > .05)


def test_paper_worked_example():
    # Appendix D of arXiv:2305.08846: 75 of 100 correct at 95% gives 0.702 (delta = 0), 0.699 (delta = 1e-4,
    # m = 100) and 0.673 (delta = 1e-4, m = 1000 canaries of which 900 abstained)
    assert epsilon_lower_bound(100, 75, 0.0, 0.95) == pytest.approx(0.702, abs=1e-3)
    assert epsilon_lower_bound(100, 75, 1e-4, 0.95, num_canaries=100) == pytest.approx(0.699, abs=1e-3)
    assert epsilon_lower_bound(100, 75, 1e-4, 0.95, num_canaries=1000) == pytest.approx(0.673, abs=1e-3)


def test_p_value_equals_paper_formula_and_is_conservative_beyond():
    for m, r, v, delta in [(100, 40, 30, 1e-3), (200, 60, 50, 2e-3), (50, 50, 45, 1e-2), (300, 80, 70, 1e-2)]:
        for eps in [0.0, 0.5, 1.0, 2.0, 3.0]:
            ours = one_run_p_value(r, v, eps, delta, m)
            paper = _paper_p_value(m, r, v, eps, delta)
            if 2 * m * delta <= 1:
                assert ours == pytest.approx(paper, rel=1e-9, abs=1e-15)
            else:  # the documented conservative replacement of the terms with i < 2 m delta
                assert ours >= paper - 1e-15
    for m, r, v, delta in [(50, 50, 45, 1e-2), (300, 80, 70, 1e-2), (1000, 100, 75, 1e-4)]:
        ps = [one_run_p_value(r, v, eps, delta, m) for eps in np.linspace(0.0, 6.0, 121)]
        assert np.all(np.diff(ps) >= -1e-15)  # monotone in epsilon, so bisection is exact


def _paper_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """Appendix D's search on the literal formula: bisection for the largest eps with p-value <= alpha."""
    lo, hi = 0.0, 50.0
    if _paper_p_value(m, r, v, lo, delta) > alpha:
        return 0.0
    for _ in range(45):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _paper_p_value(m, r, v, mid, delta) <= alpha else (lo, mid)
    return lo


def test_bound_equals_paper_search_even_when_2_m_delta_exceeds_one():
    for m, r, v, delta in [(100, 60, 55, 1e-2), (200, 100, 80, 5e-3), (1000, 50, 48, 2e-3), (40, 40, 40, 0.05)]:
        assert epsilon_lower_bound(r, v, delta, num_canaries=m) == pytest.approx(_paper_bound(m, r, v, delta),
                                                                                 abs=1e-8)
    # the conservative replacement (module docstring): with c = 2 m delta > i the i-th term is (c/i) P[W >= v-i]
    r, v, m, delta, eps = 200, 127, 200, 5 / 400, 0.4
    q = math.exp(eps) / (1 + math.exp(eps))
    assert one_run_p_value(r, v, eps, delta, m) >= min(1.0, 5 * binom.sf(v - 2, r, q))
    assert _paper_p_value(m, r, v, eps, delta) < 0.5


def test_delta_only_weakens_the_bound():
    for r in [20, 100, 500]:
        for v in range(r // 2, r + 1, max(1, r // 10)):
            base = epsilon_lower_bound(r, v)
            previous = base
            for delta in [1e-8, 1e-6, 1e-4, 1e-3]:
                for m in [r, 10 * r]:
                    assert epsilon_lower_bound(r, v, delta, num_canaries=m) <= base + 1e-9
                got = epsilon_lower_bound(r, v, delta, num_canaries=r)
                assert got <= previous + 1e-9
                previous = got
    # more canaries with the same guesses: a larger delta term
    assert epsilon_lower_bound(100, 90, 1e-4, num_canaries=5000) < epsilon_lower_bound(100, 90, 1e-4,
                                                                                       num_canaries=100)


@pytest.mark.parametrize("args,kwargs", [
    ((10, 11), {}), ((-1, 0), {}), ((10.0, 5), {}), ((True, 1), {}), ((10, 5), {"confidence": 1.0}),
    ((10, 5), {"confidence": 0.0}), ((10, 5), {"delta": -1e-6}), ((10, 5), {"delta": 1.0}),
    ((10, 5), {"delta": float("nan")}), ((10, 5), {"delta": 1e-5}), ((10, 5), {"num_canaries": 9}),
])
def test_bound_refuses_invalid_input(args, kwargs):
    with pytest.raises(ValueError):
        epsilon_lower_bound(*args, **kwargs)


# --- whole audits on simulated mechanisms ------------------------------------------------------------------

def test_random_guesses_give_almost_nothing():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        m = 1000
        included = rng.random(m) < 0.5
        out = audit_outcome(rng.normal(size=m), included, 500, 500)
        assert out.num_guesses == m and out.num_canaries == m
        assert out.epsilon_lower_bound < 0.3
        out = audit_outcome(rng.normal(size=m), included, 50, 50, delta=1e-5)
        assert out.epsilon_lower_bound < 0.3


def test_randomized_response_monte_carlo():
    """Exactly eps-DP randomized response on each canary: the bound exceeds eps in <= 5% of runs."""
    eps, m, trials, confidence = 1.0, 1000, 2000, 0.95
    q = math.exp(eps) / (1.0 + math.exp(eps))
    rng = np.random.default_rng(20230515)
    included = rng.random((trials, m)) < 0.5
    released = np.where(rng.random((trials, m)) < q, included, ~included)  # the mechanism's output bits
    correct = (released == included).sum(axis=1)

    bounds_by_count = {int(v): epsilon_lower_bound(m, int(v), confidence=confidence) for v in np.unique(correct)}
    bounds = np.array([bounds_by_count[int(v)] for v in correct])
    for t in range(5):  # the scores -> guesses -> count path gives the same bound
        scores = released[t].astype(float) + 1e-3 * rng.random(m)
        out = audit_outcome(scores, included[t], int(released[t].sum()), int(m - released[t].sum()))
        assert out.num_correct == correct[t] and out.epsilon_lower_bound == bounds[t]

    # exact exceedance rate, from scipy alone: the smallest count whose Binomial(m, q) tail is <= 5%
    v_star = next(v for v in range(m + 1) if binom.sf(v - 1, m, q) <= 1 - confidence)
    exact_rate = binom.sf(v_star - 1, m, q)
    rate = float(np.mean(bounds > eps))
    sd = math.sqrt(exact_rate * (1 - exact_rate) / trials)
    assert exact_rate <= 1 - confidence
    assert abs(rate - exact_rate) < 4 * sd + 1e-3
    assert rate <= (1 - confidence) + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.mean(bounds) > 0.75 * eps  # guessing every canary is nearly tight for randomized response


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity/noise ratio mu at delta (Balle & Wang 2018)."""
    def delta_of(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta
    return brentq(delta_of, 0.0, 500.0)


def test_gaussian_mechanism():
    m, delta = 1000, 1e-5
    rng = np.random.default_rng(7)
    bounds = {}
    for mu in [0.0, 1.0, 4.0]:
        included = rng.random(m) < 0.5
        scores = included * mu + rng.normal(size=m)
        out = audit_outcome(scores, included, 100, 100, delta=delta, confidence=0.95)
        assert isinstance(out, AuditOutcome)
        assert (out.num_canaries, out.num_guesses, out.delta, out.confidence) == (m, 200, delta, 0.95)
        bounds[mu] = out.epsilon_lower_bound
        if mu > 0:
            assert bounds[mu] <= _gaussian_epsilon(mu, delta)
    assert bounds[0.0] < 0.3
    assert bounds[1.0] > 0.5
    assert bounds[4.0] > 3.0
    assert bounds[0.0] < bounds[1.0] < bounds[4.0]


def test_outcome_refuses_mismatched_membership():
    with pytest.raises(ValueError):
        audit_outcome(np.zeros(4), np.array([True, False]), 1, 1)
    with pytest.raises(ValueError):
        audit_outcome(np.zeros(2), np.array([0.5, 1.0]), 1, 1)
