"""The contracts between lift3d's core and its plugins (datasets, autoencoders, timestep samplers,
objectives, segmenters).

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


@runtime_checkable
class Objective(Protocol):
    """A training objective (``lift3d.diffusion.objectives``): how a clean latent is noised, what the
    U-Net learns to predict, and which solver samples it by default.

    ``t`` is the integer training timestep in ``[0, T)``; ``noisy`` also returns the timesteps the
    U-Net sees (they may differ, e.g. flow matching's ``s T``). Which solvers invert an objective each
    solver says itself (its ``inverts``, ``lift3d.sampling.solvers``), matching the objective's
    ``name``; ``default_solver`` names the one used when none is asked for, ``fast`` the few-step preset
    (``solver``, ``steps``, optionally ``start`` and ``strength``, ``samples``) of ``lift3d-synthesize
    --fast``. ``scheduler`` is the diffusers scheduler of the forward process, saved with the model;
    ``options`` are what an export records of the objective's own.
    """

    name: str
    prediction_type: str
    default_solver: str
    fast: dict[str, Any]
    scheduler: Any
    options: dict[str, Any]

    def training_timesteps(self, t: Tensor) -> Tensor: ...

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...

    def clean_estimate(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor: ...


@runtime_checkable
class Segmenter(Protocol):
    """Labels tissue in one volume, to score synthesis by a downstream task (``lift3d.evaluation.segmentation``).

    ``segment``: a volume ``(c, n, h, w)`` (or ``(n, h, w)``) in [-1, 1], scaled as a dataset gives it ->
    ``(n, h, w)`` int64 labels, 0 = background and ``i`` = ``classes[i - 1]``. ``input_grid``, if not None,
    is the grid ``lift3d-evaluate`` brings an image file onto before segmenting it: a dict with ``size``
    ``[h, w]``, ``num_slices``, ``slice_axis`` and ``percentiles`` (those of
    ``lift3d.data.volume.TrainingGrid``); None = the file's own voxels, sliced along ``--slice-axis``.
    """

    classes: tuple[str, ...]
    input_grid: dict[str, Any] | None

    def segment(self, volume: Tensor) -> Tensor: ...


@dataclass
class VolumePair:
    """One subject: source and target volumes ``(c, n, h, w)`` in [-1, 1] on the training grid.

    ``meta`` holds whatever is needed to write a result back on the source's own grid (affine,
    shape, orientation, intensity scaling); ``lift3d.data.save_volume`` consumes it.
    """

    subject: str
    source: Tensor
    target: Tensor | None
    meta: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PairedVolumeDataset(Protocol):
    """A dataset plugin: a sequence of ``VolumePair``, lazily loaded.

    ``slices()`` gives a shuffled-slice view for stage 1 (items ``{"source": (c, h, w),
    "target": (c, h, w)}``); ``volumes(window=None)`` gives whole volumes, or windows of
    ``window`` consecutive slices, for stage 2 (items ``{"source": (c, n, h, w), "target": ...}``).
    Both views come from the same object.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> VolumePair: ...

    def slices(self) -> torch.utils.data.Dataset: ...

    def volumes(self, window: int | None = None, stride: int | None = None) -> torch.utils.data.Dataset: ...
