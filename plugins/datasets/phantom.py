"""``phantom``: procedurally generated paired head volumes, no files, deterministic by seed.

A brain-like head (scalp, skull, CSF, grey and white matter, ventricles) with oblique vessels,
seen in a T1-like modality (WM > GM > CSF; vessels dark, as in SWI) and a T2-like one
(CSF > GM > WM; vessels bright, as in MRA). Each subject varies smoothly (shape, position,
rotation, cortical folding, ventricles, vessels, bias field) with ``seed`` and its index.
The default dataset for the demo and the tests, so it is vectorised numpy and fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lift3d.data.dataset import VolumeDataset
from lift3d.data.intensity import IntensityScaling
from lift3d.data.orientation import RAS, SLICE_AXES
from lift3d.data.splits import select_split
from lift3d.data.volume import TrainingGrid, VolumeMeta
from lift3d.io.budget import check_bytes, check_count
from lift3d.io.errors import BudgetError, Lift3dError
from lift3d.plugins.protocols import VolumePair

# Float32 volumes of the grid alive at once while one subject is generated (about 21, measured), and those a
# cached subject keeps: source and target, its int64 labels and its three float32 tissue maps.
WORKING_VOLUMES = 24
CACHED_VOLUMES = 7
# A subject name in the split lists, with Python's object overhead and the split's copies.
NAME_BYTES = 256

TISSUES = ("background", "scalp", "skull", "csf", "grey_matter", "white_matter", "vessel")

# Parameters are drawn as Python floats: NumPy scalars would promote the float32 arrays to float64.

# Tissue intensities in [0, 1] before the per-subject jitter (+-0.03, which keeps every order).
CONTRASTS: dict[str, dict[str, float]] = {
    "T1": {"background": 0.0, "scalp": 0.7, "skull": 0.08, "csf": 0.15, "grey_matter": 0.45, "white_matter": 0.75, "vessel": 0.03},
    "T2": {"background": 0.0, "scalp": 0.45, "skull": 0.06, "csf": 0.95, "grey_matter": 0.6, "white_matter": 0.35, "vessel": 1.0},
}


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _soft(distance: np.ndarray, width: float) -> np.ndarray:
    """A smooth inside indicator: ~1 where ``distance`` > 0 (inside), ~0 outside, partial-volume edge."""
    return (0.5 + 0.5 * np.tanh(distance / width)).astype(np.float32)


def _coordinates(shape: tuple[int, int, int], slice_axis: str) -> list[np.ndarray]:
    """Normalised RAS coordinates in (-1, 1), each broadcastable to ``shape`` (n, h, w)."""
    order = SLICE_AXES[slice_axis]
    coords = []
    for ras_axis in range(3):
        position = order.index(ras_axis)
        length = shape[position]
        view = [1, 1, 1]
        view[position] = length
        coords.append(((np.arange(length, dtype=np.float32) + 0.5) / length * 2 - 1).reshape(view))
    return coords


def generate_phantom(
    shape: tuple[int, int, int], rng: np.random.Generator, slice_axis: str = "axial"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One subject on ``shape`` ``(n, h, w)``: ``({"T1": ..., "T2": ...}`` in [0, 1], tissue labels).

    Labels index ``TISSUES``.
    """
    x, y, z = _coordinates(shape, slice_axis)
    width = 1.0 / min(shape)  # partial-volume edge: half a voxel along the coarsest axis (normalised units)
    cx, cy, cz = (float(c) for c in rng.normal(0.0, 0.03, 3))
    angle = rng.uniform(-0.15, 0.15)
    xc, yc, zc = x - cx, y - cy, z - cz
    cos, sin = math.cos(angle), math.sin(angle)
    xr = cos * xc + sin * yc
    yr = -sin * xc + cos * yc
    ax, ay, az = rng.uniform(0.78, 0.88), rng.uniform(0.86, 0.95), rng.uniform(0.8, 0.92)
    phi = np.arctan2(yr, xr)
    # Angular terms fade to 0 on the S axis, where phi is undefined, so nothing jumps there.
    in_plane = (xr**2 + yr**2) / (xr**2 + yr**2 + zc**2 + 1e-6)
    p = [float(v) for v in rng.uniform(0, 2 * np.pi, 6)]
    bumps = 1 + in_plane * (0.03 * np.sin(2 * phi + p[0]) + 0.02 * np.sin(3 * phi + p[1])) + 0.02 * zc
    r = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2 + (zc / az) ** 2) / bumps

    # Compartments a few voxels thick even on a 32 x 32 grid, so each has voxels free of partial volume.
    head = _soft(1.0 - r, width)
    skull = _soft(0.90 - r, width)  # inside the outer table of the skull
    brain = _soft(0.82 - r, width)  # inside the inner table: CSF and tissue
    cortex = _soft(0.72 - r, width)  # grey and white matter
    folding = in_plane * (0.04 * np.sin(7 * phi + p[2]) * np.cos(5 * zc + p[3]) + 0.02 * np.sin(11 * phi + p[4]))
    white = _soft(0.50 + folding - r, width) * cortex

    vx, vy, vz = (float(v) for v in rng.uniform(0.9, 1.2) * np.array([0.09, 0.28, 0.15]))
    offset = rng.uniform(0.1, 0.14)
    ventricles = np.maximum(
        *(_soft(1.0 - np.sqrt(((xr - s * offset) / vx) ** 2 + ((yr - 0.05) / vy) ** 2 + ((zc - 0.1) / vz) ** 2), width / vx)
          for s in (-1, 1))
    ) * cortex

    vessels = np.zeros(shape, dtype=np.float32)
    for _ in range(rng.integers(3, 6)):
        x0, y0 = (float(v) for v in rng.uniform(-0.35, 0.35, 2))
        slope = [float(v) for v in rng.uniform(0.25, 0.7, 2) * rng.choice([-1, 1], 2)]  # oblique: drift per unit S
        wiggle, freq, ph1, ph2 = rng.uniform(0.02, 0.06), rng.uniform(2, 5), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
        radius = max(rng.uniform(0.035, 0.06), 1.6 / min(shape[1:]))
        centre_x = x0 + slope[0] * zc + wiggle * np.sin(freq * zc + ph1)
        centre_y = y0 + slope[1] * zc + wiggle * np.cos(freq * zc + ph2)
        distance = np.sqrt((xr - centre_x) ** 2 + (yr - centre_y) ** 2)
        vessels = np.maximum(vessels, _soft(radius - distance, width))
    vessels *= cortex

    images = {}
    bias_axes = (x, y, z)
    for modality, contrast in CONTRASTS.items():
        v = {t: c + rng.uniform(-0.03, 0.03) if t != "background" else 0.0 for t, c in contrast.items()}
        tissue = v["csf"] * (1 - cortex) + cortex * (v["grey_matter"] * (1 - white) + white * v["white_matter"])
        tissue = tissue * (1 - ventricles) + ventricles * v["csf"]
        tissue = tissue * (1 - vessels) + vessels * v["vessel"]
        inside = v["skull"] * (1 - brain) + brain * tissue
        inside = v["scalp"] * (1 - skull) + skull * inside
        bias = 1 + sum(0.05 * float(c) * a for c, a in zip(rng.normal(0, 1, 3), bias_axes))
        image = head * inside * bias + rng.normal(0.0, 0.01, shape).astype(np.float32)
        images[modality] = np.clip(image, 0.0, 1.0).astype(np.float32)

    labels = np.zeros(shape, dtype=np.int64)
    for index, membership in enumerate((head, skull, brain, cortex, white), start=1):
        labels[membership > 0.5] = index
    labels[ventricles > 0.5] = TISSUES.index("csf")
    labels[vessels > 0.5] = TISSUES.index("vessel")
    return images, labels


