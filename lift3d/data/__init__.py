"""Volumes in and out: NIfTI reading, canonical orientation, resampling, normalisation, writing back."""

from lift3d.data.errors import VolumeError
from lift3d.data.nifti import load_image, save_volume
from lift3d.data.volume import TrainingGrid, VolumeMeta, prepare_volume, restore_volume

__all__ = ["TrainingGrid", "VolumeError", "VolumeMeta", "load_image", "prepare_volume", "restore_volume", "save_volume"]
