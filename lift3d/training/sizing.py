"""Measuring what a model needs before it exists: parameters counted on torch's meta device (nothing is
allocated), a quick lower bound for sizes too large even to build there, and the check of weights, gradients
and AdamW moments against the memory budget (``lift3d.io.budget``). Each stage's
``memory`` uses these."""

from __future__ import annotations

from typing import Any, Callable

from lift3d.io.budget import check_bytes
from lift3d.io.errors import Lift3dError
from lift3d.training.options import ConfigError

# Per diffusion step: betas, alphas, alphas_cumprod and timesteps (DDPM), the stage-2 sampler's float64 weights,
# and DPM-Solver++'s alpha_t, sigma_t and lambda_t: eight arrays of at most 8 bytes.
TIMESTEP_BYTES = 64
# Trained weights also hold a gradient and AdamW's two moments.
TRAINED_COPIES = 4


def resnet_lower_bound(widths_: list[int], layers: int) -> int:
    """Parameters a 2D U-Net or autoencoder of these widths has at least: each resnet's second 3x3 conv,
    ``layers`` per level down and ``layers + 1`` up. Exact integers: a width of 10**30 gives a huge number,
    not an overflow, and is refused before torch is asked to build anything."""
    return 9 * sum((2 * layers + 1) * w * w for w in widths_)


def on_meta(build: Callable[[], Any], what: str) -> Any:
    """``build()`` on torch's meta device; a library's refusal of its arguments becomes one line naming ``what``."""
    import torch

    try:
        with torch.device("meta"):
            return build()
    except Lift3dError:
        raise
    except Exception as exc:  # diffusers' own checks of its arguments; the config layer tells which options
        raise ConfigError(f"{what} cannot be built: {type(exc).__name__}: {exc}".replace("\n", " ")) from None


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def check_training_bytes(weights: int, trained: int, what: str, ema: bool) -> None:
    """Refuse ``weights`` bytes of which ``trained`` also hold a gradient and AdamW's two moments (and an EMA copy)
    when they would not fit in the budget."""
    copies = TRAINED_COPIES + (1 if ema else 0)
    check_bytes(min(weights + (copies - 1) * trained, 2**100), what)


def check_schedule_bytes(num_train_timesteps: int) -> None:
    """Refuse a noise schedule whose arrays would not fit in the budget."""
    check_bytes(TIMESTEP_BYTES * num_train_timesteps,
                f"diffusion.num_train_timesteps = {num_train_timesteps}: the noise schedule's arrays")
