"""The Make-A-Volume recipe as a chain of two training stages: stage 1 (a 2D U-Net, a timestep per
slice) and stage 2 (lifted, fine-tuned on whole volumes with one timestep per volume drawn with weight
2T - t, the step best on the validation subjects exported). The demo and the ICBM benchmark both build
their configs here, so the chain is written once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lift3d.training.config import TrainConfig, apply


@dataclass
class Recipe:
    """Everything the two stages' configs are made of. ``stage2_lift`` holds ``[lift]`` options
    (``kind``, ``kernel_size``, ...), ``stage2_optim`` ``[optim]`` overrides of stage 2."""

    dataset: str
    data_options: dict[str, Any]
    widths: tuple[int, ...]
    stage1_steps: int
    stage2_steps: int
    layers_per_block: int = 1
    prediction_type: str = "v_prediction"  # in pixel space an epsilon model's early samples are noise
    objective: str = "ddpm"  # or "flow" (flow matching); set in stage 1, inherited by stage 2
    objective_options: dict[str, Any] = field(default_factory=dict)  # stage 1's, e.g. {"train_steps": 4}
    stage2_objective_options: dict[str, Any] = field(default_factory=dict)
    autoencoder: dict[str, Any] = field(default_factory=lambda: {"name": "identity"})
    source_context: int = 0  # 2.5D: set in stage 1, inherited by stage 2
    stage1_batch: int = 16
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-4
    stage2_lr_scheduler: str = "constant"
    stage2_trainable: str = "volumetric"
    stage2_lift: dict[str, Any] = field(default_factory=dict)
    stage2_optim: dict[str, Any] = field(default_factory=dict)
    validate_every: int = 0  # stage 2: sample the validation subjects every K steps, export the best step
    validate_steps: int = 25
    val_volumes: int = 1
    log_every: int = 10
    overwrite: bool = False
    name: str = "recipe"  # names the source of a bad value in errors


def _stage1_sections(recipe: Recipe, pretrained: Path | None, max_steps: int) -> dict[str, Any]:
    """Stage 1 (``slices``): a new 2D U-Net, its objective and 2.5D context, trained with cosine decay."""
    objective = ({"diffusion": {"objective": recipe.objective, "objective_options": recipe.objective_options}}
                 if recipe.objective != "ddpm" or recipe.objective_options else {})
    return {**objective, "data": {"batch_size": recipe.stage1_batch},
            "model": {"source_context": recipe.source_context},
            "optim": {"learning_rate": recipe.stage1_lr, "lr_scheduler": "cosine",
                      "warmup_steps": min(20, max(max_steps // 4, 0))}}


def _stage2_sections(recipe: Recipe, pretrained: Path | None, max_steps: int) -> dict[str, Any]:
    """Stage 2 (``volumes``): the stage-1 model lifted, on whole volumes, the step best on validation exported."""
    validation = ({"validate_every": recipe.validate_every, "validate_steps": recipe.validate_steps}
                  if recipe.validate_every else {})
    return {"run": validation,
            "data": {"batch_size": 1, "val_volumes": recipe.val_volumes},
            "model": {"pretrained": str(pretrained or "")},
            "lift": {"trainable": recipe.stage2_trainable, **recipe.stage2_lift},
            "diffusion": {"timestep_sampler": "make-a-volume",
                          **({"objective_options": recipe.stage2_objective_options}
                             if recipe.stage2_objective_options else {})},
            "optim": {"learning_rate": recipe.stage2_lr, "lr_scheduler": recipe.stage2_lr_scheduler,
                      **recipe.stage2_optim}}


@dataclass(frozen=True)
class Link:
    """One stage of the chain: the registered stage it runs, its run folder (under the recipe's), its steps,
    and its options beyond the common ones, given the previous link's model."""

    stage: str
    folder: str
    steps: Callable[[Recipe], int]
    sections: Callable[[Recipe, Path | None, int], dict[str, Any]]


CHAIN = (
    Link("slices", "stage1", lambda recipe: recipe.stage1_steps, _stage1_sections),
    Link("volumes", "stage2", lambda recipe: recipe.stage2_steps, _stage2_sections),
)
"""The recipe's stages in order; each after the first starts from the model of the one before."""


def link_of(stage: str) -> Link:
    """The link of the chain that runs ``stage``."""
    found = [link for link in CHAIN if link.stage == stage]
    if not found:
        raise ValueError(f"the Make-A-Volume recipe has no stage {stage!r}; its stages: "
                         f"{', '.join(link.stage for link in CHAIN)}")
    return found[0]


def stage_config(recipe: Recipe, stage: str, output_dir: Path, seed: int, stage1_model: Path | None = None,
                 steps: int | None = None) -> TrainConfig:
    """The checked config of one stage of the chain (``CHAIN``): stage 1 (``"slices"``) or stage 2
    (``"volumes"``, from ``stage1_model``)."""
    link = link_of(stage)
    max_steps = steps if steps is not None else link.steps(recipe)
    common = {
        "run": {"stage": stage, "output_dir": str(output_dir), "seed": seed, "log_every": recipe.log_every,
                "checkpoint_every": 0, "overwrite": recipe.overwrite, "max_steps": max_steps},
        "data": {"dataset": recipe.dataset, "options": recipe.data_options},
        "model": {"block_out_channels": list(recipe.widths), "layers_per_block": recipe.layers_per_block,
                  "prediction_type": recipe.prediction_type},
        "autoencoder": recipe.autoencoder,
    }
    return apply(apply(TrainConfig(), common, recipe.name), link.sections(recipe, stage1_model, max_steps), recipe.name)


def chain_configs(recipe: Recipe, out: Path, seed: int) -> list[TrainConfig]:
    """The config of every stage of the chain, run into ``out/<link.folder>``, each from the previous one's model."""
    configs, previous = [], None
    for link in CHAIN:
        configs.append(stage_config(recipe, link.stage, out / link.folder, seed, previous))
        previous = out / link.folder / "model"
    return configs


def distill_config(recipe: Recipe, output_dir: Path, seed: int, teacher: Path, *, family: str, teacher_steps: int,
                   student_steps: int, steps: int, learning_rate: float, validate_every: int,
                   teacher_samples: int = 1) -> TrainConfig:
    """The checked config of the distillation stage: the lifted flow model ``teacher`` (its Euler solve in
    ``teacher_steps`` steps) distilled into a ``student_steps``-step student by ``family``, on whole volumes;
    the step whose student samples the validation subjects best is exported."""
    sections = {
        "run": {"stage": "distill", "output_dir": str(output_dir), "seed": seed, "log_every": recipe.log_every,
                "checkpoint_every": 0, "overwrite": recipe.overwrite, "max_steps": steps,
                **({"validate_every": validate_every} if validate_every else {})},
        "data": {"dataset": recipe.dataset, "options": recipe.data_options, "batch_size": 1,
                 "val_volumes": recipe.val_volumes},
        "model": {"pretrained": str(teacher), "block_out_channels": list(recipe.widths),
                  "layers_per_block": recipe.layers_per_block, "prediction_type": recipe.prediction_type},
        "autoencoder": recipe.autoencoder,
        "diffusion": {"timestep_sampler": "make-a-volume"},
        "distill": {"family": family, "teacher_steps": teacher_steps, "student_steps": student_steps,
                    "teacher_samples": teacher_samples},
        "optim": {"learning_rate": learning_rate, "lr_scheduler": "cosine", "warmup_steps": min(20, steps // 4)},
    }
    return apply(TrainConfig(), sections, recipe.name)
