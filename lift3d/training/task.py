"""What a stage hands the loop: the model, its trained parameters, the data, the loss, validation and export."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lift3d.plugins import create
from lift3d.training.sections import DataConfig

logger = logging.getLogger("lift3d.training.task")


@dataclass
class Task:
    """What one stage trains; the loop (``lift3d.training.loop``) is the same for every stage.

    ``loss(model, batch, micro_step)`` returns the loss and extra values to log; ``score(model)``
    scores the unwrapped model on fixed data (``val_*`` values); ``export(model)`` writes ``output_dir/model``.
    """

    model: nn.Module
    params: list[nn.Parameter]
    view: torch.utils.data.Dataset
    loss: Callable[[nn.Module, dict, int], tuple[Tensor, dict[str, Tensor]]]
    score: Callable[[nn.Module], dict[str, float]]
    export: Callable[[nn.Module], Path]
    sampled: Any = None  # a lift3d.training.validation.SampledValidation when run.validate_every is set


def check_grid(dataset, multiple: int, why: str) -> None:
    """The in-plane size must be a multiple of what the networks downsample by."""
    h, w = dataset[0].source.shape[-2:]
    if h % multiple or w % multiple:
        low = max(multiple, (min(h, w) // multiple) * multiple)
        raise ValueError(f"the training grid's in-plane size {h}x{w} is not a multiple of {multiple} ({why}); "
                         f"valid sizes near it: {low}, {low + multiple}")


def validation_pairs(data: DataConfig, validate_every: int) -> list:
    """The first ``data.val_volumes`` volumes of the dataset's validation split, loaded now (for sampled
    validation every ``validate_every`` steps)."""
    val = create("datasets", data.dataset, split="val", **data.options)
    if len(val) == 0:
        raise ValueError(f"run.validate_every = {validate_every} needs validation subjects, but dataset "
                         f"{data.dataset!r} has none in its 'val' split (set its val_size/num_val option)")
    return [val[i] for i in range(min(data.val_volumes, len(val)))]
