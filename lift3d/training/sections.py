"""The config sections every stage shares: ``[run]``, ``[data]``, ``[model]``, ``[autoencoder]``, ``[diffusion]``
and ``[optim]``. Each field carries its own help text, so ``lift3d-finetune --help`` explains every option.

A stage's own options (the autoencoder's ``[vae]``, stage 2's ``[lift]``, the segmenter's ``[segmenter]``) are
declared beside the stage (``lift3d.training.stages``); ``lift3d.training.config.TrainConfig`` adds them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lift3d.training.options import (
    MAX_LAYERS_PER_BLOCK,
    NAME,
    OPTIONAL_PATH,
    PATH,
    above,
    at_least,
    between,
    from_to,
    opt,
    widths,
)

# diffusers' UNet2DModel gives its mid-block attention width // 8 heads: a last width under 8 has none.
ATTENTION_HEAD_DIM = 8
# The noise schedules lift3d reads back (lift3d.io.schemas) hold at most this many steps.
MAX_TRAIN_TIMESTEPS = 100_000
# Every solver lift3d builds from the exported schedule (DDPM, DDIM, DPM-Solver++) implements these.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class RunConfig:
    stage: str = opt("volumes", "the training stage (lift3d.training.stages; `lift3d plugins --kind stages` lists them)",
                     rule=NAME)
    output_dir: str = opt("runs/lift3d", "folder for checkpoints, logs and the exported model", rule=PATH)
    seed: int = opt(0, "seed for weights, data order, noise and timesteps", rule=between(0, 2**32))
    max_steps: int = opt(200, "optimizer steps to train", rule=at_least(1))
    checkpoint_every: int = opt(100, "save the full training state every K optimizer steps (0 = never)",
                               rule=at_least(0))
    checkpoints_keep: int = opt(2, "keep the last M training-state checkpoints", rule=at_least(1))
    resume: str = opt("", "'latest' to continue from the newest checkpoint in output_dir, or a checkpoint folder",
                      rule=OPTIONAL_PATH)
    overwrite: bool = opt(False, "delete another run's checkpoints and exported model found in output_dir and start "
                          "afresh (without it such a folder is refused)")
    log_every: int = opt(10, "log loss, learning rate and steps/s every K steps", rule=at_least(1))
    validate_every: int = opt(0, "stages 1 and 2: every K steps, sample the dataset's validation volumes with "
                              "DPM-Solver++ and log PSNR/SSIM/MAE/z-inconsistency; the step with the best "
                              "validation PSNR is exported (0 = off: the last step is exported)", rule=at_least(0))
    validate_steps: int = opt(10, "DPM-Solver++ steps of the sampled validation", rule=at_least(1))
    threads: int = opt(0, "torch CPU threads (0 = torch's default); 1 on a busy shared CPU, where more threads "
                       "than free cores make every step many times slower", rule=from_to(0, 1024))
    tracker: str = opt("csv", "Accelerate tracker for the logs", ("csv", "tensorboard", "none"))


@dataclass
class DataConfig:
    dataset: str = opt("phantom", "dataset plugin name (see `lift3d plugins`)", rule=NAME)
    options: dict = opt({}, "options passed to the dataset plugin, e.g. {root = 'data', size = 64}")
    batch_size: int = opt(4, "per process: slices per batch in stage 1, volumes (or windows) per batch in stage 2",
                         rule=at_least(1))
    window: int = opt(0, "stage 2: train on windows of this many consecutive slices (0 = whole volumes)",
                      rule=at_least(0))
    num_workers: int = opt(0, "DataLoader worker processes", rule=from_to(0, 1024))
    val_volumes: int = opt(2, "sampled validation (run.validate_every): the first N volumes of the dataset's "
                           "'val' split", rule=at_least(1))


@dataclass
class ModelConfig:
    pretrained: str = opt("", "local folder to start from: a diffusers 2D U-Net folder (stage 1 or 2) or a "
                          "stage-1 output (stage 2); empty = a new UNet2DModel from the fields below", rule=OPTIONAL_PATH)
    block_out_channels: list[int] = opt([32, 64], "UNet2DModel widths, when built from config; each a multiple of "
                                        "norm_num_groups, the last >= 8", rule=widths())
    layers_per_block: int = opt(1, "UNet2DModel resnets per block, when built from config",
                                rule=from_to(1, MAX_LAYERS_PER_BLOCK))
    attention: bool = opt(False, "use attention blocks at the lowest resolution, when built from config")
    norm_num_groups: int = opt(8, "GroupNorm groups, when built from config", rule=at_least(1))
    conditioning: str = opt("concat", "'concat': the source latent is concatenated on channels (cross-modality); "
                            "'none': plain volume generation", ("concat", "none"))
    prediction_type: str = opt("epsilon", "what the U-Net predicts (the paper: epsilon, eq. 4)",
                               ("epsilon", "v_prediction"))
    source_context: int = opt(0, "2.5D source context: the U-Net also sees the source's N neighbouring slices on "
                              "each side as channels (1 = slices k-1, k, k+1; the edge slice repeats at the borders). "
                              "Set it in stage 1; stage 2 inherits it from model.pretrained", rule=at_least(0))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")


@dataclass
class AutoencoderConfig:
    name: str = opt("identity", "autoencoder plugin: 'kl' (latent diffusion, paper f=4) or 'identity' (pixel space)",
                    rule=NAME)
    options: dict = opt({}, "options for the autoencoder plugin, e.g. {path = 'vae-folder'}")
    cache_latents: bool = opt(False, "encode each item once and keep its latents in memory")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = opt(1000, "diffusion steps T", rule=from_to(1, MAX_TRAIN_TIMESTEPS))
    beta_schedule: str = opt("scaled_linear", "diffusers beta schedule (LDM: scaled_linear 0.0015..0.0195)",
                             BETA_SCHEDULES)
    beta_start: float = opt(0.0015, "first beta (LDM)", rule=between(0, 1))
    beta_end: float = opt(0.0195, "last beta (LDM)", rule=between(0, 1))
    objective: str = opt("", "training objective plugin: 'ddpm' (the paper's; model.prediction_type says epsilon or v) "
                         "or 'flow' (flow matching: few-step sampling); empty = 'ddpm', or in stage 2 the "
                         "objective of model.pretrained, which stage 2 inherits")
    objective_options: dict = opt({}, "options of the objective, e.g. {train_steps = 4}: train only on the timesteps "
                                  "a 4-step sampler visits (step-count-matched training, as in Fast-DDPM); "
                                  "{shift = 3.0} for flow")
    timestep_sampler: str = opt("", "timestep sampler plugin; empty = the stage's own: 'uniform-slice' in stage 1, "
                                "'make-a-volume' (weight 2T - t, one t per volume) in stage 2")


@dataclass
class OptimConfig:
    learning_rate: float = opt(1e-4, "AdamW learning rate", rule=above(0))
    weight_decay: float = opt(0.0, "AdamW weight decay", rule=at_least(0))
    lr_scheduler: str = opt("constant_with_warmup", "diffusers learning-rate schedule",
                            ("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = opt(0, "learning-rate warm-up steps", rule=at_least(0))
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", rule=at_least(1))
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", rule=at_least(0))
    mixed_precision: str = opt("no", "Accelerate mixed precision", ("no", "fp16", "bf16"))
    ema: bool = opt(False, "keep an exponential moving average of the trained weights (exported if on)")
    ema_decay: float = opt(0.999, "EMA decay", rule=between(0, 1))


@dataclass
class SharedSections:
    """The sections every stage shares. ``lift3d.training.config.TrainConfig`` adds each stage's own."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SHARED = tuple(f.name for f in dataclasses.fields(SharedSections))


def unet2d_arguments(model: ModelConfig, in_channels: int, out_channels: int, sample_size: int | None = None) -> dict:
    """The ``UNet2DModel`` keyword arguments of a U-Net built from ``[model]`` (not from ``pretrained``)."""
    levels = len(model.block_out_channels)
    down, up = ["DownBlock2D"] * levels, ["UpBlock2D"] * levels
    if model.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return dict(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                block_out_channels=tuple(int(c) for c in model.block_out_channels),
                layers_per_block=model.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                norm_num_groups=model.norm_num_groups)

