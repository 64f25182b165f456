"""Prediction on new data, NIfTI in and NIfTI out: one call for a file or a nibabel image.

The source is canonicalised, put on the model's training grid, synthesised and put back on its own grid
with its own affine (``lift3d.data.volume.prepare_volume`` and its inverse). A model folder made by
``lift3d fit`` (``RUN`` or ``RUN/model``) is sampled as the fit chose on validation; any other lift3d
model folder with its objective's few-step preset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lift3d.data.nifti import load_image
from lift3d.data.orientation import orientation_codes, slice_shape, to_slice_order
from lift3d.data.volume import TrainingGrid, prepare_volume, restore_std, restore_volume
from lift3d.io.schemas import read_json

FIT_FILE = "lift3d_fit.json"
"""In a fit's ``RUN/model``: how the fit chose to sample the model (solver, steps, samples)."""
DEFAULT_PERCENTILES = (0.5, 99.5)
FINER = 2.0
"""A source whose voxels are this much finer than the grid it is synthesised on gets a one-line warning."""


class SamplingChoice(BaseModel):
    """``lift3d_fit.json``: how the fit chose to sample its model."""

    model_config = ConfigDict(strict=True, extra="forbid")
    solver: str = Field(min_length=1, max_length=64)
    steps: int = Field(ge=1, le=1000)
    samples: int = Field(ge=1, le=64)
    antithetic: bool = False  # the samples drawn in antithetic pairs (absent from fits made before it existed)


@dataclass
class Predicted:
    """The mean prediction (and with K >= 2 samples its std map), each a nibabel image on the source's grid."""

    image: nib.Nifti1Image
    std: nib.Nifti1Image | None
    unet_evaluations: int
    mean_on_grid: torch.Tensor  # (1, n, h, w) in [-1, 1] on the synthesis grid, and what puts it back: meta
    std_on_grid: torch.Tensor | None
    meta: Any

    def save(self, path: str | os.PathLike, std_path: str | os.PathLike | None = None) -> None:
        """Write the mean (and the std map to ``std_path``) as NIfTI on the source's grid, atomically."""
        from lift3d.data.nifti import save_volume
        from lift3d.sampling.synthesis import save_std_volume

        if self.std_on_grid is not None and std_path is not None:
            save_std_volume(std_path, self.std_on_grid[0], self.meta)
        save_volume(path, self.mean_on_grid, self.meta)


def model_folder(path: str | os.PathLike) -> Path:
    """``RUN/model`` for a fit's run folder, else ``path`` itself."""
    path = Path(path)
    return path / "model" if (path / "model" / FIT_FILE).is_file() else path


def sampling_choice(folder: Path | None, model: Any) -> dict[str, Any]:
    """The fit's choice in ``folder``, else the objective's few-step preset."""
    if folder is not None and (Path(folder) / FIT_FILE).is_file():
        return read_json(folder / FIT_FILE, SamplingChoice, folder=folder, what="sampling choice").model_dump()
    preset = dict(model.objective.fast)
    return {"solver": preset["solver"], "steps": int(preset["steps"]), "samples": int(preset.get("samples", 1)),
            "antithetic": False}


def model_grid(model: Any) -> dict[str, Any]:
    """Size, slice count, slice axis and percentiles of the grid ``model`` was trained on."""
    data = model.settings.data
    options = (data.options if data is not None else None) or {}
    size = options.get("size")
    if size is None:  # the dataset's default size; the U-Net was built for it
        size = int(model.unet.config.sample_size) * int(model.autoencoder.downsampling_factor)
    return {"size": tuple(size) if isinstance(size, (list, tuple)) else int(size),
            "num_slices": (data.num_slices if data is not None else None) or options.get("num_slices"),
            "slice_axis": options.get("slice_axis", "axial"),
            "percentiles": tuple(options.get("percentiles", DEFAULT_PERCENTILES))}


def finer_than_grid(image: nib.Nifti1Image, grid: TrainingGrid, name: str) -> str | None:
    """One line when ``image``'s voxels are more than ``FINER`` times finer than ``grid``'s, else None."""
    codes = orientation_codes(image.affine)
    voxel = to_slice_order(tuple(np.linalg.norm(image.affine[:3, :3], axis=0)), codes, grid.slice_axis)
    native = slice_shape(image.shape[:3], codes, grid.slice_axis)
    grid_voxel = [v * s / g for v, s, g in zip(voxel, native, grid.shape)]
    ratio = max(g / v for g, v in zip(grid_voxel, voxel))
    if ratio <= FINER:
        return None
    return (f"warning: {name} has {'x'.join(f'{v:.2g}' for v in voxel)} mm voxels, {ratio:.1f}x finer than the "
            f"model's {'x'.join(f'{v:.2g}' for v in grid_voxel)} mm grid ({'x'.join(map(str, grid.shape))}): "
            "the result has the grid's resolution, not the source's")


def predict_volume(model: Any, source: str | os.PathLike | nib.Nifti1Image, *, solver: str | None = None,
                   steps: int | None = None, samples: int | None = None, antithetic: bool | None = None, seed: int = 0,
                   device: str | torch.device | None = None, warn: Callable[[str], None] | None = print) -> Predicted:
    """Synthesise the target contrast of ``source`` (a NIfTI path or a nibabel image) on its own grid.

    :param model: a model folder (a fit's ``RUN``, ``RUN/model``, or any lift3d export) or a loaded
        ``lift3d.sampling.model.SynthesisModel``.
    :param solver: ``steps``, ``samples`` and ``antithetic``: override how the model is sampled (default: the
        fit's choice, else the objective's few-step preset). Another ``solver`` drops the fit's antithetic pairs
        unless ``antithetic`` is given too.
    :param warn: where the one-line warning for a source much finer than the model's grid goes (None: nowhere).
    """
    from lift3d.sampling.model import load_synthesis_model
    from lift3d.sampling.synthesis import synthesize_posterior

    if not hasattr(model, "unet"):
        model = load_synthesis_model(model_folder(model), device=device)
    choice = sampling_choice(model.folder, model)
    if solver is not None and solver != choice["solver"]:
        choice["antithetic"] = False  # the fit chose pairs for its own solver
    choice |= {k: v for k, v in {"solver": solver, "steps": steps, "samples": samples,
                                 "antithetic": antithetic}.items() if v is not None}
    name = str(source) if not isinstance(source, nib.Nifti1Image) else "the source image"
    image = load_image(source) if not isinstance(source, nib.Nifti1Image) else source
    settings = model_grid(model)
    grid = TrainingGrid(settings["size"], int(settings["num_slices"] or image.shape[2]), settings["slice_axis"],
                        model.size_multiple, settings["percentiles"])
    if warn is not None and (line := finer_than_grid(image, grid, name)):
        warn(line)
    array, meta = prepare_volume(image, grid, path=None if isinstance(source, nib.Nifti1Image) else source)
    result = synthesize_posterior(model, torch.from_numpy(array)[None, None], samples=choice["samples"],
                                  solver=choice["solver"], steps=choice["steps"], antithetic=choice["antithetic"],
                                  seed=seed, progress=False)

    std = None
    if result.std is not None:
        std = nib.Nifti1Image(restore_std(result.std[0, 0], meta), meta.affine)
    mean = result.mean[0].cpu()
    return Predicted(nib.Nifti1Image(restore_volume(mean, meta), meta.affine), std, result.unet_evaluations, mean,
                     None if result.std is None else result.std[0].cpu(), meta)
