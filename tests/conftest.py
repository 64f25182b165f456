"""Shared fixtures: tiny models built from configs, never from a hub."""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("LIFT3D_DISABLE_PLUGIN_AUTOLOAD", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Fuzzing: every run draws a small sample of each fuzz test's examples, so the default suite stays fast;
# LIFT3D_HYPOTHESIS_PROFILE=thorough draws the full count each test names (thousands in all).
HYPOTHESIS_PROFILE_ENV = "LIFT3D_HYPOTHESIS_PROFILE"
FUZZ_FRACTION = {"default": 0.05, "thorough": 1.0}
FUZZ_MINIMUM = 10


def hypothesis_profile(environ: dict[str, str]) -> str:
    """The profile ``environ`` asks for (``default`` when unset); an unknown one stops pytest in one line."""
    name = environ.get(HYPOTHESIS_PROFILE_ENV, "default")
    if name not in FUZZ_FRACTION:
        raise pytest.UsageError(f"{HYPOTHESIS_PROFILE_ENV}={name!r} is not a hypothesis profile; "
                                f"valid: {', '.join(FUZZ_FRACTION)}")
    return name


HYPOTHESIS_PROFILE = hypothesis_profile(os.environ)
settings.register_profile("default", max_examples=FUZZ_MINIMUM * 2, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(HYPOTHESIS_PROFILE)


def fuzz_examples(thorough: int) -> int:
    """A fuzz test's example count: ``thorough`` under the thorough profile, a twentieth of it (at least
    10) under the default one."""
    return max(FUZZ_MINIMUM, round(thorough * FUZZ_FRACTION[HYPOTHESIS_PROFILE]))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as module ``name`` (registered while in use: dataclasses look
    their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def tiny_unet2d(in_channels: int = 2, out_channels: int = 1, sample_size: int = 16):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_unet2d_condition():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=8, attention_head_dim=4,
    ).eval()


@pytest.fixture
def unet2d():
    return tiny_unet2d()


@pytest.fixture
def unet2d_condition():
    return tiny_unet2d_condition()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny convolutions: a second thread only adds OpenMP
    synchronisation, which on a busy 2-core machine made such modules about ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
