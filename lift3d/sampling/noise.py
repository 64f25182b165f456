"""The noise of a sampling run: each sample's seed, noise correlated across slices, and the noise a
stochastic solver adds at a step, drawn from each sample's own generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample ``k`` of a run seeded with ``seed``.

    Sample 0 uses ``seed`` itself, so one sample is exactly what a single-sample run gives.
    Sample ``k >= 1`` uses ``numpy.random.SeedSequence([seed mod 2**64, k]).generate_state(1,
    uint64)[0]``: a hash of the pair, so runs with seeds 0 and 1 share no sample (``seed + k``
    would make sample 1 of seed 0 equal sample 0 of seed 1).
    """
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**64, int(k)]).generate_state(1, np.uint64)[0])


def sample_noise(seed: int, k: int, antithetic: bool = False) -> tuple[int, float]:
    """The seed and the sign of sample ``k``'s noise in a run seeded with ``seed``.

    Independent samples: ``(sample_seed(seed, k), +1)``. With ``antithetic`` pairs (a variance reduction for the
    mean of K samples), sample ``2j + 1`` is sample ``2j``'s noise negated: ``(sample_seed(seed, 2j), -1)``. A
    deterministic sampler is then evaluated at ``z`` and ``-z``, and the part of the output that is odd in the
    noise cancels in the pair's mean. The even samples are those of an independent run.
    """
    if antithetic and k % 2:
        return sample_seed(seed, k - 1), -1.0
    return sample_seed(seed, k), 1.0


def correlate_slices(noise: Tensor, rho: float) -> Tensor:
    """Independent N(0, 1) ``noise`` ``(b, c, n, h, w)`` -> noise whose slices correlate by ``rho``.

    Every voxel stays N(0, 1); two slices of a volume correlate by ``rho`` at the same (c, h, w),
    the covariance ``x_k = sqrt(rho) * shared + sqrt(1 - rho) * own_k`` gives. It is made from the
    draw itself by that covariance's symmetric square root, ``x = sqrt(1 - rho) z +
    (sqrt(1 - rho + rho n) - sqrt(1 - rho)) mean_k z``, so it needs no extra random numbers and is
    linear in ``z`` (which lets it act on the noise a diffusers DDPM step draws inside, see
    ``lift3d.sampling.solvers.ddpm``). ``rho = 1`` gives every slice the same noise; ``rho = 0``
    returns ``noise`` unchanged.
    """
    if rho == 0:
        return noise
    n = noise.shape[2]
    own = math.sqrt(1.0 - rho)
    shared = math.sqrt(1.0 - rho + rho * n) - own
    return own * noise + shared * noise.mean(dim=2, keepdim=True)


@dataclass
class StepNoise:
    """What a stochastic solver draws its step noise from: one generator per sample, the rows of the batch
    being sample-major (sample ``k`` owns rows ``k*b:(k+1)*b``), and the slice correlation ``rho``.

    :param generators: sample ``k``'s CPU generator, the one that drew its initial noise.
    :param rho: the noise correlation across slices (``correlate_slices``).
    :param signs: each sample's sign (``sample_noise``): -1 negates what its generator draws (the twin of an
        antithetic pair). None: all +1.
    """

    generators: Sequence[torch.Generator]
    rho: float = 0.0
    signs: Sequence[float] | None = None

    def draw(self, like: Tensor) -> Tensor:
        """N(0, 1) noise shaped as ``like`` ``(K b, c, n, h, w)``, each sample's rows from its own generator,
        correlated across slices by ``rho``. Drawn on the CPU, so a seed gives the same noise on every device."""
        shape = (like.shape[0] // len(self.generators), *like.shape[1:])
        signs = self.signs or [1.0] * len(self.generators)
        parts = [sign * correlate_slices(torch.randn(shape, generator=g), self.rho)
                 for g, sign in zip(self.generators, signs)]
        return torch.cat(parts).to(like.device, like.dtype)
