"""The segmenter stage: the tissue segmenter that scores synthesis downstream (``lift3d.evaluation.segmentation``).

A small 2.5D U-Net (``lift3d.evaluation.tissue_unet``) learns CSF, grey and white matter from the *real*
target volumes of the training subjects and their tissue probability maps (a dataset's ``extra["tissue"]``):
cross-entropy with the soft labels (background = 1 - their sum) plus a soft Dice term (V-Net, Milletari et al.,
3DV 2016). Validation scores the Dice of its labels against the tissue maps' on the validation subjects' targets.
The export is a segmenter folder (``segmenter.json`` and ``model.safetensors``) that ``lift3d-evaluate
--segmenter`` and ``lift3d.evaluation.segmentation.load_segmenter`` read.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.data.context import context_indices
from lift3d.data.tissue import TISSUES, with_background
from lift3d.evaluation.segmentation import dice_scores
from lift3d.evaluation.tissue_unet import TissueSegmenter, TissueUNet
from lift3d.plugins import create
from lift3d.training.checkpoints import write_folder
from lift3d.training.data_order import IndexedView
from lift3d.training.options import Rule, at_least, from_to, opt, show_value
from lift3d.training.sections import DataConfig
from lift3d.training.sizing import on_meta, parameter_bytes
from lift3d.training.stages.registry import STAGES, Stage
from lift3d.training.task import Task

logger = logging.getLogger("lift3d.training.stages.segmenter")


@dataclass
class SegmenterConfig:
    """``[segmenter]``: the options of the segmenter stage."""

    block_out_channels: list[int] = opt([16, 32, 64], "segmenter stage: widths of the tissue U-Net, one level each "
                                        "(the slice is halved between levels)",
                                        rule=Rule(lambda v: 1 <= len(v) <= 6 and all(1 <= c <= 1024 for c in v),
                                                  "a list of 1 to 6 widths from 1 to 1024"))
    context: int = opt(1, "segmenter stage: the U-Net also sees this many neighbouring slices on each side",
                       rule=from_to(0, 16))
    dice_weight: float = opt(1.0, "segmenter stage: weight of the soft Dice term added to the cross-entropy with the "
                             "tissue probabilities", rule=at_least(0))


def tissue_of(pair, dataset_name: str) -> tuple[Tensor, Tensor]:
    """A subject's target ``(1, n, h, w)`` and its tissue probabilities with background, ``(K + 1, n, h, w)``."""
    tissue = pair.extra.get("tissue") if isinstance(pair.extra, dict) else None
    if pair.target is None or tissue is None:
        missing = "target" if pair.target is None else "tissue maps (extra['tissue'])"
        raise ValueError(f"the segmenter stage learns tissue from target volumes and their tissue maps, but subject "
                         f"{pair.subject!r} of dataset {dataset_name!r} has no {missing}; datasets with both: "
                         "icbm152, phantom")
    target = pair.target.float()
    if target.dim() != 4 or target.shape[0] != 1 or tuple(tissue.shape) != (len(TISSUES), *target.shape[1:]):
        raise ValueError(f"subject {pair.subject!r} of dataset {dataset_name!r}: target {tuple(target.shape)} and "
                         f"extra['tissue'] {tuple(tissue.shape)}; expected (1, n, h, w) and ({len(TISSUES)}, n, h, w) "
                         f"({', '.join(TISSUES)})")
    return target, with_background(tissue)


class TissueSlices(torch.utils.data.Dataset):
    """Every slice of every subject's target with its ``context`` neighbours (the edge slice repeated):
    items ``{"image": (2 context + 1, h, w), "tissue": (K + 1, h, w)}``. A subject is loaded once, when first read."""

    def __init__(self, dataset, dataset_name: str, context: int) -> None:
        self.dataset, self.dataset_name, self.context = dataset, dataset_name, int(context)
        self.num_slices = int(dataset.num_slices)
        self.loaded: dict[int, tuple[Tensor, Tensor]] = {}

    def subject(self, index: int) -> tuple[Tensor, Tensor]:
        if index not in self.loaded:
            self.loaded[index] = tissue_of(self.dataset[index], self.dataset_name)
        return self.loaded[index]

    def __len__(self) -> int:
        return len(self.dataset) * self.num_slices

    def __getitem__(self, index: int) -> dict:
        subject, k = divmod(index, self.num_slices)
        target, tissue = self.subject(subject)
        return {"image": target[0, context_indices(k, target.shape[1], self.context)], "tissue": tissue[:, k]}


