"""The randomness that the DP analysis assumes secret: Poisson sampling, the Gaussian noise, DP statistics.

Threat model: the attacker has the code, every released file and all training data but one patient. A guarantee
that rests on noise the attacker can regenerate is void, so:

- **Secret by default.** A run draws a 256-bit key from the operating system's entropy (`secrets`), once per
  process session (`--continue` draws a new one, so a resumed run never reuses noise). The key lives in memory
  only: it is never written to any file, public or private, and never derived from `--seed`.
- **Per-step seeds from a keyed hash.** The seeds of step t's Poisson draw and of its noise are
  BLAKE2b(key, purpose, t): a pseudo-random function of the key, so knowing the seeds of some steps tells nothing
  about the others, no generator state needs to be stored, and every rank of a distributed run (which receives the
  key from rank 0 over the process group) draws the same patients and the same noise.
- **Hardened Gaussian sampling.** torch's generators (Mersenne Twister on the CPU, Philox on CUDA) are fast but not
  cryptographic, and floating-point Gaussian samples carry structure that an attacker who sees exact noisy values
  can test hypotheses against (Mironov 2012 for the Laplace mechanism; Jin et al. 2022 for Opacus' Gaussian
  sampler). dpunet follows Opacus' `secure_mode` construction (Holohan & Braghin 2021, section 5.1): each noise
  value is the sum of 2n = 4 Gaussian draws of std s, divided by 2 (the same N(0, s^2)), after discarding one draw,
  which raises the attack's cost from 2^53 to about 2^(53*3). Opacus pairs it with torchcsprng, which is
  archived and does not build against current torch; dpunet instead reseeds every step from the keyed hash
  (64-bit seeds, beyond brute force) so that no generator state outlives one step. See
  documentation/privacy_model.md ("Randomness") for the measured cost and what remains.
- **Reproducible on request only.** `PrivateRandomness.insecure_from_seed(seed)` (`--insecure-reproducible-noise`)
  derives the key from the public seed, for tests and debugging; the privacy report then states in its headline
  that the run is not private against anyone who knows the seed.
"""
from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

KEY_BYTES = 32
INSECURE_KEY_LABEL = b"dpunet insecure reproducible noise, seed "
# Opacus' secure_mode: 2n Gaussian draws per value with n = 2 (Holohan & Braghin 2021, section 5.1)
HARDENED_DRAWS = 4


class PrivateRandomness:
    """Seeds for the secret random choices of one training session, derived from a key by a keyed hash."""

    def __init__(self, key: bytes, reproducible: bool) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the randomness key must have {KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)
        self.reproducible = bool(reproducible)

    @classmethod
    def secure(cls) -> "PrivateRandomness":
        """A fresh key from the operating system's entropy: the default for every private run."""
        return cls(secrets.token_bytes(KEY_BYTES), reproducible=False)

    @classmethod
    def insecure_from_seed(cls, seed: int) -> "PrivateRandomness":
        """A key anyone can recompute from `seed`: reproducible noise and sampling, and no privacy against
        whoever knows the seed."""
        key = hashlib.blake2b(INSECURE_KEY_LABEL + str(int(seed)).encode(), digest_size=KEY_BYTES).digest()
        return cls(key, reproducible=True)

    @property
    def key(self) -> bytes:
        """The key itself, for broadcasting to the other ranks only: never write it to a file."""
        return self._key

    def __repr__(self) -> str:  # never print the key
        return f"PrivateRandomness(reproducible={self.reproducible})"

    def __getstate__(self) -> None:
        raise TypeError("PrivateRandomness holds a secret key and must not be pickled or saved")

    def seed(self, purpose: str, step: int, bits: int = 64) -> int:
        """A `bits`-bit seed for `purpose` at `step`: BLAKE2b keyed with the session key."""
        if bits % 8 or not 0 < bits <= 512:
            raise ValueError(f"bits must be a multiple of 8 in (0, 512], got {bits}")
        message = f"{purpose}\0{int(step)}".encode()
        digest = hashlib.blake2b(message, key=self._key, digest_size=bits // 8).digest()
        return int.from_bytes(digest, "little")

    def numpy_generator(self, purpose: str, step: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(self.seed(purpose, step, bits=128)))

    def torch_generator(self, purpose: str, step: int, device: torch.device | str = "cpu") -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed(purpose, step) >> 1)  # torch takes a non-negative int64: 63 bits
        return generator


def hardened_normal(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """N(0, std^2) in fp32 as the sum of 4 draws of N(0, std^2) divided by 2, one draw discarded first
    (Opacus' secure_mode noise). `device` defaults to the generator's."""
    device = generator.device if device is None else torch.device(device)
    torch.normal(0.0, std, size=(1,), generator=generator, device=generator.device)  # discarded
    total = torch.zeros(shape, dtype=torch.float32, device=generator.device)
    for _ in range(HARDENED_DRAWS):
        total += torch.normal(0.0, std, size=tuple(shape), generator=generator, device=generator.device,
                              dtype=torch.float32)
    return total.div_(2.0).to(device)


def hardened_normal_numpy(size: int | tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """The numpy twin of `hardened_normal`, for DP statistics outside DP-SGD."""
    rng.normal(0.0, std)  # discarded
    return sum(rng.normal(0.0, std, size=size) for _ in range(HARDENED_DRAWS)) / 2.0