def phantom_meta(grid: TrainingGrid) -> VolumeMeta:
    """A 1 mm isotropic RAS grid centred on the world origin; values [-1, 1] are written as [0, 1]."""
    order = SLICE_AXES[grid.slice_axis]
    ras_shape = tuple(grid.shape[order.index(axis)] for axis in range(3))
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(ras_shape, dtype=float) - 1) / 2
    return VolumeMeta(
        path=None, affine=affine, shape=ras_shape, orientation=RAS, slice_axis=grid.slice_axis,  # type: ignore[arg-type]
        slice_shape=grid.shape, grid_shape=grid.shape, intensity=IntensityScaling(0.0, 1.0),
    )


class PhantomDataset(VolumeDataset):
    """Generated T1-like -> T2-like head pairs (``source``/``target`` may be swapped).

    Subjects are ``phantom-000`` ... in index order; the split is not shuffled: training subjects
    come first, then ``val_size``, then ``test_size`` (int = count, float = fraction), so test
    subjects always come after the training ones and never overlap them. A subject depends only
    on ``seed`` and its index, never on the split or the load order. ``extra["labels"]`` holds
    the ``(n, h, w)`` tissue labels (indices into ``TISSUES``), and ``extra["tissue"]`` the same as
    ``(3, n, h, w)`` one-hot CSF, grey and white matter (``lift3d.data.tissue.TISSUES``). Nothing is
    generated until a subject is indexed.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        split: str = "train",
        size: int | tuple[int, int] = 64,
        num_slices: int = 32,
        slice_axis: str = "axial",
        multiple: int = 8,
        num_subjects: int = 10,
        test_size: int | float = 0.2,
        val_size: int | float = 0,
        seed: int = 0,
        source: str = "T1",
        target: str = "T2",
        cache: bool = False,
        cache_size: int | None = None,
    ) -> None:
        if root is not None:
            raise Lift3dError(f"dataset 'phantom' generates its volumes and reads no files; got root={str(root)!r}")
        for role, modality in (("source", source), ("target", target)):
            if not isinstance(modality, str) or modality not in CONTRASTS:
                raise Lift3dError(f"Unknown phantom {role} modality {modality!r}; valid: {', '.join(CONTRASTS)}")
        for name, value, low in (("num_subjects", num_subjects, 1), ("seed", seed, 0), ("cache_size", cache_size, 0)):
            if not (value is None and name == "cache_size") and not (_is_int(value) and value >= low):
                raise Lift3dError(f"phantom: {name} must be an integer >= {low}, got {value!r}")
        for name, value in (("split", split), ("slice_axis", slice_axis)):
            if not isinstance(value, str):
                raise Lift3dError(f"phantom: {name} must be a string, got {value!r}")
        if not isinstance(cache, bool):
            raise Lift3dError(f"phantom: cache must be true or false, got {cache!r}")
        check_count(num_subjects, NAME_BYTES, f"phantom: num_subjects = {num_subjects}: the subject names")
        options = f"num_slices = {num_slices!r} and size = {size!r}"
        try:  # the grid's and the split's own checks, told as this dataset's options
            grid = TrainingGrid(size, num_slices, slice_axis, multiple)
            names = [f"phantom-{i:03d}" for i in range(num_subjects)]
            subjects = select_split(names, split, test_size=test_size, val_size=val_size, shuffle=False, where="phantom")
        except BudgetError as exc:
            raise BudgetError(f"phantom: {options}: {exc}") from None
        except ValueError as exc:
            raise Lift3dError(f"phantom: {exc}") from None
        cached = min(len(subjects), len(subjects) if cache_size is None else cache_size) if cache else 0
        held = WORKING_VOLUMES + CACHED_VOLUMES * cached
        check_bytes(4 * math.prod(grid.shape), f"phantom: {options} give "
                    f"{' x '.join(map(str, grid.shape))} float32 voxels; {held} such volumes (generating one subject"
                    + (f", and {cached} cached" if cached else "") + ")", copies=held)
        super().__init__(cache=cache, cache_size=cache_size)
        self.grid = grid
        self.num_slices = self.grid.num_slices
        self.seed, self.source, self.target, self.split = int(seed), source, target, split
        self._subjects = subjects
        self.meta = phantom_meta(self.grid)

    def subjects(self) -> list[str]:
        return list(self._subjects)

    def load(self, index: int) -> VolumePair:
        subject = self._subjects[index]
        rng = np.random.default_rng([self.seed, int(subject.rsplit("-", 1)[1])])
        images, labels = generate_phantom(self.grid.shape, rng, self.grid.slice_axis)
        source, target = (torch.from_numpy(images[m][None] * 2 - 1) for m in (self.source, self.target))
        labels = torch.from_numpy(labels)
        # One-hot CSF, grey and white matter (lift3d.data.tissue.TISSUES), as a dataset with tissue gives them.
        tissue = torch.stack([labels == TISSUES.index(name) for name in ("csf", "grey_matter", "white_matter")])
        return VolumePair(subject, source, target, meta=self.meta, extra={"labels": labels, "tissue": tissue.float()})
