"""Poisson sampling of patients: the distribution the accountant assumes, drawn from secret randomness."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dpunet.privacy.randomness import PrivateRandomness
from dpunet.privacy.sampling import PoissonPatientSampler
from dpunet.utils.errors import DpunetError

N, Q, DRAWS = 41, 0.25, 4000


@pytest.fixture(scope="module")
def draws() -> tuple[list[str], list[list[str]]]:
    ids = [f"patient_{i:03d}" for i in range(N)]
    sampler = PoissonPatientSampler(ids, Q, PrivateRandomness.secure())
    return ids, [sampler.sample(t) for t in range(DRAWS)]


def test_batch_sizes_follow_binomial(draws):
    _, batches = draws
    sizes = np.array([len(b) for b in batches])
    assert sizes.mean() == pytest.approx(N * Q, abs=4 * np.sqrt(N * Q * (1 - Q) / DRAWS))
    assert sizes.var(ddof=1) == pytest.approx(N * Q * (1 - Q), rel=0.1)
    # chi-square goodness of fit against Binomial(N, q), sparse tails pooled
    binom = stats.binom(N, Q)
    edges = [0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N + 1]  # bins [edges[i], edges[i+1])
    observed = np.array([((sizes >= a) & (sizes < b)).sum() for a, b in zip(edges[:-1], edges[1:])])
    expected = np.array([binom.cdf(b - 1) - binom.cdf(a - 1) for a, b in zip(edges[:-1], edges[1:])]) * DRAWS
    assert expected.min() > 5
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3
    # a fixed-size sampler (always round(qN)) must fail the same test: the test can tell the difference
    fixed = np.full(DRAWS, round(N * Q))
    observed_fixed = np.array([((fixed >= a) & (fixed < b)).sum() for a, b in zip(edges[:-1], edges[1:])])
    assert stats.chisquare(observed_fixed, expected)[1] < 1e-6


def test_each_patient_included_with_probability_q(draws):
    ids, batches = draws
    counts = {p: 0 for p in ids}
    for b in batches:
        assert len(set(b)) == len(b)  # nobody twice in one step
        for p in b:
            counts[p] += 1
    freq = np.array([counts[p] for p in ids]) / DRAWS
    sd = np.sqrt(Q * (1 - Q) / DRAWS)
    assert np.all(np.abs(freq - Q) < 5 * sd)
    # inclusions of two patients are independent: joint frequency ~ q^2
    both = sum(1 for b in batches if ids[0] in b and ids[1] in b) / DRAWS
    assert both == pytest.approx(Q * Q, abs=5 * np.sqrt(Q * Q * (1 - Q * Q) / DRAWS))


def test_empty_batches_occur_and_are_valid():
    sampler = PoissonPatientSampler(["a", "b", "c"], 0.1, PrivateRandomness.secure())
    sizes = [len(sampler.sample(t)) for t in range(500)]
    assert sizes.count(0) > 0  # P(empty) = 0.9^3 = 0.73
    assert sampler.expected_batch_size == pytest.approx(0.3)


def test_draws_come_from_the_session_key_not_from_a_seed():
    ids = [str(i) for i in range(30)]
    session = PrivateRandomness.secure()
    sampler = PoissonPatientSampler(ids, 0.2, session)
    first = [sampler.sample(t) for t in range(40)]
    # a step's draw is a function of (key, step): every rank of a distributed run, or a re-draw, agrees
    assert [PoissonPatientSampler(ids, 0.2, session).sample(t) for t in range(40)] == first
    # a new session (a new run, or a resumed one) draws anew: nobody can re-draw the batches without the key
    other = PoissonPatientSampler(ids, 0.2, PrivateRandomness.secure())
    assert [other.sample(t) for t in range(40)] != first
    # only the explicitly insecure mode reproduces from a seed
    seeded = [PoissonPatientSampler(ids, 0.2, PrivateRandomness.insecure_from_seed(7)).sample(t) for t in range(40)]
    assert seeded == [PoissonPatientSampler(ids, 0.2, PrivateRandomness.insecure_from_seed(7)).sample(t)
                      for t in range(40)]
    assert seeded != [PoissonPatientSampler(ids, 0.2, PrivateRandomness.insecure_from_seed(8)).sample(t)
                      for t in range(40)]


def test_sampler_refuses_a_public_seed():
    with pytest.raises(TypeError, match="PrivateRandomness"):
        PoissonPatientSampler(["a", "b"], 0.5, 0)


@pytest.mark.parametrize("ids,q", [([], 0.5), (["a", "a"], 0.5), (["a"], 0.0), (["a"], 1.5)])
def test_invalid_arguments(ids, q):
    with pytest.raises(DpunetError):
        PoissonPatientSampler(ids, q, PrivateRandomness.secure())


def test_full_rate_takes_everyone():
    assert PoissonPatientSampler(["a", "b", "c"], 1.0, PrivateRandomness.secure()).sample(0) == ["a", "b", "c"]