def segmentation_loss(logits: Tensor, tissue: Tensor, dice_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy with the soft labels, plus ``dice_weight`` x (1 - the soft Dice of the tissue classes)."""
    logits, tissue = logits.float(), tissue.float()
    ce = F.cross_entropy(logits, tissue)
    probabilities = logits.softmax(1)
    dims = (0, 2, 3)
    overlap, total = (probabilities * tissue).sum(dims)[1:], (probabilities + tissue).sum(dims)[1:]
    soft_dice = ((2 * overlap + 1.0) / (total + 1.0)).mean()
    return ce + dice_weight * (1 - soft_dice), {"ce": ce.detach(), "soft_dice": soft_dice.detach()}


def validation_subjects(data: DataConfig, dataset) -> list[tuple[Tensor, Tensor]]:
    """Up to ``data.val_volumes`` subjects of the dataset's 'val' split, or the first training subject where it has none."""
    try:
        val = create("datasets", data.dataset, split="val", **data.options)
        pairs = [val[i] for i in range(min(data.val_volumes, len(val)))]
    except ValueError:  # the options gave the training split; an empty 'val' split is refused
        pairs = []
    if not pairs:
        logger.warning("dataset %r has no validation subjects: the segmenter is scored on training subject %r",
                       data.dataset, dataset[0].subject)
        pairs = [dataset[0]]
    return [tissue_of(pair, data.dataset) for pair in pairs]


def input_grid(dataset) -> dict[str, Any] | None:
    """The dataset's training grid, which ``lift3d-evaluate`` brings image files onto for this segmenter."""
    grid = getattr(dataset, "grid", None)
    if grid is None or not hasattr(grid, "percentiles"):
        return None
    meta = dataset[0].meta
    spacing = getattr(meta, "grid_spacing", None)
    return {"size": list(grid.size), "num_slices": int(grid.num_slices), "slice_axis": grid.slice_axis,
            "percentiles": [float(p) for p in grid.percentiles],
            "spacing_mm": None if spacing is None else [float(s) for s in spacing]}


def segmenter_task(segmenter: TissueSegmenter, view: TissueSlices, val_subjects: list[tuple[Tensor, Tensor]],
                   dice_weight: float, training: dict[str, Any], output_dir: Path, device) -> Task:
    """Learn the tissue maps of ``view``; the export records ``training`` (what the run was) and its last scores."""

    def loss(model, batch: dict, micro: int):
        return segmentation_loss(model(batch["image"].to(device)), batch["tissue"].to(device), dice_weight)

    def score(model) -> dict[str, float]:
        scored = TissueSegmenter(model, segmenter.classes, segmenter.context, segmenter.block_out_channels)
        rows = [dice_scores(scored.segment(target), tissue.argmax(0), segmenter.classes, prefix="val_dice_")
                for target, tissue in val_subjects]
        return {key: math.fsum(row[key] for row in rows) / len(rows) for key in rows[0]}

    def export(model) -> Path:
        segmenter.training = json.loads(json.dumps({**training, "validation": score(model)}, default=str))
        return write_folder(output_dir / "model", segmenter.save)

    return Task(segmenter.network, [p for p in segmenter.network.parameters() if p.requires_grad], IndexedView(view),
                loss, score, export)


@STAGES.register("segmenter")
class Segmenter(Stage):
    """The tissue segmenter that scores synthesis, trained on the real targets and their tissue maps."""

    summary = "the tissue segmenter that scores synthesis ([segmenter])"
    section, options = "segmenter", SegmenterConfig
    export_label = "segmenter"
    reads = ("run", "data", "optim")
    # Validation scores Dice on whole validation subjects: no sampled validation, no windows.
    ignores = ("run.validate_every", "run.validate_steps", "data.window")

    def view(self, cfg: Any, dataset) -> TissueSlices:
        return TissueSlices(dataset, cfg.data.dataset, cfg.segmenter.context)

    def memory(self, cfg: Any) -> tuple[int, int, str]:
        # Widths and levels are capped by their rule: building the network on the meta device is cheap.
        seg: SegmenterConfig = cfg.segmenter
        what = f"the tissue U-Net of segmenter.block_out_channels = {show_value(seg.block_out_channels)}"
        nbytes = parameter_bytes(on_meta(
            lambda: TissueUNet(2 * seg.context + 1, len(TISSUES) + 1, seg.block_out_channels), what))
        return nbytes, nbytes, what

    def prepare(self, cfg: Any, dataset, output_dir: Path) -> Callable[[Any], Task]:
        """Check the dataset gives targets with tissue maps and build the segmenter, before the run folder is touched."""
        view = self.view(cfg, dataset)
        view.subject(0)  # refuses a dataset without tissue maps now, in one line
        segmenter = TissueSegmenter.new(TISSUES, context=cfg.segmenter.context,
                                        block_out_channels=tuple(cfg.segmenter.block_out_channels),
                                        input_grid=input_grid(dataset))
        val_subjects = validation_subjects(cfg.data, dataset)
        training = {"stage": self.export_label, "steps": cfg.run.max_steps, "seed": cfg.run.seed,
                    "data": {"dataset": cfg.data.dataset, "options": cfg.data.options}}
        return lambda accelerator: segmenter_task(segmenter, view, val_subjects, cfg.segmenter.dice_weight, training,
                                                  output_dir, accelerator.device)
