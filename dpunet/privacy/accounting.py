"""Privacy accounting for Poisson-sampled Gaussian DP-SGD, with Opacus' accountants.

The mechanism of one logical step is the Poisson-subsampled Gaussian: each patient is in the batch with
probability q, per-patient gradients are clipped to norm C, summed, and N(0, sigma^2 C^2) is added once. T such
steps compose. PRV (Gopi et al. 2021, numerical composition of privacy loss random variables) is the primary
accountant; RDP is reported as a cross-check. Adjacency is add/remove one patient.

Google's `dp-accounting` is the independent oracle in the tests (PLD for PRV, RDP for RDP).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import numbers
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import opacus
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from dpunet.utils.errors import DpunetError

PRIMARY_ACCOUNTANT = "prv"
CROSS_CHECK_ACCOUNTANT = "rdp"
ACCOUNTANTS = ("prv", "rdp")

# Opacus' default RDP orders stop at 63; at small epsilon (large sigma) the optimal order lies above that
# and the bound would be needlessly loose, so the cross-check also tries larger integer orders.
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS) + (80, 96, 128, 160, 192, 256, 384, 512)

# Opacus' PRV accountant takes an *absolute* epsilon error (default 0.01): 1% at epsilon 1, so we ask for
# an error relative to the epsilon being reported (see `_prv_epsilon`).
PRV_RELATIVE_ERROR = 0.002
PRV_MAX_ABSOLUTE_ERROR = 0.01
PRV_MIN_ABSOLUTE_ERROR = 1e-4

History = list[tuple[float, float, int]]  # (noise multiplier sigma, sample rate q, number of steps)

# The largest target epsilon noise is calibrated for. Beyond it the guarantee (e^epsilon) means nothing, the PRV
# accountant's numerics break down for the tiny noise needed (it returns inf near sigma 0.2 at q 0.5, T 150) and
# the search takes many minutes; --eps inf trains without noise through the same code.
MAX_EPSILON = 1000.0
# Calibration stops within max(epsilon_tolerance, this * epsilon) below the target: 0.01 up to epsilon 10 as
# before, and a bounded number of (slow, at large epsilon) PRV evaluations above it.
CALIBRATION_RELATIVE_TOLERANCE = 1e-3


def accountant_info() -> dict[str, Any]:
    """What the privacy report records about the accounting."""
    return {
        "primary": PRIMARY_ACCOUNTANT,
        "cross_check": CROSS_CHECK_ACCOUNTANT,
        "library": "opacus",
        "opacus_version": opacus.__version__,
        "prv_relative_error": PRV_RELATIVE_ERROR,
        "rdp_orders": f"{len(RDP_ORDERS)} orders from {min(RDP_ORDERS)} to {max(RDP_ORDERS)}",
    }


# ----------------------------------------------------------------------------------------------- checks
def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise DpunetError(f"unknown privacy accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return accountant


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_sample_rate(sample_rate: float) -> None:
    if not (_is_number(sample_rate) and 0.0 < sample_rate <= 1.0):
        raise DpunetError(f"sample rate q must be in (0, 1], got {sample_rate!r}")


def _check_delta(delta: float) -> None:
    if not (_is_number(delta) and 0.0 < delta < 1.0):
        raise DpunetError(f"delta must be in (0, 1), got {delta!r}")


def _check_steps(steps: int, minimum: int = 0) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < minimum:
        raise DpunetError(f"number of steps must be an integer >= {minimum}, got {steps!r}")


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not (_is_number(noise_multiplier) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise DpunetError(f"noise multiplier sigma must be a finite number >= 0, got {noise_multiplier!r}")


# ------------------------------------------------------------------------------------------ epsilon
# What the accountant libraries said while dpunet was computing, by message: a calibration or a training run
# asks the accountants hundreds of times, so their warnings are counted here and summarised once
# (`accountant_warnings_summary`) instead of repeated on the terminal at every call.
ACCOUNTANT_WARNINGS: collections.Counter[str] = collections.Counter()
# loggers of accountant libraries that log instead of warning (Google's dp-accounting logs through absl)
ACCOUNTANT_LOGGERS = ("absl", "dp_accounting", "prv_accountant")


class _CountingHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            ACCOUNTANT_WARNINGS[_first_line(record.getMessage())] += 1


def _first_line(message: str) -> str:
    return " ".join(str(message).split())[:200]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Opacus' PRV code divides by zero harmlessly at q = 1 (numpy RuntimeWarnings: dropped); anything else the
    accountants warn or log (e.g. RDP's order range, dp-accounting's "failed to converge") is counted in
    ACCOUNTANT_WARNINGS for a one-line summary."""
    loggers = [logging.getLogger(name) for name in ACCOUNTANT_LOGGERS]
    saved = [(lg.propagate, list(lg.handlers)) for lg in loggers]
    handler = _CountingHandler()
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        with warnings.catch_warnings(record=True) as caught, np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
    for w in caught:
        ACCOUNTANT_WARNINGS[_first_line(w.message)] += 1


