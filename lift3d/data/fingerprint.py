"""The fingerprint of a paired dataset: what a plan is made from, and the checks that refuse a bad folder.

As nnU-Net's dataset fingerprint: voxel spacings, shapes, orientations, intensity percentiles inside
the mask and the subject count, read once from the files. ``fingerprint`` refuses, before any
training, each subject whose files cannot make a pair, in one line naming the subject and the problem.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lift3d.data.errors import VolumeError
from lift3d.data.nifti import load_image
from lift3d.data.orientation import orientation_codes

PERCENTILES = (0.5, 50.0, 99.5)
"""The intensity percentiles recorded inside the mask (or the non-zero voxels when there is none)."""

GRID_TOLERANCE_MM = 1e-3
"""How far a target's voxel centres may lie from its source's and still count as the same grid."""


@dataclass(frozen=True)
class SubjectFingerprint:
    """One subject's source grid and intensities: ``spacing`` in mm, ``orientation`` as RAS codes."""

    subject: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: tuple[str, str, str]
    source_percentiles: tuple[float, ...]
    target_percentiles: tuple[float, ...] | None
    mask_fraction: float | None


@dataclass(frozen=True)
class Fingerprint:
    """The whole dataset: every subject's fingerprint and their medians, as ``fingerprint`` read them."""

    source: str
    target: str | None
    subjects: tuple[SubjectFingerprint, ...]
    median_shape: tuple[int, int, int] = field(init=False)
    median_spacing: tuple[float, float, float] = field(init=False)
    orientations: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        shapes = np.array([s.shape for s in self.subjects], dtype=float)
        spacings = np.array([s.spacing for s in self.subjects], dtype=float)
        object.__setattr__(self, "median_shape", tuple(int(round(v)) for v in np.median(shapes, axis=0)))
        object.__setattr__(self, "median_spacing", tuple(round(float(v), 4) for v in np.median(spacings, axis=0)))
        object.__setattr__(self, "orientations", dict(Counter("".join(s.orientation) for s in self.subjects)))

    @property
    def count(self) -> int:
        return len(self.subjects)

    @property
    def anisotropy(self) -> float:
        """The largest median spacing over the smallest: 1 for isotropic voxels."""
        return max(self.median_spacing) / min(self.median_spacing)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``fingerprint.json`` holds)."""
        return {"source": self.source, "target": self.target, "subject_count": self.count,
                "median_shape": list(self.median_shape), "median_spacing_mm": list(self.median_spacing),
                "anisotropy": round(self.anisotropy, 3), "orientations": self.orientations,
                "percentiles": list(PERCENTILES), "subjects": [asdict(s) for s in self.subjects]}


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _percentiles(data: np.ndarray, inside: np.ndarray | None) -> tuple[float, ...]:
    values = data[inside] if inside is not None else data[data != 0]
    values = values if values.size else data.ravel()
    return tuple(round(float(v), 4) for v in np.percentile(values, PERCENTILES))


def _check_same_grid(subject: str, what: str, source, other, path: Path) -> None:
    """Refuse ``other`` unless it lies on ``source``'s voxel grid (same shape, same affine within a micron)."""
    if source.shape[:3] != other.shape[:3]:
        raise VolumeError(f"subject {subject}: its {what} {path.name} is {tuple(other.shape[:3])} voxels, its source "
                          f"{tuple(source.shape[:3])}; a pair must share one grid (resample one onto the other first)")
    if orientation_codes(source.affine) != orientation_codes(other.affine):
        raise VolumeError(f"subject {subject}: its {what} {path.name} is oriented "
                          f"{''.join(orientation_codes(other.affine))}, its source "
                          f"{''.join(orientation_codes(source.affine))}; a pair must share one orientation")
    corners = np.array([[0, 0, 0, 1], [*np.array(source.shape[:3]) - 1, 1]], dtype=float).T
    distance = np.abs(source.affine @ corners - other.affine @ corners).max()
    if distance > GRID_TOLERANCE_MM:
        raise VolumeError(f"subject {subject}: its {what} {path.name} lies {distance:.3g} mm from its source's grid; "
                          "a pair must share one grid (the same affine)")


