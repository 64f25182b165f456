"""Hook specifications: the three kinds of lift3d plugin (datasets, autoencoders, timestep samplers).

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
        follows :class:`lift3d.protocols.PairedVolumeDataset`.
    """


@hookspec
def lift3d_register_autoencoders(registry):
    """Register autoencoder factories.

    :param registry: a :class:`lift3d.plugins.Registry` of autoencoders; ``factory(**options)``
        returns an object that follows :class:`lift3d.protocols.Autoencoder`.
    """


@hookspec
def lift3d_register_timestep_samplers(registry):
    """Register timestep-sampler factories.

    :param registry: a :class:`lift3d.plugins.Registry` of timestep samplers;
        ``factory(**options)`` returns an object that follows
        :class:`lift3d.protocols.TimestepSampler`.
    """
