"""Training stages, one file each. A stage's ``prepare(cfg, dataset, output_dir)`` builds and checks its
networks before the run folder is touched, and returns ``make_task(accelerator)``: the
:class:`~lift3d.training.task.Task` (model, trained parameters, data, loss, validation, export) that the
one loop in :mod:`lift3d.training.loop` trains. A new stage is a file here and a line in :data:`STAGES`
(and its name in ``lift3d.training.config.STAGES``, which the command line offers).
"""

from __future__ import annotations

from typing import Any, Callable

from lift3d.training.stages import autoencoder, diffusion, segmenter

STAGES: dict[str, Callable[..., Callable[[Any], Any]]] = {
    "autoencoder": autoencoder.prepare,
    "slices": diffusion.prepare,   # stage 1: a 2D U-Net, a timestep per slice
    "volumes": diffusion.prepare,  # stage 2: lifted, a timestep per volume
    "segmenter": segmenter.prepare,  # the tissue segmenter that scores synthesis
}
