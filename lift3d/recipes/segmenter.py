"""The tissue segmenter recipe: one ``segmenter`` stage on the real targets of a dataset's training subjects,
giving the folder that scores synthesis by tissue Dice (``lift3d-evaluate --segmenter``,
``lift3d.evaluation.segmentation.tissue_dice``). The defaults train in under three minutes on one CPU core at the
ICBM benchmark's grid (48 x 48 x 24, 13 subjects; docs/pages/training.md gives the Dice it reaches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lift3d.training.config import TrainConfig, apply

DEFAULT_STEPS = 600
DEFAULT_BATCH = 16  # slices per step
DEFAULT_LEARNING_RATE = 3e-3


def segmenter_config(dataset: str, data_options: dict[str, Any], output_dir: str | Path, *, steps: int = DEFAULT_STEPS,
                     seed: int = 0, batch_size: int = DEFAULT_BATCH, learning_rate: float = DEFAULT_LEARNING_RATE,
                     block_out_channels: tuple[int, ...] = (16, 32, 64), context: int = 1, dice_weight: float = 1.0,
                     threads: int = 0, overwrite: bool = False) -> TrainConfig:
    """The checked config of the segmenter stage: AdamW with a short warm-up and cosine decay, no checkpoints."""
    values = {
        "run": {"stage": "segmenter", "output_dir": str(output_dir), "seed": seed, "max_steps": steps,
                "checkpoint_every": 0, "threads": threads, "overwrite": overwrite, "log_every": max(1, min(50, steps))},
        "data": {"dataset": dataset, "options": dict(data_options), "batch_size": batch_size},
        "segmenter": {"block_out_channels": list(block_out_channels), "context": context, "dice_weight": dice_weight},
        "optim": {"learning_rate": learning_rate, "lr_scheduler": "cosine", "warmup_steps": min(20, steps // 4)},
    }
    return apply(TrainConfig(), values, "segmenter recipe")


def train_tissue_segmenter(dataset: str = "icbm152", data_options: dict[str, Any] | None = None,
                           output_dir: str | Path = "runs/segmenter", **options: Any) -> Path:
    """Train the built-in ``tissue-unet`` segmenter (``segmenter_config`` takes ``options``); returns the
    exported folder, ``<output_dir>/model``, which ``lift3d.evaluation.segmentation.load_segmenter`` loads."""
    from lift3d.training.loop import train

    return Path(train(segmenter_config(dataset, data_options or {}, output_dir, **options)))
