"""Loading one subject's pair: read, align the target (and mask) onto the source, prepare both.

The result is a ``lift3d.plugins.protocols.VolumePair`` whose ``meta`` is the source's
``VolumeMeta``, so a synthesised target can be written back on the source's own grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nibabel import Nifti1Image

from lift3d.data.align import align_to
from lift3d.data.errors import VolumeError
from lift3d.data.nifti import load_image
from lift3d.data.volume import TrainingGrid, prepare_volume
from lift3d.plugins.protocols import VolumePair


def load_pair(
    subject: str,
    source: Path | str,
    target: Path | str | None,
    grid: TrainingGrid,
    *,
    mask: Path | str | None = None,
    apply_mask: bool = False,
    min_overlap: float = 0.5,
) -> VolumePair:
    """Subject ``subject`` on ``grid``: source and target ``(1, n, h, w)`` float32 in [-1, 1].

    The target (and the mask) are aligned onto the source's grid first. ``extra`` holds
    ``target_meta`` (to write a target back) and, with a mask, ``mask`` ``(1, n, h, w)`` bool.
    ``apply_mask`` sets voxels outside the mask to each image's minimum before normalising.
    """
    source_image = load_image(source)
    target_image = None
    if target is not None:
        target_image = align_to(source_image, load_image(target), min_overlap=min_overlap, names=(source, target))
    mask_array = None
    if mask is not None:
        mask_image = align_to(source_image, load_image(mask), order=0, min_overlap=min_overlap, names=(source, mask))
        mask_array = np.asarray(mask_image.dataobj) > 0.5
        if not mask_array.any():
            raise VolumeError(f"{mask}: the mask is empty on the grid of {source}")
        if apply_mask:
            source_image = _masked(source_image, mask_array)
            target_image = _masked(target_image, mask_array) if target_image is not None else None

    source_array, meta = prepare_volume(source_image, grid, path=source)
    pair = VolumePair(subject=subject, source=torch.from_numpy(source_array[None]), target=None, meta=meta)
    if target_image is not None:
        target_array, pair.extra["target_meta"] = prepare_volume(target_image, grid, path=target)
        pair.target = torch.from_numpy(target_array[None])
    if mask_array is not None:
        mask_on_grid, _ = prepare_volume(
            Nifti1Image(mask_array.astype(np.float32), source_image.affine), grid, order=0, normalise=False
        )
        pair.extra["mask"] = torch.from_numpy(mask_on_grid[None] > 0.5)
    return pair


def _masked(image: Nifti1Image, mask: np.ndarray) -> Nifti1Image:
    data = np.asarray(image.dataobj, dtype=np.float32)
    return Nifti1Image(np.where(mask, data, data.min()), image.affine, image.header)
