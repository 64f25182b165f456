"""Training stages, one file each: every module of this package is imported here, and each built-in stage
registers itself in ``STAGES`` from its own file (``@STAGES.register("slices")``), so a new stage is one
new file. A plugin adds a stage through the hook ``lift3d_register_stages``.

A stage (``Stage``) carries its name, its own config section, how it prepares its models, its data
view, its memory estimate and its export label; the one loop in ``lift3d.training.loop`` trains it.
"""

from __future__ import annotations

import importlib
import pkgutil

from lift3d.training.stages.registry import STAGES, Stage, get_stage, stages

__all__ = ["STAGES", "Stage", "get_stage", "stages"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