@contextlib.contextmanager
def accountant_warnings_summary(what: str, report: Callable[[str], None] | None = None) -> Iterator[None]:
    """Around a whole command or run: at the end, one line per distinct accountant warning that arrived during
    it, with its count (through `report`, default dpunet's `warn`)."""
    before = collections.Counter(ACCOUNTANT_WARNINGS)
    try:
        yield
    finally:
        new = ACCOUNTANT_WARNINGS - before
        if new:
            from dpunet.utils.errors import warn

            for message, count in new.most_common():
                (report or warn)(f"the privacy accountant warned {count} time(s) during {what}: {message}")


def _prv_epsilon(history: History, delta: float, refine: bool = True) -> float:
    acc = PRVAccountant()
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    eps = acc.get_epsilon(delta, eps_error=PRV_MAX_ABSOLUTE_ERROR)
    wanted = _prv_error_for(eps)
    if refine and wanted < PRV_MAX_ABSOLUTE_ERROR:
        eps = acc.get_epsilon(delta, eps_error=wanted)
    return float(eps)


def _prv_error_for(epsilon: float) -> float:
    return min(PRV_MAX_ABSOLUTE_ERROR, max(PRV_MIN_ABSOLUTE_ERROR, PRV_RELATIVE_ERROR * epsilon))


