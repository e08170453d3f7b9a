"""The secret randomness of DP: keys from OS entropy, per-step seeds by keyed hash, the hardened Gaussian."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import stats

from dpunet.privacy.dp_step import noisy_average_gradient
from dpunet.privacy.randomness import PrivateRandomness, hardened_normal, hardened_normal_numpy


def test_hardened_noise_is_gaussian_with_the_requested_std():
    generator = PrivateRandomness.secure().torch_generator("noise", 0)
    x = hardened_normal((200_000,), 2.5, generator).double().numpy()
    assert x.std() == pytest.approx(2.5, rel=0.01) and abs(x.mean()) < 0.03
    assert stats.kstest(x / 2.5, "norm").pvalue > 1e-3
    y = hardened_normal_numpy(200_000, 2.5, np.random.default_rng(0))
    assert stats.kstest(y / 2.5, "norm").pvalue > 1e-3


def test_noisy_step_adds_noise_of_std_sigma_c_from_the_given_generator():
    zeros = [torch.zeros(100_000)]
    session = PrivateRandomness.secure()
    a = noisy_average_gradient(zeros, 2.0, 0.5, 4.0, session.torch_generator("noise", 3))[0]
    assert float(a.std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.02)
    assert torch.equal(a, noisy_average_gradient(zeros, 2.0, 0.5, 4.0, session.torch_generator("noise", 3))[0])
    assert not torch.equal(a, noisy_average_gradient(zeros, 2.0, 0.5, 4.0, session.torch_generator("noise", 4))[0])
    # no generator: fresh OS entropy each call, never torch's global (seedable) generator
    torch.manual_seed(0)
    b = noisy_average_gradient(zeros, 2.0, 0.5, 4.0)[0]
    torch.manual_seed(0)
    assert not torch.equal(b, noisy_average_gradient(zeros, 2.0, 0.5, 4.0)[0])


def test_seeds_depend_on_key_purpose_and_step():
    session = PrivateRandomness.secure()
    seeds = {session.seed(purpose, step) for purpose in ("noise", "poisson sampling") for step in range(100)}
    assert len(seeds) == 200
    assert PrivateRandomness.secure().seed("noise", 0) != session.seed("noise", 0)
    assert PrivateRandomness.insecure_from_seed(3).seed("noise", 5) == PrivateRandomness.insecure_from_seed(3).seed(
        "noise", 5)
    assert not PrivateRandomness.secure().reproducible and PrivateRandomness.insecure_from_seed(3).reproducible


def test_the_key_is_never_printed_or_pickled():
    session = PrivateRandomness.secure()
    assert session.key.hex() not in repr(session) and session.key.hex() not in str(session)
    with pytest.raises(TypeError, match="secret key"):
        pickle.dumps(session)
    with pytest.raises(TypeError):
        torch.save({"r": session}, "/dev/null")
