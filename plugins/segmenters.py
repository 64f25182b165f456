"""Built-in segmenters, registered as any plugin's would be: ``tissue-unet``, the small 2.5D U-Net that lift3d
trains on real target volumes (``lift3d-finetune --run.stage segmenter``) to score synthesis by tissue Dice."""

from __future__ import annotations

from lift3d.evaluation.tissue_unet import load_tissue_segmenter
from lift3d.plugins import hookimpl


@hookimpl
def lift3d_register_segmenters(registry):
    registry.add("tissue-unet", load_tissue_segmenter)
