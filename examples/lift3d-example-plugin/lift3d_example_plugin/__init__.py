"""An example lift3d plugin: a synthetic ``spheres`` dataset and a ``low-noise-volume`` sampler."""

from lift3d_example_plugin.datasets import SpheresDataset
from lift3d_example_plugin.timestep_samplers import LowNoiseVolumeTimestepSampler

__all__ = ["LowNoiseVolumeTimestepSampler", "SpheresDataset"]
