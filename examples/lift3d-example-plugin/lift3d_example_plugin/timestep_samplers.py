"""``low-noise-volume``: one timestep per volume, uniform over the least noisy steps.

A sharper version of Make-A-Volume's stage-2 sampler, for fine-tuning detail only.
"""

from __future__ import annotations

import math

import torch


class LowNoiseVolumeTimestepSampler:
    """One t per volume, shared by its slices, uniform over ``[0, ceil(max_fraction * T))``."""

    per_volume = True

    def __init__(self, *, max_fraction: float = 0.5) -> None:
        if not 0 < max_fraction <= 1:
            raise ValueError(f"low-noise-volume: max_fraction must be in (0, 1], got {max_fraction!r}")
        self.max_fraction = max_fraction

    def __call__(self, num_volumes, num_slices, num_train_timesteps, *, generator=None, device=None):
        high = max(1, math.ceil(self.max_fraction * num_train_timesteps))
        # Draw on the generator's device (torch requires it), then move to the batch's device.
        draw_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, high, (num_volumes,), generator=generator, device=draw_device)
        return t[:, None].repeat(1, num_slices).to(device or draw_device)
