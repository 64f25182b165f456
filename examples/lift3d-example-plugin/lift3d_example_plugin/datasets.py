"""``spheres``: synthetic paired volumes, a solid ball (source) and its shell (target).

Needs no files, so it is handy for trying a training run end to end.
"""

from __future__ import annotations

import torch

from lift3d.data.dataset import VolumeDataset
from lift3d.plugins.protocols import VolumePair


class SpheresDataset(VolumeDataset):
    """``num_subjects`` volumes ``(1, num_slices, size, size)`` in [-1, 1], reproducible from ``seed``."""

    def __init__(
        self,
        *,
        num_subjects: int = 4,
        num_slices: int = 8,
        size: int = 32,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        for name, value, low in (("num_subjects", num_subjects, 1), ("num_slices", num_slices, 2), ("size", size, 8)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"spheres: {name} must be an int >= {low}, got {value!r}")
        super().__init__(cache=cache)
        self.num_subjects, self.num_slices, self.size, self.seed = num_subjects, num_slices, size, seed

    def subjects(self) -> list[str]:
        return [f"sphere-{i:03d}" for i in range(self.num_subjects)]

    def load(self, index: int) -> VolumePair:
        # One generator per subject: subject i is the same whichever order subjects are loaded in.
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        centre = 0.3 * (torch.rand(3, generator=g) - 0.5)  # (z, y, x) in [-0.15, 0.15]
        radius = 0.4 + 0.3 * torch.rand((), generator=g)  # in [0.4, 0.7]
        z = torch.linspace(-1, 1, self.num_slices)
        yx = torch.linspace(-1, 1, self.size)
        zz, yy, xx = torch.meshgrid(z - centre[0], yx - centre[1], yx - centre[2], indexing="ij")
        distance = (zz**2 + yy**2 + xx**2).sqrt()
        ball = distance <= radius
        shell = ball & (distance >= 0.75 * radius)
        source = torch.where(ball, 1.0, -1.0)[None]  # (1, n, h, w)
        target = torch.where(shell, 1.0, -1.0)[None]
        return VolumePair(subject=self.subjects()[index], source=source, target=target, meta=None)
