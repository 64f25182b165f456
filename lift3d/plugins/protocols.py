"""The contracts between lift3d's core and its plugins (datasets, autoencoders, timestep samplers).

Shapes follow one convention everywhere: a volume is ``(c, n, h, w)`` with ``n`` slices along the
chosen slice axis; a batch of volumes is ``(b, c, n, h, w)``; a batch of slices is ``(b n) c h w``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Autoencoder(Protocol):
    """Maps image slices to latents and back. Latents are already multiplied by ``scaling_factor``.

    ``encode``: ``(B, image_channels, H, W)`` in [-1, 1] -> ``(B, latent_channels, H/f, W/f)``.
    ``decode``: the inverse. ``f`` is ``downsampling_factor``. Implementations process a large
    batch of slices in chunks so memory stays bounded for 100+ slice volumes.
    """

    image_channels: int
    latent_channels: int
    downsampling_factor: int
    scaling_factor: float

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class TimestepSampler(Protocol):
    """Draws training timesteps for ``num_volumes`` volumes of ``num_slices`` slices.

    Returns a ``(num_volumes, num_slices)`` int64 tensor of 0-based diffusers timesteps in
    ``[0, num_train_timesteps)``. ``per_volume`` says whether all slices of a volume share one t.
    """

    per_volume: bool

    def __call__(
        self,
        num_volumes: int,
        num_slices: int,
        num_train_timesteps: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor: ...


@dataclass
class VolumePair:
    """One subject: source and target volumes ``(c, n, h, w)`` in [-1, 1] on the training grid.

    ``meta`` holds whatever is needed to write a result back on the source's own grid (affine,
    shape, orientation, intensity scaling); :func:`lift3d.data.save_volume` consumes it.
    """

    subject: str
    source: Tensor
    target: Tensor | None
    meta: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PairedVolumeDataset(Protocol):
    """A dataset plugin: a sequence of :class:`VolumePair`, lazily loaded.

    ``slices()`` gives a shuffled-slice view for stage 1 (items ``{"source": (c, h, w),
    "target": (c, h, w)}``); ``volumes(window=None)`` gives whole volumes, or windows of
    ``window`` consecutive slices, for stage 2 (items ``{"source": (c, n, h, w), "target": ...}``).
    Both views come from the same object.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> VolumePair: ...

    def slices(self) -> torch.utils.data.Dataset: ...

    def volumes(self, window: int | None = None, stride: int | None = None) -> torch.utils.data.Dataset: ...
