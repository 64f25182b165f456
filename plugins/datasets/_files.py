"""The shared base of the file-backed dataset plugins: a list of subject files on a training grid.

Subclasses find the files (folder layout, CSV, RIRE's layout) and pass them in; this class
chooses the split and loads a subject only when it is indexed.
"""

from __future__ import annotations

import math

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lift3d.data.dataset import VolumeDataset
from lift3d.data.errors import VolumeError
from lift3d.data.nifti import NIFTI_SUFFIXES, image_suffix
from lift3d.data.pairs import load_pair
from lift3d.data.splits import SubjectList, select_split
from lift3d.data.volume import TrainingGrid
from lift3d.io.budget import check_bytes
from lift3d.io.errors import BudgetError
from lift3d.plugins.protocols import VolumePair


@dataclass(frozen=True)
class SubjectFiles:
    subject: str
    source: Path
    target: Path | None  # None: inference only, the pair's target is None
    mask: Path | None = None


def modality_candidates(folder: Path, name: str) -> list[Path]:
    """``name`` as given if it has an image suffix, else ``name.nii.gz`` then ``name.nii``."""
    if image_suffix(name) is not None:
        return [folder / name]
    return [folder / f"{name}{suffix}" for suffix in NIFTI_SUFFIXES]


def find_first(candidates: Sequence[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def visible_entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, sorted, without hidden names: other programs' files, and lift3d's own
    temporaries, which a killed writer may have left half-written."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def check_root(root: Path | str | None, dataset: str) -> Path:
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs root=<folder>")
    root = Path(root).expanduser()
    if not root.exists():
        raise VolumeError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise VolumeError(f"{root}: is not a folder; dataset {dataset!r} needs a folder")
    return root


def subject_folders(root: Path) -> list[Path]:
    return [p for p in visible_entries(root) if p.is_dir()]


def missing_error(root: Path, missing: list[str], expected: str) -> VolumeError:
    shown = "; ".join(missing[:10]) + (f"; and {len(missing) - 10} more" if len(missing) > 10 else "")
    return VolumeError(f"{root}: {len(missing)} subject(s) lack a file ({expected}): {shown}")


# Volumes on the training grid held at once while one subject is served (reading, resampling, scaling),
# and per cached subject (source, target, mask).
GRID_WORKING_VOLUMES = 6
CACHED_VOLUMES = 3


class PairedFilesDataset(VolumeDataset):
    """Pairs of image files, one subject each, served on one ``TrainingGrid``.

    Common options: ``split`` (train/val/test/all), explicit ``train``/``val``/``test`` subject
    lists or seeded ``test_size``/``val_size`` (int = count, float = fraction) with ``seed``;
    ``size`` (int or (h, w)), ``num_slices``, ``slice_axis``, ``multiple``, ``percentiles``;
    ``min_overlap`` for pairs on different grids; ``apply_mask``; ``cache``, ``cache_size``.
    """

    plugin_name = "paired-nifti"  # names the dataset in its errors

    def __init__(
        self,
        files: Sequence[SubjectFiles],
        *,
        where: object,
        split: str = "train",
        size: int | tuple[int, int] = 256,
        num_slices: int = 100,
        slice_axis: str = "axial",
        multiple: int = 8,
        percentiles: tuple[float, float] = (0.5, 99.5),
        train: SubjectList = None,
        val: SubjectList = None,
        test: SubjectList = None,
        test_size: int | float = 0.2,
        val_size: int | float = 0,
        seed: int = 0,
        min_overlap: float = 0.5,
        apply_mask: bool = False,
        cache: bool = False,
        cache_size: int | None = None,
    ) -> None:
        super().__init__(cache=cache, cache_size=cache_size)
        sizes = f"num_slices = {num_slices!r} and size = {size!r}"
        try:
            self.grid = TrainingGrid(size, num_slices, slice_axis, multiple, percentiles)
        except BudgetError as exc:
            raise BudgetError(f"{self.plugin_name}: {sizes}: {exc}") from None
        self.num_slices = self.grid.num_slices
        self.split = split
        self.min_overlap = float(min_overlap)
        self.apply_mask = bool(apply_mask)
        by_subject = {f.subject: f for f in files}
        if len(by_subject) != len(files):
            dupes = sorted(s for s, count in Counter(f.subject for f in files).items() if count > 1)
            raise VolumeError(f"{where}: subjects listed more than once: {', '.join(dupes)}")
        chosen = select_split(
            list(by_subject), split, train=train, val=val, test=test,
            test_size=test_size, val_size=val_size, seed=seed, where=where,
        )
        self.files = [by_subject[s] for s in chosen]
        cached = min(len(self.files), cache_size if isinstance(cache_size, int) else len(self.files)) if cache else 0
        held = GRID_WORKING_VOLUMES + CACHED_VOLUMES * cached
        check_bytes(4 * math.prod(self.grid.shape), f"{self.plugin_name}: {sizes} give "
                    f"{' x '.join(map(str, self.grid.shape))} float32 voxels; {held} such volumes (serving one subject"
                    + (f", and {cached} cached" if cached else "") + ")", copies=held)

    def subjects(self) -> list[str]:
        return [f.subject for f in self.files]

    def load(self, index: int) -> VolumePair:
        f = self.files[index]
        return load_pair(
            f.subject, f.source, f.target, self.grid,
            mask=f.mask, apply_mask=self.apply_mask, min_overlap=self.min_overlap,
        )