def subject_fingerprint(subject: str, source: Path, target: Path | None = None,
                        mask: Path | None = None) -> SubjectFingerprint:
    """Read one subject's files, check they make a pair, and fingerprint them.

    Refused, each in one line naming the subject: an unreadable, 4D or non-finite image (through
    ``lift3d.data.nifti.load_image``), and a target or mask on another grid or orientation.
    """
    source_image = load_image(source)
    inside = None
    mask_fraction = None
    if mask is not None:
        mask_image = load_image(mask)
        _check_same_grid(subject, "mask", source_image, mask_image, Path(mask))
        inside = np.asarray(mask_image.dataobj) > 0.5
        if not inside.any():
            raise VolumeError(f"subject {subject}: its mask {Path(mask).name} is empty")
        mask_fraction = round(float(inside.mean()), 4)
    target_percentiles = None
    if target is not None:
        target_image = load_image(target)
        _check_same_grid(subject, "target", source_image, target_image, Path(target))
        target_percentiles = _percentiles(np.asarray(target_image.dataobj), inside)
    return SubjectFingerprint(
        subject=subject, shape=tuple(int(s) for s in source_image.shape[:3]), spacing=_spacing(source_image.affine),
        orientation=orientation_codes(source_image.affine),
        source_percentiles=_percentiles(np.asarray(source_image.dataobj), inside),
        target_percentiles=target_percentiles, mask_fraction=mask_fraction)


def check_subject_names(names: Iterable[str]) -> None:
    """Refuse duplicate subject names, naming them (two pairs under one name would be scored as one)."""
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if duplicates:
        raise VolumeError(f"duplicate subject names: {', '.join(duplicates)}; every subject needs its own name")


def check_subject_count(count: int, needed: int, split: str) -> None:
    """Refuse a dataset with fewer subjects than its split needs, saying how many it needs."""
    if count < needed:
        raise VolumeError(f"{count} subject(s) found, but the split {split} needs at least {needed}")


def fingerprint(pairs: Sequence[Any], *, source: str, target: str | None) -> Fingerprint:
    """Fingerprint every pair of ``pairs`` (objects with ``subject``, ``source``, ``target`` and ``mask``
    paths, as a file-backed dataset lists them), after refusing duplicate names."""
    if not pairs:
        raise VolumeError("no subjects to fingerprint")
    check_subject_names(p.subject for p in pairs)
    subjects = tuple(subject_fingerprint(p.subject, Path(p.source), p.target and Path(p.target),
                                         p.mask and Path(p.mask)) for p in pairs)
    return Fingerprint(source=source, target=target, subjects=subjects)


def fingerprint_pairs(pairs: Iterable[Any], *, source: str, target: str | None) -> Fingerprint:
    """The fingerprint of a dataset without files (a generated one, such as ``icbm152``), from its loaded pairs:
    each source's own grid from its :class:`~lift3d.data.volume.VolumeMeta`, intensities put back in its units."""
    from lift3d.data.volume import restore_volume

    subjects = []
    for pair in pairs:
        meta = pair.meta
        values = restore_volume(pair.source, meta)
        target_values = None if pair.target is None or "target_meta" not in pair.extra else \
            restore_volume(pair.target, pair.extra["target_meta"])
        subjects.append(SubjectFingerprint(
            subject=pair.subject, shape=tuple(int(s) for s in meta.shape),
            spacing=tuple(round(float(v), 4) for v in meta.voxel_size), orientation=tuple(meta.orientation),
            source_percentiles=_percentiles(values, None),
            target_percentiles=None if target_values is None else _percentiles(target_values, None),
            mask_fraction=None if "mask" not in pair.extra else round(float(pair.extra["mask"].float().mean()), 4)))
    check_subject_names(s.subject for s in subjects)
    return Fingerprint(source=source, target=target, subjects=tuple(subjects))
