"""Training: one Accelerate loop (:mod:`~lift3d.training.loop`, ``train(cfg)``) for every stage in
:mod:`~lift3d.training.stages`, configured by :mod:`~lift3d.training.config`, with pickle-free state
(:mod:`~lift3d.training.state`) in a run folder that belongs to one run (:mod:`~lift3d.training.checkpoints`)."""
