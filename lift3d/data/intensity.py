"""Intensity normalisation: percentile clipping, then a linear map of ``[low, high]`` to [-1, 1].

The map is kept in ``IntensityScaling`` so a synthesised volume can be brought back to the
source's intensity range; values clipped away on the way in are not recovered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lift3d.data.errors import VolumeError


def check_percentiles(percentiles: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise ValueError(f"percentiles must be a pair (low, high), got {percentiles!r}") from None
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got ({low}, {high})")
    return low, high


@dataclass(frozen=True)
class IntensityScaling:
    """``low`` maps to -1 and ``high`` to +1; ``percentiles`` records where they came from."""

    low: float
    high: float
    percentiles: tuple[float, float] | None = None

    @classmethod
    def fit(cls, data: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5), *, source: object = "volume") -> "IntensityScaling":
        percentiles = check_percentiles(percentiles)
        low, high = (float(v) for v in np.percentile(data, percentiles))
        if not high > low:
            raise VolumeError(
                f"{source}: intensities between the {percentiles[0]} and {percentiles[1]} percentiles are "
                f"constant ({low:g}); the image is blank or nearly so and cannot be normalised"
            )
        return cls(low, high, percentiles)

    def normalise(self, data: np.ndarray) -> np.ndarray:
        """Clip to ``[low, high]`` and map to [-1, 1] (float32)."""
        out = (np.clip(data, self.low, self.high) - self.low) * (2.0 / (self.high - self.low)) - 1.0
        return out.astype(np.float32, copy=False)

    def denormalise(self, data: np.ndarray) -> np.ndarray:
        """The inverse map, [-1, 1] -> ``[low, high]`` (float32)."""
        out = (np.asarray(data, dtype=np.float64) + 1.0) * ((self.high - self.low) / 2.0) + self.low
        return out.astype(np.float32, copy=False)
