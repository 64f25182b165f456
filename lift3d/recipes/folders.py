"""Volumes on a training grid written as a ``paired-nifti`` folder, so that what a recipe scored can be scored
again, from the files alone, by ``lift3d-evaluate`` (and fitted again by ``lift3d fit``).

Each volume is written as the ``(n, h, w)`` array the recipe saw, in RAS order with the grid's voxel size:
``lift3d.data.orientation.to_slices`` reads back exactly that array. Target and predictions share the
target's intensity map, which every metric is invariant to; the source keeps its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import nibabel as nib
import numpy as np
import torch

from lift3d.data.orientation import SLICE_AXES, from_slices
from lift3d.data.volume import std_scale
from lift3d.io.writing import atomic_path, make_folder

RAS = ("R", "A", "S")
MASK_NAME = "brainmask"


def grid_image(array: Any, spacing: Iterable[float], slice_axis: str = "axial",
               intensity: Any = None) -> nib.Nifti1Image:
    """``array`` ``(n, h, w)`` (or ``(1, n, h, w)``) on a training grid of voxel size ``spacing`` (slice, row,
    column) as a RAS NIfTI image; ``intensity`` (an ``IntensityScaling``) maps
    [-1, 1] back to its scanner units."""
    data = np.asarray(array.detach().cpu().float() if hasattr(array, "detach") else array, dtype=np.float32)
    data = data[0] if data.ndim == 4 else data
    if intensity is not None:
        data = intensity.denormalise(data).astype(np.float32)
    ras_spacing = [1.0, 1.0, 1.0]
    for k, ras_axis in enumerate(SLICE_AXES[slice_axis]):
        ras_spacing[ras_axis] = float(list(spacing)[k])
    image = nib.Nifti1Image(np.ascontiguousarray(from_slices(data, RAS, slice_axis)), np.diag([*ras_spacing, 1.0]))
    image.header.set_xyzt_units("mm")
    return image


def save_image(path: Path, image: nib.Nifti1Image) -> Path:
    with atomic_path(path, ".nii.gz") as tmp:
        nib.save(image, str(tmp))
    return path


def _target_intensity(pair: Any) -> Any:
    meta = pair.extra.get("target_meta")
    return None if meta is None else meta.intensity


def write_pairs(folder: Path, pairs: Iterable[Any], *, source: str, target: str, slice_axis: str = "axial") -> Path:
    """Write every pair as ``folder/<subject>/<source>.nii.gz``, ``<target>.nii.gz`` and, where the pair has a
    mask, ``brainmask.nii.gz``: a ``paired-nifti`` folder on the training grid."""
    for pair in pairs:
        where = make_folder(folder, pair.subject)
        spacing = pair.meta.grid_spacing
        save_image(where / f"{source}.nii.gz", grid_image(pair.source, spacing, slice_axis, pair.meta.intensity))
        save_image(where / f"{target}.nii.gz", grid_image(pair.target, spacing, slice_axis, _target_intensity(pair)))
        if "mask" in pair.extra:
            mask = pair.extra["mask"].to(dtype=torch.float32)
            save_image(where / f"{MASK_NAME}.nii.gz", grid_image(mask, spacing, slice_axis))
    return folder


def write_predictions(folder: Path, pairs: Iterable[Any], predictions: Mapping[str, Any],
                      slice_axis: str = "axial") -> list[Path]:
    """Write each subject's prediction (``(n, h, w)`` in [-1, 1]) as ``folder/<subject>_synth.nii.gz`` on the
    training grid, in the target's intensity units: what ``lift3d-evaluate --pred folder`` reads."""
    written = []
    for pair in pairs:
        image = grid_image(predictions[pair.subject], pair.meta.grid_spacing, slice_axis, _target_intensity(pair))
        written.append(save_image(make_folder(folder) / f"{pair.subject}_synth.nii.gz", image))
    return written


def write_std(folder: Path, pair: Any, std: Any, slice_axis: str = "axial") -> Path:
    """Write a std map (on the [-1, 1] scale of the synthesis) as ``folder/<subject>_std.nii.gz`` on the
    training grid, in the target's units (as a scale: ``lift3d.data.volume.std_scale``)."""
    meta, intensity = pair.extra.get("target_meta"), None
    if meta is not None:
        std, scaled = std_scale(std, meta)
        intensity = scaled.intensity
    return save_image(make_folder(folder) / f"{pair.subject}_std.nii.gz",
                      grid_image(std, pair.meta.grid_spacing, slice_axis, intensity))
