"""The registries of the kinds whose built-ins are plugins (``plugins/``, installed as ``lift3d_plugins``).

Their built-ins come through the entry points ``datasets``, ``autoencoders`` and ``timestep_samplers`` of
lift3d's own ``pyproject.toml``, exactly as a third party's names do; the core never imports them.
"""

from __future__ import annotations

from typing import Any

from lift3d.plugins.registry import Registry

DATASETS: Registry[Any] = Registry(
    "datasets", doc="paired source/target volumes (lift3d.plugins.protocols.PairedVolumeDataset)")
AUTOENCODERS: Registry[Any] = Registry(
    "autoencoders", doc="slices to latents and back (lift3d.plugins.protocols.Autoencoder)")
TIMESTEP_SAMPLERS: Registry[Any] = Registry(
    "timestep_samplers", doc="draws the training timestep of each slice (lift3d.plugins.protocols.TimestepSampler)")
