"""Hook specifications: one ``lift3d_register_<kind>`` per kind of extension (datasets, autoencoders,
timestep samplers, layer kinds, objectives, segmenters, solvers, stages).

A plugin module implements any of these with ``@lift3d.hookimpl`` and registers names on the
typed registry it receives, e.g. ``registry.add("phantom", PhantomDataset)``. Each hook is called once
per process, the first time its registry is asked for a name it lacks or for its list
(``lift3d.plugins.manager``).
"""

from __future__ import annotations

import pluggy

NAME = "lift3d"

hookspec = pluggy.HookspecMarker(NAME)


@hookspec
def lift3d_register_datasets(registry):
    """Register dataset factories.

    :param registry: a ``lift3d.plugins.Registry`` of datasets; call
        ``registry.add(name, factory)`` where ``factory(**options)`` returns an object that
        follows ``lift3d.plugins.protocols.PairedVolumeDataset``.
    """


@hookspec
def lift3d_register_autoencoders(registry):
    """Register autoencoder factories.

    :param registry: a ``lift3d.plugins.Registry`` of autoencoders; ``factory(**options)``
        returns an object that follows ``lift3d.plugins.protocols.Autoencoder``.
    """


@hookspec
def lift3d_register_timestep_samplers(registry):
    """Register timestep-sampler factories.

    :param registry: a ``lift3d.plugins.Registry`` of timestep samplers;
        ``factory(**options)`` returns an object that follows
        ``lift3d.plugins.protocols.TimestepSampler``.
    """


@hookspec
def lift3d_register_layer_kinds(registry):
    """Register kinds of volumetric layer, the layers ``lift3d.lifting.inflate`` inserts (``kind=``).

    :param registry: ``lift3d.layers.registry.LAYER_KINDS``; ``factory(channels, *,
        kernel_size, padding_mode, device, dtype, **options)`` returns an ``nn.Module`` whose
        ``forward(x, num_slices)`` maps a ``(b n) c h w`` batch of slices to the same shape, is the
        identity exactly after its ``reset_parameters()``, and never mixes different volumes. See
        ``lift3d.layers.registry`` for the optional methods (``init_random_``, ``fuse_into``).
    """


@hookspec
def lift3d_register_objectives(registry):
    """Register training objectives: how latents are noised, what the U-Net predicts, its default solver.

    :param registry: ``lift3d.diffusion.objectives.OBJECTIVES``; ``factory(**scheduler_config)``
        (the keys of a diffusers scheduler config, plus the objective's own options such as
        ``train_steps``; unknown keys ignored) returns an object that follows
        ``lift3d.plugins.protocols.Objective``.
    """


@hookspec
def lift3d_register_segmenters(registry):
    """Register segmenters: networks that label tissue in a volume, used to score synthesis downstream.

    :param registry: ``lift3d.evaluation.segmentation.SEGMENTERS``; ``factory(*, path, **options)`` loads
        the segmenter saved in the folder ``path`` and returns an object that follows
        ``lift3d.plugins.protocols.Segmenter``. ``lift3d.evaluation.segmentation.load_segmenter(path)``
        calls the factory its folder's ``segmenter.json`` names (``"plugin"``).
    """


@hookspec
def lift3d_register_solvers(registry):
    """Register solvers: what steps a trained network from noise back to a volume (DDIM, DPM-Solver++, Euler...).

    :param registry: ``lift3d.sampling.solvers.SOLVERS``; register a subclass of
        ``lift3d.sampling.solvers.Solver`` that declares what it is (``inverts``, ``stochastic``,
        ``needs_next_t``, ``informed_start``) and builds itself with ``build(objective, scheduler_config,
        steps)``; ``lift3d-synthesize --solver NAME`` then offers it.
    """


@hookspec
def lift3d_register_stages(registry):
    """Register training stages: one phase of training with its config section, models, data view, memory
    estimate and export label.

    :param registry: ``lift3d.training.stages.STAGES``; register a ``lift3d.training.stages.Stage``;
        ``lift3d-finetune --run.stage NAME`` then runs it.
    """