def _rdp_epsilon(history: History, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    return float(acc.get_epsilon(delta, alphas=list(RDP_ORDERS)))


def epsilon_for_history(
    history: Sequence[Sequence[float]], delta: float, accountant: str = PRIMARY_ACCOUNTANT
) -> float:
    """Epsilon after composing every (sigma, q, steps) entry of `history` (any order: composition commutes)."""
    _check_accountant(accountant)
    _check_delta(delta)
    entries: History = []
    for entry in history:
        sigma, q, steps = entry
        _check_noise_multiplier(sigma)
        _check_sample_rate(q)
        _check_steps(int(steps) if float(steps).is_integer() else steps)
        if int(steps) > 0:
            entries.append((float(sigma), float(q), int(steps)))
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf  # a step without noise releases an unbounded amount
    return _cached_epsilon(tuple(entries), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # PRV takes 0.1-1 s per call and trainers, reports and calibration ask the same questions repeatedly
    try:
        with _quiet():
            return _prv_epsilon(list(entries), delta) if accountant == "prv" else _rdp_epsilon(list(entries), delta)
    except (ValueError, OverflowError, MemoryError, FloatingPointError) as e:
        raise DpunetError(
            f"the {accountant} accountant failed for history {list(entries)} and delta {delta}: {e}"
        ) from e


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = PRIMARY_ACCOUNTANT
) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps (0 steps -> 0.0; sigma 0 -> inf)."""
    _check_steps(steps)
    return epsilon_for_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def epsilon_for_repeated_training(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    repetitions: int,
    delta: float,
    accountant: str = PRIMARY_ACCOUNTANT,
) -> float:
    """Epsilon for a patient used in `repetitions` trainings of the same mechanism (e.g. 4 of 5 folds of a
    cross-validation ensemble): the trainings compose, so this is `repetitions * steps` steps."""
    _check_steps(repetitions, minimum=1)
    _check_steps(steps)
    return epsilon_spent(noise_multiplier, sample_rate, steps * int(repetitions), delta, accountant)


# ---------------------------------------------------------------------------------------- calibration
def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = PRIMARY_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
    max_noise_multiplier: float = 100.0,
) -> float:
    """The smallest sigma (to `epsilon_tolerance`, or CALIBRATION_RELATIVE_TOLERANCE * epsilon if larger) whose
    `epsilon_spent` after `steps` steps is <= `epsilon`.

    epsilon = inf means non-private training and returns 0.0. Requests no sigma up to `max_noise_multiplier`
    can meet, and epsilons above MAX_EPSILON, raise DpunetError (such noise would drown any training signal
    anyway; such an epsilon promises nothing).
    """
    _check_accountant(accountant)
    if _is_number(epsilon) and math.isinf(epsilon) and epsilon > 0:
        return 0.0
    if not (_is_number(epsilon) and epsilon > 0 and math.isfinite(epsilon)):
        raise DpunetError(f"target epsilon must be > 0 (or inf for non-private training), got {epsilon!r}")
    if epsilon > MAX_EPSILON:
        raise DpunetError(
            f"epsilon={epsilon:g} is above {MAX_EPSILON:g}, the largest epsilon dpunet calibrates noise for: such a "
            f"guarantee (a factor e^{epsilon:g}) protects nothing and the accountant cannot resolve the tiny noise "
            f"it needs; use --eps inf for non-private training (same code, no noise) or an epsilon <= {MAX_EPSILON:g}"
        )
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps, minimum=1)
    if not epsilon_tolerance > 0:
        raise DpunetError(f"epsilon tolerance must be > 0, got {epsilon_tolerance!r}")
    epsilon_tolerance = max(epsilon_tolerance, CALIBRATION_RELATIVE_TOLERANCE * epsilon)

    # Feasibility first (Opacus' search would double sigma up to 1e6). RDP is cheap and an upper bound;
    # only when it says no is the (slow at large sigma, tiny epsilon) PRV asked, with its coarse error.
    eps_at_max = epsilon_spent(max_noise_multiplier, sample_rate, steps, delta, "rdp")
    if eps_at_max > epsilon and accountant == "prv":
        with _quiet():
            at_max = [(float(max_noise_multiplier), float(sample_rate), int(steps))]
            eps_at_max = _prv_epsilon(at_max, delta, refine=False)
    if eps_at_max > epsilon:
        raise DpunetError(
            f"epsilon={epsilon} (delta={delta}) cannot be reached with q={sample_rate} and T={steps} steps: even "
            f"a noise multiplier of {max_noise_multiplier} spends epsilon={eps_at_max:.3g}; use a larger epsilon, "
            f"a smaller sampling rate or fewer steps"
        )
    # RDP: Opacus' own bisection (an RDP evaluation takes milliseconds). PRV: an evaluation takes 0.1-1 s, the
    # longest at small sigma where Opacus' bisection starts, so the RDP sigma (RDP's bound is looser, hence
    # its sigma is close to and usually above the PRV one) seeds a bracketed secant search instead.
    try:
        with _quiet():
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=int(steps),
                    accountant="rdp",
                    epsilon_tolerance=epsilon_tolerance,
                    alphas=list(RDP_ORDERS),
                )
            )
    except (ValueError, OverflowError, MemoryError, FloatingPointError) as e:
        raise DpunetError(
            f"noise calibration failed for epsilon={epsilon}, delta={delta}, q={sample_rate}, T={steps}: {e}"
        ) from e
    if accountant != "rdp":
        sigma = _search_noise_multiplier(
            lambda s: epsilon_spent(s, sample_rate, steps, delta, accountant), epsilon, sigma, epsilon_tolerance
        )
    # The epsilon that is reported and enforced is `epsilon_spent`: the result must satisfy it exactly.
    for _ in range(200):
        if epsilon_spent(sigma, sample_rate, steps, delta, accountant) <= epsilon:
            break
        sigma *= 1.0 + 1e-3
    else:
        raise DpunetError(f"noise calibration did not converge for epsilon={epsilon}, q={sample_rate}, T={steps}")
    if sigma > max_noise_multiplier:
        raise DpunetError(
            f"epsilon={epsilon} needs a noise multiplier of {sigma:.3g} > {max_noise_multiplier} with "
            f"q={sample_rate} and T={steps}; use a larger epsilon, a smaller sampling rate or fewer steps"
        )
    return sigma


def _search_noise_multiplier(
    epsilon_of: Callable[[float], float], target: float, guess: float, tolerance: float, max_evaluations: int = 60
) -> float:
    """A sigma with target - tolerance <= epsilon_of(sigma) <= target (epsilon_of decreasing in sigma).

    Keeps a bracket lo < hi with epsilon_of(lo) > target >= epsilon_of(hi) and shrinks it by regula falsi on
    (log sigma, log epsilon - log target), which is nearly linear for the subsampled Gaussian, with the
    Illinois damping and a bisection every fourth step so it cannot stall. Returns hi: it meets the target.
    """
    evaluations = 0

    def g(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return math.log(epsilon_of(sigma) / target)

    hi, g_hi = guess, g(guess)
    while g_hi > 0:  # guess too small: walk up
        hi *= 1.25
        g_hi = g(hi)
    lo, g_lo = hi / 1.25, g(hi / 1.25)
    while g_lo <= 0:  # walk down until the target is exceeded (epsilon -> inf as sigma -> 0)
        hi, g_hi = lo, g_lo
        lo /= 1.25
        g_lo = g(lo)
    eps_hi = target * math.exp(g_hi)
    w_lo, w_hi = g_lo, g_hi  # secant weights (damped copies of g)
    last_moved = ""
    while target - eps_hi > tolerance and evaluations < max_evaluations and hi / lo - 1 > 1e-9:
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = x_hi - w_hi * (x_hi - x_lo) / (w_hi - w_lo)
        if not x_lo < x < x_hi or evaluations % 4 == 3:
            x = 0.5 * (x_lo + x_hi)
        sigma = math.exp(x)
        g_new = g(sigma)
        if g_new > 0:
            lo, w_lo = sigma, g_new
            if last_moved == "lo":
                w_hi /= 2
            last_moved = "lo"
        else:
            hi, w_hi, eps_hi = sigma, g_new, target * math.exp(g_new)
            if last_moved == "hi":
                w_lo /= 2
            last_moved = "hi"
    return hi


# ------------------------------------------------------------------------------------------- ledger
class PrivacyLedger:
    """The steps a training run has actually taken, for reporting and for refusing to overspend.

    The history maps each distinct (sigma, q) to its number of steps (composition commutes, so merging equal
    mechanisms is exact and keeps the accountant's input, and hence epsilon, independent of how the run was
    split by resumes). `state_dict()` is plain JSON for the checkpoint.
    """

    STATE_VERSION = 1

    def __init__(self, noise_multiplier: float | None = None, sample_rate: float | None = None) -> None:
        if noise_multiplier is not None:
            _check_noise_multiplier(noise_multiplier)
        if sample_rate is not None:
            _check_sample_rate(sample_rate)
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self._counts: dict[tuple[float, float], int] = {}
        # histories verified to stay within a budget: (counts, delta, accountant, budget)
        self._within_budget: list[tuple[dict[tuple[float, float], int], float, str, float]] = []

    # -- recording
    def step(self, noise_multiplier: float | None = None, sample_rate: float | None = None, num_steps: int = 1) -> None:
        """Record `num_steps` logical steps (defaults: the ledger's own sigma and q)."""
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        q = self.sample_rate if sample_rate is None else sample_rate
        if sigma is None or q is None:
            raise DpunetError("PrivacyLedger.step needs a noise multiplier and a sample rate")
        _check_noise_multiplier(sigma)
        _check_sample_rate(q)
        _check_steps(num_steps)
        key = (float(sigma), float(q))
        self._counts[key] = self._counts.get(key, 0) + int(num_steps)

    @property
    def steps_taken(self) -> int:
        return sum(self._counts.values())

    @property
    def history(self) -> History:
        return [(s, q, t) for (s, q), t in self._counts.items() if t > 0]

    # -- querying
    def epsilon(self, delta: float, accountant: str = PRIMARY_ACCOUNTANT, repetitions: int = 1) -> float:
        """Epsilon spent so far (`repetitions` > 1: the same training repeated, e.g. ensemble members)."""
        _check_steps(repetitions, minimum=1)
        history = [(s, q, t * int(repetitions)) for s, q, t in self.history]
        return epsilon_for_history(history, delta, accountant)

    def would_exceed(
        self,
        budget_epsilon: float,
        delta: float,
        extra_steps: int = 1,
        accountant: str = PRIMARY_ACCOUNTANT,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
    ) -> bool:
        """True if taking `extra_steps` more steps (with the ledger's or the given sigma, q) would spend
        more than `budget_epsilon`.

        Call it once with all remaining planned steps at the start of a run and on resume: a history that
        passed is remembered, and any later question about a history it contains (fewer steps of the same
        mechanisms) is answered without running the accountant again, since epsilon only grows with steps.
        """
        _check_steps(extra_steps)
        if _is_number(budget_epsilon) and math.isinf(budget_epsilon) and budget_epsilon > 0:
            return False
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        q = self.sample_rate if sample_rate is None else sample_rate
        counts = dict(self._counts)
        if extra_steps > 0:
            if sigma is None or q is None:
                raise DpunetError("PrivacyLedger.would_exceed needs a noise multiplier and a sample rate")
            key = (float(sigma), float(q))
            counts[key] = counts.get(key, 0) + int(extra_steps)
        for ok_counts, ok_delta, ok_accountant, ok_budget in self._within_budget:
            if (ok_delta == delta and ok_accountant == accountant and ok_budget <= budget_epsilon
                    and all(t <= ok_counts.get(key, 0) for key, t in counts.items() if t > 0)):
                return False
        history = [(s, qq, t) for (s, qq), t in counts.items() if t > 0]
        exceeds = epsilon_for_history(history, delta, accountant) > budget_epsilon
        if not exceeds:
            self._within_budget.append((counts, float(delta), accountant, float(budget_epsilon)))
        return exceeds

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "history": [[s, q, t] for s, q, t in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if state["version"] != self.STATE_VERSION:
                raise DpunetError(f"privacy ledger state has version {state['version']}, expected {self.STATE_VERSION}")
            counts: dict[tuple[float, float], int] = {}
            for sigma, q, steps in state["history"]:
                _check_noise_multiplier(float(sigma))
                _check_sample_rate(float(q))
                _check_steps(int(steps))
                key = (float(sigma), float(q))
                counts[key] = counts.get(key, 0) + int(steps)
            sigma0, q0 = state["noise_multiplier"], state["sample_rate"]
        except (KeyError, TypeError, ValueError) as e:
            raise DpunetError(f"invalid privacy ledger state: {e!r}") from e
        self.noise_multiplier = None if sigma0 is None else float(sigma0)
        self.sample_rate = None if q0 is None else float(q0)
        self._counts = counts

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyLedger":
        ledger = cls()
        ledger.load_state_dict(state)
        return ledger

    def __repr__(self) -> str:
        return f"PrivacyLedger(history={self.history})"


def check_delta(delta: float, num_patients: int, allow_large_delta: bool = False) -> None:
    """Refuse delta >= 1/N: a mechanism that publishes one random patient's record in the clear is (0, 1/N)-DP,
    so such a delta permits exactly the failure DP is meant to exclude. `allow_large_delta` lets it through
    (the report must then flag it)."""
    if not 0 < delta < 1:
        raise DpunetError(f"delta must lie in (0, 1), got {delta}")
    if num_patients >= 1 and delta >= 1.0 / num_patients and not allow_large_delta:
        raise DpunetError(f"delta {delta:g} is not below 1/N = {1.0 / num_patients:.3g} for N = {num_patients} "
                          f"patients: a mechanism that releases one random patient's data outright satisfies "
                          f"(0, 1/N)-DP. Choose a smaller --delta (e.g. 1e-5), or pass --allow-large-delta "
                          f"(the privacy report will flag it)")
