"""Tests for plugins/timestep_samplers.py: the stage-1 and stage-2 (Make-A-Volume) samplers."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lift3d.plugins import PluginManager
from lift3d.plugins.protocols import TimestepSampler
from lift3d_plugins.timestep_samplers import (
    MakeAVolumeTimestepSampler,
    PerSliceTimestepSampler,
    PerVolumeTimestepSampler,
)

BUILTIN = ("uniform-slice", "uniform-volume", "make-a-volume")


@pytest.fixture(scope="module")
def registry():
    return PluginManager(autoload=False).timestep_samplers


def _binned_chisquare(t: torch.Tensor, weights: np.ndarray, bins: int) -> float:
    """p-value of drawn timesteps against the distribution ``weights`` (over 0..T-1), ``bins`` bins."""
    T = len(weights)
    counts = np.bincount(t.numpy(), minlength=T).reshape(bins, -1).sum(1)
    expected = (weights / weights.sum()).reshape(bins, -1).sum(1) * len(t)
    return chisquare(counts, expected).pvalue


@pytest.mark.parametrize("name", BUILTIN)
def test_shape_dtype_range(registry, name):
    sampler = registry.create(name)
    assert isinstance(sampler, TimestepSampler)
    t = sampler(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert t.shape == (3, 5) and t.dtype == torch.int64
    assert t.min() >= 0 and t.max() < 7
    # Every value can be drawn, the extremes included (off-by-one would miss 0 or T-1).
    many = sampler(2000, 1, 7, generator=torch.Generator().manual_seed(1))
    assert set(many.flatten().tolist()) == set(range(7))


@pytest.mark.parametrize("name", BUILTIN)
def test_seeded_generator_reproducible(registry, name):
    sampler = registry.create(name)
    a = sampler(4, 6, 1000, generator=torch.Generator().manual_seed(123))
    b = sampler(4, 6, 1000, generator=torch.Generator().manual_seed(123))
    c = sampler(4, 6, 1000, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", BUILTIN)
def test_device_argument(registry, name):
    t = registry.create(name)(2, 3, 10, device="meta")
    assert t.device.type == "meta" and t.shape == (2, 3)


@pytest.mark.parametrize("name, per_volume", [("uniform-slice", False), ("uniform-volume", True), ("make-a-volume", True)])
def test_per_volume_slices_share_t(registry, name, per_volume):
    sampler = registry.create(name)
    assert sampler.per_volume is per_volume
    t = sampler(64, 10, 1000, generator=torch.Generator().manual_seed(0))
    shared = (t == t[:, :1]).all(dim=1)
    if per_volume:
        assert shared.all()
        assert len(t[:, 0].unique()) > 1  # but volumes differ from one another
    else:
        assert not shared.any()  # 10 slices of 1000 steps: all equal has probability 1e-27


def test_result_does_not_alias_slices():
    t = PerVolumeTimestepSampler()(2, 3, 10)
    t[0, 0] = -5
    assert t[0, 1] != -5


def test_make_a_volume_weights_map_paper_t_to_diffusers_index():
    # Paper t in 1..T weighs 2T - t; diffusers index i = t - 1 therefore weighs 2T - 1 - i.
    w = MakeAVolumeTimestepSampler().weights(4)
    assert w.tolist() == [7.0, 6.0, 5.0, 4.0]


def test_make_a_volume_matches_2T_minus_t_distribution():
    T, draws = 1000, 100_000
    t = MakeAVolumeTimestepSampler()(draws, 1, T, generator=torch.Generator().manual_seed(0))[:, 0]
    paper_t = np.arange(1, T + 1)
    weights = (2 * T - paper_t).astype(np.float64)  # index i <-> paper t = i + 1
    assert _binned_chisquare(t, weights, bins=50) > 1e-3
    # Low-noise steps dominate as the paper intends: P(i < 500) = 874750 / 1499500 = 0.5834.
    assert abs((t < T // 2).double().mean().item() - 874750 / 1499500) < 0.01


def test_chisquare_check_has_power():
    # The same check must reject uniform draws, or the test above could not fail.
    T, draws = 1000, 100_000
    t = PerVolumeTimestepSampler()(draws, 1, T, generator=torch.Generator().manual_seed(0))[:, 0]
    weights = (2 * T - np.arange(1, T + 1)).astype(np.float64)
    assert _binned_chisquare(t, weights, bins=50) < 1e-6


def test_uniform_slice_is_uniform():
    T = 100
    t = PerSliceTimestepSampler()(1000, 100, T, generator=torch.Generator().manual_seed(0)).flatten()
    assert _binned_chisquare(t, np.ones(T), bins=20) > 1e-3


@pytest.mark.parametrize("args", [(0, 1, 10), (1, 0, 10), (1, 1, 0), (1.5, 1, 10), (1, 1, -3), (True, 1, 10)])
@pytest.mark.parametrize("name", BUILTIN)
def test_bad_sizes_name_the_argument(registry, name, args):
    with pytest.raises(ValueError, match=r"num_(volumes|slices|train_timesteps) must be a positive integer, got"):
        registry.create(name)(*args)


def test_numpy_ints_accepted():
    t = MakeAVolumeTimestepSampler()(np.int64(2), np.int64(3), np.int64(10))
    assert t.shape == (2, 3)


def test_bad_weights_shape_is_a_clear_error():
    class Broken(PerVolumeTimestepSampler):
        def weights(self, num_train_timesteps):
            return torch.ones(num_train_timesteps + 1)

    with pytest.raises(ValueError, match=r"Broken.weights\(10\) must have shape \(10,\), got \(11,\)"):
        Broken()(1, 1, 10)
