"""The module named by the ``lift3d`` entry point: it registers this package's plugins."""

from lift3d import hookimpl

from lift3d_example_plugin.datasets import SpheresDataset
from lift3d_example_plugin.timestep_samplers import LowNoiseVolumeTimestepSampler


@hookimpl
def lift3d_register_datasets(registry):
    registry.add("spheres", SpheresDataset)


@hookimpl
def lift3d_register_timestep_samplers(registry):
    registry.add("low-noise-volume", LowNoiseVolumeTimestepSampler)
