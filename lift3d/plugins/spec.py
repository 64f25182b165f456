"""Hook specifications: the kinds of lift3d plugin (datasets, autoencoders, timestep samplers, layer kinds,
objectives, segmenters).

A plugin module implements any of these with ``@lift3d.hookimpl`` and registers names on the
typed registry it receives, e.g. ``registry.add("phantom", PhantomDataset)``.
"""

from __future__ import annotations

import pluggy

NAME = "lift3d"

hookspec = pluggy.HookspecMarker(NAME)


@hookspec
def lift3d_register_datasets(registry):
    """Register dataset factories.

    :param registry: a :class:`lift3d.plugins.Registry` of datasets; call
        ``registry.add(name, factory)`` where ``factory(**options)`` returns an object that
        follows :class:`lift3d.plugins.protocols.PairedVolumeDataset`.
    """


@hookspec
def lift3d_register_autoencoders(registry):
    """Register autoencoder factories.

    :param registry: a :class:`lift3d.plugins.Registry` of autoencoders; ``factory(**options)``
        returns an object that follows :class:`lift3d.plugins.protocols.Autoencoder`.
    """


@hookspec
def lift3d_register_timestep_samplers(registry):
    """Register timestep-sampler factories.

    :param registry: a :class:`lift3d.plugins.Registry` of timestep samplers;
        ``factory(**options)`` returns an object that follows
        :class:`lift3d.plugins.protocols.TimestepSampler`.
    """


@hookspec
def lift3d_register_layer_kinds(registry):
    """Register kinds of volumetric layer, the layers :func:`lift3d.lifting.inflate` inserts (``kind=``).

    :param registry: a :class:`lift3d.plugins.Registry` of layer kinds; ``factory(channels, *,
        kernel_size, padding_mode, device, dtype, **options)`` returns an ``nn.Module`` whose
        ``forward(x, num_slices)`` maps a ``(b n) c h w`` batch of slices to the same shape, is the
        identity exactly after its ``reset_parameters()``, and never mixes different volumes. See
        :mod:`lift3d.layers.registry` for the optional methods (``init_random_``, ``fuse_into``).
    """


@hookspec
def lift3d_register_objectives(registry):
    """Register training objectives: how latents are noised, what the U-Net predicts, which samplers apply.

    :param registry: a :class:`lift3d.plugins.Registry` of objectives; ``factory(**scheduler_config)``
        (the keys of a diffusers scheduler config, plus the objective's own options such as
        ``train_steps``; unknown keys ignored) returns an object that follows
        :class:`lift3d.plugins.protocols.Objective`.
    """


@hookspec
def lift3d_register_segmenters(registry):
    """Register segmenters: networks that label tissue in a volume, used to score synthesis downstream.

    :param registry: a :class:`lift3d.plugins.Registry` of segmenters; ``factory(*, path, **options)`` loads
        the segmenter saved in the folder ``path`` and returns an object that follows
        :class:`lift3d.plugins.protocols.Segmenter`. ``lift3d.evaluation.segmentation.load_segmenter(path)``
        calls the factory its folder's ``segmenter.json`` names (``"plugin"``).
    """
