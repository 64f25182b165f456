"""One training loop for both stages of Make-A-Volume (Zhu et al., MICCAI 2023), wired with Accelerate.

Stage 1 (``run.stage = "slices"``, sec. 2.2): a 2D U-Net denoises target latents of shuffled slices,
conditioned on the source latent by channel concatenation, with a timestep per slice.
Stage 2 (``run.stage = "volumes"``, sec. 2.3): the U-Net is lifted with :func:`lift3d.lifting.inflate` and
fine-tuned on whole volumes (or windows) with one timestep per volume (``make-a-volume``: 2T - t).
The loss is eq. 4 (MSE on epsilon; v-prediction optional) under a diffusers ``DDPMScheduler``.

Noise and timesteps are drawn per item from a generator seeded by (seed, step, dataset index), and
the data order per epoch from (seed, epoch). So a resumed run repeats an uninterrupted one, and
two processes with half the batch each see exactly what one process with the whole batch sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

import lift3d
from lift3d.data.dataset import stack_items
from lift3d.diffusion.conditioning import predict
from lift3d.diffusion.conditioning import unet_channels as conditioned_channels
from lift3d.diffusion.export import (TRAINING_SETTINGS, export_settings, read_training_settings,
                                     write_export_settings)
from lift3d.diffusion.schedules import training_scheduler
from lift3d.io.errors import Lift3dError, RunFolderError
from lift3d.io.writing import RunLock, clean_stale_temporaries, disk_full_message, temporary_path
from lift3d.lifting.checkpoint import (SETTINGS_FILE, CheckpointError, load_lifted, load_unet2d,
                                       save_diffusers_folder, save_lifted, save_volumetric)
from lift3d.plugins import create
from lift3d.training.config import TrainConfig, validate
from lift3d.training.memory import check_memory
from lift3d.training.tracking import check_tracker, drop_rows_after
from lift3d.training.state import (TRAINER_STATE, check_training_state, load_training_state, load_validation_state,
                                   read_trainer_state, save_training_state)

logger = logging.getLogger("lift3d.training.loop")

CHECKPOINT_PREFIX = "checkpoint-"
VAL_VOLUMES = 2
VAL_SEED = 1234


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or inf; training stopped, the checkpoints already written were kept."""


# --------------------------------------------------------------------------------------------
# Building the pieces


def build_noise_scheduler(cfg: TrainConfig):
    """The training forward process of ``cfg`` (:func:`lift3d.diffusion.schedules.training_scheduler`)."""
    d = cfg.diffusion
    return training_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                              cfg.model.prediction_type)


def build_autoencoder(cfg: TrainConfig) -> nn.Module:
    autoencoder = create("autoencoders", cfg.autoencoder.name, **cfg.autoencoder.options)
    autoencoder.requires_grad_(False)
    return autoencoder.eval()


def unet_channels(cfg: TrainConfig, autoencoder) -> tuple[int, int]:
    """U-Net ``(in, out)`` channels under ``cfg``'s conditioning (:mod:`lift3d.diffusion.conditioning`)."""
    return conditioned_channels(autoencoder.latent_channels, cfg.model.conditioning, cfg.model.source_context)


def new_unet2d(cfg: TrainConfig, in_channels: int, out_channels: int, sample_size: int) -> nn.Module:
    from diffusers import UNet2DModel

    widths = tuple(int(c) for c in cfg.model.block_out_channels)
    down = ["DownBlock2D"] * len(widths)
    up = ["UpBlock2D"] * len(widths)
    if cfg.model.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       block_out_channels=widths, layers_per_block=cfg.model.layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.model.norm_num_groups)


def check_pretrained_settings(cfg: TrainConfig, folder: Path) -> None:
    """Refuse to fine-tune a lift3d export towards a different target than it was trained on
    (say a v-prediction stage 1 under an epsilon stage 2): training would run, and silently ruin it.
    The 2.5D source context is inherited: left at 0, ``cfg.model.source_context`` takes the export's."""
    if not (folder / TRAINING_SETTINGS).is_file() and not (folder / SETTINGS_FILE).is_file():
        return  # a plain diffusers folder: nothing recorded to compare with
    settings = read_training_settings(folder)
    theirs = int(settings.get("source_context", 0))
    if cfg.model.source_context == 0:
        cfg.model.source_context = theirs
    elif cfg.model.source_context != theirs:
        raise ValueError(f"pretrained model {folder} was trained with source_context {theirs}, but this run says "
                         f"{cfg.model.source_context}; leave --model.source_context unset (stage 2 inherits it)")
    for key, ours in (("prediction_type", cfg.model.prediction_type), ("conditioning", cfg.model.conditioning)):
        theirs = settings.get(key)
        if theirs is not None and theirs != ours:
            raise ValueError(f"pretrained model {folder} was trained with {key} {theirs!r}, but this run says "
                             f"{ours!r}; set --model.{key} {theirs} (or [model] {key} = \"{theirs}\")")


def build_unet(cfg: TrainConfig, autoencoder, sample_size: int) -> nn.Module:
    if cfg.model.pretrained:
        check_pretrained_settings(cfg, Path(cfg.model.pretrained))
    in_channels, out_channels = unet_channels(cfg, autoencoder)
    if cfg.model.pretrained:
        folder = Path(cfg.model.pretrained)
        unet = load_lifted(folder) if (folder / SETTINGS_FILE).is_file() else load_unet2d(folder)
        got_in, got_out = unet.config.in_channels, unet.config.out_channels
        if (got_in, got_out) != (in_channels, out_channels):
            raise ValueError(f"pretrained U-Net {folder} takes {got_in} -> {got_out} channels, but autoencoder "
                             f"{cfg.autoencoder.name!r} with conditioning {cfg.model.conditioning!r}"
                             + (f" and source_context {cfg.model.source_context}" if cfg.model.source_context else "")
                             + f" needs {in_channels} -> {out_channels}")
    else:
        unet = new_unet2d(cfg, in_channels, out_channels, sample_size)
    if cfg.run.stage == "volumes" and not lift3d.is_lifted(unet):
        lift3d.inflate(unet, cfg.lift.kind or None, kernel_size=cfg.lift.kernel_size, where=cfg.lift.where,
                       padding_mode=cfg.lift.padding_mode, recompute=cfg.lift.recompute, **cfg.lift.options)
    if cfg.model.gradient_checkpointing:
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(unet).__name__} does not support gradient checkpointing")
        unet.enable_gradient_checkpointing()
    return unet


def trainable_parameters(cfg: TrainConfig, unet: nn.Module) -> list[nn.Parameter]:
    if lift3d.is_lifted(unet):
        lift3d.set_trainable(unet, cfg.lift.trainable)
    else:
        unet.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def build_view(cfg: TrainConfig, dataset):
    if cfg.run.stage == "slices":
        return dataset.slices(context=cfg.model.source_context)
    return dataset.volumes(window=cfg.data.window or None, context=cfg.model.source_context)


# --------------------------------------------------------------------------------------------
# Data order and per-item randomness


def item_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator for one item's noise and timestep: a function of (seed, step, index) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + index) % (2**63 - 1))


@dataclass
class BatchPlan:
    """Which dataset indices each process reads at each micro-batch, for any resume point.

    Epoch e shuffles all items with seed (seed, e); a global micro-batch is ``batch_size *
    num_processes`` consecutive items of that order (an incomplete tail is dropped), and process
    r takes its r-th slice of it.
    """

    num_items: int
    batch_size: int
    num_processes: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def __post_init__(self) -> None:
        if self.batches_per_epoch < 1:
            raise ValueError(f"the dataset has {self.num_items} training items, fewer than one global batch "
                             f"({self.batch_size} per process x {self.num_processes} processes); lower data.batch_size")

    def indices(self, micro_step: int) -> list[int]:
        epoch, k = divmod(micro_step, self.batches_per_epoch)
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = k * self.global_batch + self.rank * self.batch_size
        return order[start:start + self.batch_size].tolist()

    def iterate(self, first_micro_step: int) -> Iterator[tuple[int, list[int]]]:
        step = first_micro_step
        while True:
            yield step, self.indices(step)
            step += 1


class _PlannedBatches(torch.utils.data.Sampler):
    def __init__(self, plan: BatchPlan, first_micro_step: int, count: int) -> None:
        self.plan, self.first, self.count = plan, first_micro_step, count

    def __iter__(self):
        for step in range(self.first, self.first + self.count):
            yield self.plan.indices(step)

    def __len__(self) -> int:
        return self.count


class IndexedView(torch.utils.data.Dataset):
    """Adds each item's dataset index, which seeds its noise."""

    def __init__(self, view) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int) -> dict:
        return {**self.view[index], "index": index}


# --------------------------------------------------------------------------------------------
# The loss (eq. 4)


def as_volumes(x: Tensor) -> Tensor:
    """Stage-1 slices ``(b, c, h, w)`` are volumes of one slice ``(b, c, 1, h, w)``."""
    return x.unsqueeze(2) if x.dim() == 4 else x


class LatentEncoder:
    """Encodes source and target volumes with the frozen autoencoder, optionally caching per item.

    With a 2.5D ``context`` the source latents get their neighbouring slices on channels
    (:mod:`lift3d.data.context`). Training items carry a source padded by ``context`` slices on
    each side (a stage-1 item, a stage-2 window); an unpadded whole volume has its edge slices
    repeated. Either way slice ``k`` gets the channels it has in the whole volume.
    """

    def __init__(self, autoencoder, cache: bool, context: int = 0) -> None:
        self.autoencoder, self.cache, self.context = autoencoder, {} if cache else None, context

    def with_context(self, source: Tensor, target: Tensor) -> Tensor:
        from lift3d.data.context import centre_with_context, with_source_context

        if source.shape[2] == target.shape[2] + 2 * self.context:
            return centre_with_context(source, self.context)
        return with_source_context(source, self.context)

    @torch.no_grad()
    def _encode(self, x: Tensor) -> Tensor:
        from lift3d.diffusion.autoencoding import encode_volume

        ae = self.autoencoder
        dtype = next((p.dtype for p in ae.parameters()), x.dtype) if isinstance(ae, nn.Module) else x.dtype
        return encode_volume(ae, x.to(dtype)).float()

    def __call__(self, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        source, target = as_volumes(batch["source"]).to(device), as_volumes(batch["target"]).to(device)
        if self.cache is None:
            zt = self._encode(target)
            return zt, self.with_context(self._encode(source), zt)
        # The slice count is in the key: stage 1's slice i and the validation's volume i are other items.
        starts = batch.get("start", [0] * len(batch["index"]))
        keys = [(i, starts[j], source.shape[2], target.shape[2]) for j, i in enumerate(batch["index"])]
        missing = [j for j, k in enumerate(keys) if k not in self.cache]
        if missing:
            zt, zs = self._encode(target[missing]), self._encode(source[missing])
            for j, a, b in zip(missing, zt, zs):
                self.cache[keys[j]] = (a.cpu(), b.cpu())
        zt = torch.stack([self.cache[k][0] for k in keys]).to(device)
        zs = torch.stack([self.cache[k][1] for k in keys]).to(device)
        return zt, self.with_context(zs, zt)


def draw_noise(latents: Tensor, indices: list[int], step: int, seed: int, sampler, num_train_timesteps: int):
    """Per-item noise ``(b, c, n, h, w)`` and timesteps ``(b, n)``, each from its own generator."""
    noises, timesteps = [], []
    for z, index in zip(latents, indices):
        g = item_generator(seed, step, index)
        noises.append(torch.randn(z.shape, generator=g))
        timesteps.append(sampler(1, z.shape[1], num_train_timesteps, generator=g)[0])
    return torch.stack(noises).to(latents.device), torch.stack(timesteps).to(latents.device)


def diffusion_loss(unet, noise_scheduler, latents: Tensor, source_latents: Tensor | None, noise: Tensor,
                   timesteps: Tensor, prediction_type: str) -> Tensor:
    """Eq. 4: ``|| eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, z_c) ||^2`` over all slices."""
    n = latents.shape[2]
    flat = lambda x: rearrange(x, "b c n h w -> (b n) c h w")  # noqa: E731
    z, eps, t = flat(latents), flat(noise), timesteps.reshape(-1)
    noisy = rearrange(noise_scheduler.add_noise(z, eps, t), "(b n) c h w -> b c n h w", n=n)
    target = eps if prediction_type == "epsilon" else noise_scheduler.get_velocity(z, eps, t)
    return F.mse_loss(flat(predict(unet, noisy, source_latents, t)).float(), target.float())


# --------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete training-state checkpoints, oldest first (temp folders are never listed)."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if (p / TRAINER_STATE).is_file() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


@dataclass
class TrainingState:
    """Everything a checkpoint restores, as :mod:`lift3d.training.state` writes it (no pickle)."""

    model: nn.Module
    optimizer: Any
    lr_scheduler: Any
    ema: Any = None
    scaler: Any = None
    validation: Any = None  # a ValidationTracker on the main process when sampled validation runs


def check_weights_finite(params: list[nn.Parameter], step: int) -> None:
    bad = sum(int(not torch.isfinite(p).all()) for p in params)
    if bad:
        raise NonFiniteLossError(f"{bad} trained weight tensor(s) hold NaN or inf at step {step}; stopped without "
                                 "saving them (lower optim.learning_rate, or try mixed_precision = 'no')")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def write_failure(exc: BaseException, path: Path) -> str:
    """One line for a write that failed (a full disk, say): the final path, and what the system said.
    safetensors reports an OS error inside its own message (``IoError(Os { code: 28, ... })``)."""
    if not isinstance(exc, OSError):
        code = re.search(r"code: (\d+)", str(exc))
        exc = OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else OSError(str(exc)[:160])
    return disk_full_message(exc, path)


@contextlib.contextmanager
def removed_on_failure(tmp: Path, final: Path, remove: bool = True):
    """Whatever goes wrong while ``tmp`` is written, it is removed; a failed write (OSError, or
    safetensors' own error) becomes one line naming ``final``."""
    from safetensors import SafetensorError

    try:
        yield
    except BaseException as exc:
        if remove:
            _remove(tmp)
        if isinstance(exc, (OSError, SafetensorError)):
            raise Lift3dError(write_failure(exc, final)) from None
        raise


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename complete folder ``tmp`` onto ``final``; an old ``final`` is moved aside first, then removed."""
    old = None
    if final.exists() or final.is_symlink():
        old = temporary_path(final)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        _remove(old)


def write_folder(final: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a hidden temporary beside ``final``, then rename it onto ``final``. A failure
    (kill -9 aside, which the next run's :func:`clean_stale_temporaries` covers) leaves nothing behind."""
    tmp = temporary_path(final)
    with removed_on_failure(tmp, final):
        write(tmp)
        replace_folder(tmp, final)
    return final


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, state: TrainingState,
                    loss: float | None = None) -> Path:
    """Write the training state into a temp folder, then rename: a crash never leaves a half checkpoint."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = temporary_path(final)
    if accelerator.num_processes > 1:  # every process writes its RNG file into the main process's folder
        from accelerate.utils import broadcast_object_list

        tmp = Path(broadcast_object_list([str(tmp)])[0])
    with removed_on_failure(tmp, final, remove=accelerator.is_main_process):
        if accelerator.is_main_process:
            tmp.mkdir()
        accelerator.wait_for_everyone()
        save_training_state(tmp, model=accelerator.unwrap_model(state.model), optimizer=state.optimizer,
                            lr_scheduler=state.lr_scheduler, ema=state.ema, scaler=state.scaler, step=step, loss=loss,
                            validation=None if state.validation is None else state.validation.state(),
                            is_main_process=accelerator.is_main_process, process_index=accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_folder(tmp, final)
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from; every file in it is checked before anything is written."""
    if not cfg.run.resume:
        return None
    if cfg.run.resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("run.resume = 'latest' but %s holds no checkpoint; starting from scratch", output_dir)
            return None
        path = found[-1]
    else:
        path = Path(cfg.run.resume)
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"run.resume = {cfg.run.resume!r} is not a complete lift3d checkpoint folder "
                                  f"(no {TRAINER_STATE}); use 'latest' or a checkpoint-<step> folder")
    check_training_state(path, ema=cfg.optim.ema, scaler=cfg.optim.mixed_precision == "fp16",
                         max_steps=cfg.run.max_steps)
    return path


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def previous_work(output_dir: Path, resume_from: Path | None) -> list[Path]:
    """What in ``output_dir`` belongs to another run, and this run would destroy or mix with.

    A fresh run (or one resumed from a checkpoint elsewhere) must not share a folder with other
    checkpoints: rotation would delete its own newest ones first, and ``resume latest`` would pick
    the other run's. Nor would it silently replace an exported model. A run resumed from one of
    the folder's own checkpoints owns that lineage, but not the checkpoints past its step."""
    if not output_dir.is_dir():
        return []
    found = list_checkpoints(output_dir)
    own = resume_from is not None and resume_from.resolve().parent == output_dir.resolve() \
        and resume_from.name.startswith(CHECKPOINT_PREFIX) and resume_from.name[len(CHECKPOINT_PREFIX):].isdigit()
    if own:
        return [c for c in found if _step_of(c) > _step_of(resume_from)]
    model = output_dir / "model"
    return found + ([model] if model.exists() or model.is_symlink() else [])


def claim_run_folder(cfg: TrainConfig, output_dir: Path, resume_from: Path | None) -> None:
    """Refuse, or with ``run.overwrite`` delete, another run's work in ``output_dir`` (called with
    the folder's lock held); and remove the temporaries of writers that died."""
    others = previous_work(output_dir, resume_from)
    if others:
        names = ", ".join(p.name for p in others[:6]) + (f", ... ({len(others)} in all)" if len(others) > 6 else "")
        if not getattr(cfg.run, "overwrite", False):
            checkpoints = [p for p in others if p.name != "model"]
            if resume_from is None:
                why = "a fresh run there would " + " and ".join(
                    (["replace its exported model"] if len(checkpoints) < len(others) else [])
                    + (["mix its checkpoints with theirs (rotation would delete this run's own, and resume "
                        "latest would pick theirs)"] if checkpoints else []))
                fix = "resume that run with --run.resume latest, " if checkpoints else ""
            else:
                why = f"resuming from {resume_from} there would mix this run's checkpoints with them"
                fix = "resume from the latest with --run.resume latest, "
            delete = f"delete {'it' if len(others) == 1 else 'them'} and start afresh with --run.overwrite true"
            advice = f"{fix}{delete}, or choose another --run.output_dir"
            raise RunFolderError(f"run.output_dir {output_dir} already holds another run's work ({names}); {why}. "
                                 f"{advice[:1].upper()}{advice[1:]}")
        logger.warning("run.overwrite: deleting %s in %s", names, output_dir)
        for path in others:
            _remove(path)
    clean_stale_temporaries(output_dir)


def check_outside_inputs(cfg: TrainConfig, output_dir: Path) -> None:
    """Refuse an ``output_dir`` that holds (or lies inside) a model folder this run reads: writing
    the run there would replace the stage-1 model, its checkpoints and its logs."""
    inputs = [("model.pretrained", cfg.model.pretrained)]
    path = cfg.autoencoder.options.get("path") if isinstance(cfg.autoencoder.options, dict) else None
    if isinstance(path, str):
        inputs.append(("autoencoder.options.path", path))
    out = output_dir.resolve()
    for option, value in inputs:
        if not value:
            continue
        folder = Path(value).resolve()
        if out == folder or out in folder.parents or folder in out.parents:
            where = "is" if out == folder else "contains" if out in folder.parents else "lies inside"
            raise RunFolderError(f"run.output_dir {output_dir} {where} {option} {value}: this run would overwrite "
                                 f"the model it starts from (and that run's checkpoints and logs); choose an "
                                 "output_dir outside it")


def check_run_options(cfg: TrainConfig) -> None:
    """What the config layer cannot know: whether this machine can do what the options ask."""
    check_tracker(cfg.run.tracker)
    if cfg.optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise Lift3dError("optim.mixed_precision = 'fp16' needs a CUDA GPU; on the CPU Accelerate would silently "
                          "train in fp32. Use 'bf16' (CPU mixed precision) or 'no'")


# --------------------------------------------------------------------------------------------
# Export


def training_settings(cfg: TrainConfig, autoencoder, dataset, exported_autoencoder: bool) -> dict[str, Any]:
    """What synthesis needs to prepare inputs exactly as in training and to rebuild the sampler."""
    ae_options = {"path": "autoencoder"} if exported_autoencoder else dict(cfg.autoencoder.options)
    unet_multiple = 2 ** (len(cfg.model.block_out_channels) - 1)
    return export_settings(
        stage=cfg.run.stage, conditioning=cfg.model.conditioning, source_context=cfg.model.source_context,
        prediction_type=cfg.model.prediction_type, autoencoder={"name": cfg.autoencoder.name, "options": ae_options},
        image_channels=autoencoder.image_channels, latent_channels=autoencoder.latent_channels,
        size_multiple=unet_multiple * autoencoder.downsampling_factor,
        data={"dataset": cfg.data.dataset, "options": dict(cfg.data.options),
              "num_slices": getattr(dataset, "num_slices", None), "window": cfg.data.window},
        config=cfg.to_dict())


def export_model(cfg: TrainConfig, unet: nn.Module, autoencoder, noise_scheduler, dataset, output_dir: Path) -> Path:
    """Write ``output_dir/model``: the (lifted) U-Net in safetensors, its settings, the autoencoder
    (if it has weights) and the scheduler config; plus ``volumetric.safetensors`` in stage 2.
    With ``optim.ema`` the loop calls this with the EMA weights copied into ``unet``."""
    state = unet.state_dict()
    has_weights = any(True for _ in autoencoder.parameters()) if isinstance(autoencoder, nn.Module) else False
    settings = training_settings(cfg, autoencoder, dataset, exported_autoencoder=has_weights)

    def write(tmp: Path) -> None:
        if lift3d.is_lifted(unet):
            save_lifted(unet, tmp, state_dict=state, extra={"training": settings})
            save_volumetric(unet, tmp / "volumetric.safetensors", state_dict=state)
        else:
            save_diffusers_folder(unet, tmp, state)
        write_export_settings(tmp, settings)
        if has_weights:
            autoencoder.save(tmp / "autoencoder")
        noise_scheduler.save_pretrained(tmp / "scheduler")

    return write_folder(output_dir / "model", write)


# --------------------------------------------------------------------------------------------
# Validation loss on fixed volumes (the same noise for every model, so stages compare exactly)


VAL_TIMESTEP_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)


@torch.no_grad()
def fixed_volume_loss(unet, noise_scheduler, encoder: LatentEncoder, dataset, cfg: TrainConfig, device) -> float:
    """Mean loss on the first volumes of the dataset, with fixed noise, at a fixed grid of t.

    Every slice of a volume shares t, as in stage 2. The 2D model (stage 1) and the lifted model at
    initialisation give exactly the same value, so the two stages can be compared.
    """
    view = dataset.volumes(window=cfg.data.window or None, context=cfg.model.source_context)
    items = [view[i] for i in range(min(VAL_VOLUMES, len(view)))]
    batch = stack_items(items)
    batch["index"] = list(range(len(items)))
    latents, source = encoder(batch, device)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(VAL_SEED)).to(device)
    was_training = unet.training
    unet.eval()
    losses = []
    for fraction in VAL_TIMESTEP_FRACTIONS:
        t = int(fraction * cfg.diffusion.num_train_timesteps)
        timesteps = torch.full(latents.shape[:1] + latents.shape[2:3], t, device=device)
        losses.append(float(diffusion_loss(unet, noise_scheduler, latents,
                                           source if cfg.model.conditioning == "concat" else None, noise,
                                           timesteps, cfg.model.prediction_type)))
    unet.train(was_training)
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------------
# The loop


def make_accelerator(cfg: TrainConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate.state import AcceleratorState

    from lift3d.training.tracking import CSVTracker

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate's state is a process-wide singleton; a second run in one process (the demo's
        # stage 2 after stage 1, or a notebook) may use other settings.
        AcceleratorState._reset_state(reset_partial_state=True)
    trackers: Any = None
    if cfg.run.tracker == "csv":
        trackers = [CSVTracker("logs", output_dir)]
    elif cfg.run.tracker == "tensorboard":
        trackers = "tensorboard"
    # Without a GPU, cpu=True lets a torchrun-style launch (accelerate launch --multi_gpu) use gloo.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.optim.mixed_precision,
                       gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps, log_with=trackers,
                       project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)))


@dataclass
class Task:
    """What one stage trains; the loop in :func:`_train` is the same for every stage.

    ``loss(model, batch, micro_step)`` returns the loss and extra values to log; ``validate(model)``
    scores the unwrapped model on fixed data; ``export(model)`` writes ``output_dir/model``.
    """

    model: nn.Module
    params: list[nn.Parameter]
    view: torch.utils.data.Dataset
    loss: Callable[[nn.Module, dict, int], tuple[Tensor, dict[str, Tensor]]]
    validate: Callable[[nn.Module], dict[str, float]]
    export: Callable[[nn.Module], Path]
    sampled: Any = None  # a lift3d.training.validation.SampledValidation when run.validate_every is set


def check_grid(dataset, multiple: int, why: str) -> None:
    """The in-plane size must be a multiple of what the networks downsample by."""
    h, w = dataset[0].source.shape[-2:]
    if h % multiple or w % multiple:
        low = max(multiple, (min(h, w) // multiple) * multiple)
        raise ValueError(f"the training grid's in-plane size {h}x{w} is not a multiple of {multiple} ({why}); "
                         f"valid sizes near it: {low}, {low + multiple}")


def diffusion_task(cfg: TrainConfig, dataset, autoencoder, unet, sampler, output_dir: Path, device,
                   val_pairs: list | None = None) -> Task:
    """Stages 1 and 2 (eq. 4): denoise target latents given the source latents."""
    noise_scheduler = build_noise_scheduler(cfg)
    encoder = LatentEncoder(autoencoder, cache=cfg.autoencoder.cache_latents, context=cfg.model.source_context)
    conditioning = cfg.model.conditioning == "concat"

    def loss(model, batch: dict, micro: int):
        latents, source = encoder(batch, device)
        noise, timesteps = draw_noise(latents, batch["index"], micro, cfg.run.seed, sampler,
                                      cfg.diffusion.num_train_timesteps)
        return diffusion_loss(model, noise_scheduler, latents, source if conditioning else None, noise, timesteps,
                              cfg.model.prediction_type), {}

    sampled = None
    if val_pairs:
        from lift3d.training.validation import SampledValidation

        sampled = SampledValidation(val_pairs, autoencoder, training_settings(cfg, autoencoder, dataset, False),
                                    dict(noise_scheduler.config), cfg.run.validate_steps, device)
    return Task(unet, trainable_parameters(cfg, unet), IndexedView(build_view(cfg, dataset)), loss,
                lambda model: {"val_loss": fixed_volume_loss(model, noise_scheduler, encoder, dataset, cfg, device)},
                lambda model: export_model(cfg, model, autoencoder, noise_scheduler, dataset, output_dir), sampled)


def autoencoder_task(cfg: TrainConfig, dataset, objective, output_dir: Path, device) -> Task:
    """The autoencoder stage: reconstruct source and target slices with one KL autoencoder."""
    from lift3d.training.stages.autoencoder import measure_latent_scale

    view = IndexedView(dataset.slices())

    def slices(batch: dict) -> Tensor:
        parts = [batch["source"]] + ([batch["target"]] if "target" in batch else [])
        return torch.cat(parts).to(device)

    def loss(model, batch: dict, micro: int):
        return model(slices(batch), micro // cfg.optim.gradient_accumulation_steps)

    val_items = stack_items([view[i] for i in range(0, len(view), max(1, len(view) // 16))][:16])

    @torch.no_grad()
    def validate(model) -> dict[str, float]:
        x = slices(val_items)
        vae = model.vae
        reconstruction = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = float(F.mse_loss(reconstruction, x.float()))
        return {"val_l1": float(F.l1_loss(reconstruction, x.float())),
                "val_psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}  # slices in [-1, 1]: peak-to-peak 2

    def export(model) -> Path:
        loader = torch.utils.data.DataLoader(view, batch_size=cfg.data.batch_size, collate_fn=stack_items)
        batches = (slices(b) for _, b in zip(range(cfg.vae.scale_batches), loader))
        shift, scale = measure_latent_scale(model.vae, batches)
        model.vae.register_to_config(scaling_factor=scale, shift_factor=shift)

        def write(tmp: Path) -> None:
            model.vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / TRAINING_SETTINGS).write_text(json.dumps(
                {"stage": "autoencoder", "scaling_factor": scale, "shift_factor": shift,
                 "downsampling_factor": 2 ** (len(model.vae.config.block_out_channels) - 1),
                 "data": {"dataset": cfg.data.dataset, "options": dict(cfg.data.options)}, "config": cfg.to_dict()},
                indent=2))

        return write_folder(output_dir / "model", write)

    return Task(objective, [p for p in objective.parameters() if p.requires_grad], view, loss, validate, export)


def validation_pairs(cfg: TrainConfig) -> list:
    """The first ``data.val_volumes`` volumes of the dataset's validation split, loaded now."""
    val = create("datasets", cfg.data.dataset, split="val", **cfg.data.options)
    if len(val) == 0:
        raise ValueError(f"run.validate_every = {cfg.run.validate_every} needs validation subjects, but dataset "
                         f"{cfg.data.dataset!r} has none in its 'val' split (set its val_size/num_val option)")
    return [val[i] for i in range(min(cfg.data.val_volumes, len(val)))]


def build_autoencoder_objective(cfg: TrainConfig, dataset):
    """A new KL autoencoder from [vae], or the ``kl`` autoencoder of [autoencoder] to fine-tune."""
    from lift3d.training.stages.autoencoder import AutoencoderObjective, new_vae

    if cfg.autoencoder.options:
        base = create("autoencoders", cfg.autoencoder.name, **cfg.autoencoder.options)
        if not hasattr(base, "vae"):
            raise ValueError(f"run.stage = 'autoencoder' trains a KL autoencoder; autoencoder.name = "
                             f"{cfg.autoencoder.name!r} has none (use 'kl', or no autoencoder.options for a new one)")
        vae = base.vae
    else:
        vae = new_vae(cfg.vae, dataset[0].source.shape[0])
    check_grid(dataset, 2 ** (len(vae.config.block_out_channels) - 1), "the autoencoder's f")
    return AutoencoderObjective(vae.train().requires_grad_(True), cfg.vae)


def train(cfg: TrainConfig) -> Path:
    """Run one stage as configured; returns the exported model folder.

    Every input (options, data, autoencoder, pretrained U-Net, sampler, every file of the resume
    checkpoint) is checked before ``output_dir`` is touched, and so is the folder itself: it must
    not hold the pretrained model, nor another run's checkpoints or model (unless ``run.overwrite``).
    The run then holds the folder's lock to its end, so a second run into it is refused. If the run
    fails before its first checkpoint, a folder it created is removed again, so a refused run leaves
    nothing behind.
    """
    from accelerate.utils import set_seed

    validate(cfg)
    check_memory(cfg)
    check_run_options(cfg)
    output_dir = Path(cfg.run.output_dir)
    check_outside_inputs(cfg, output_dir)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    set_seed(cfg.run.seed)
    dataset = create("datasets", cfg.data.dataset, split="train", **cfg.data.options)
    if cfg.run.stage == "autoencoder":
        objective = build_autoencoder_objective(cfg, dataset)

        def make_task(accelerator) -> Task:
            return autoencoder_task(cfg, dataset, objective, output_dir, accelerator.device)
    else:
        autoencoder = build_autoencoder(cfg)
        sample_size = dataset[0].source.shape[-1] // autoencoder.downsampling_factor
        unet = build_unet(cfg, autoencoder, sample_size)
        levels = len(getattr(getattr(unet, "config", None), "block_out_channels", cfg.model.block_out_channels))
        check_grid(dataset, autoencoder.downsampling_factor * 2 ** (levels - 1),
                   f"autoencoder f = {autoencoder.downsampling_factor} x U-Net downsampling 2^{levels - 1}")
        sampler_name = cfg.diffusion.timestep_sampler or ("uniform-slice" if cfg.run.stage == "slices" else "make-a-volume")
        sampler = create("timestep_samplers", sampler_name)
        val_pairs = validation_pairs(cfg) if cfg.run.validate_every else None

        def make_task(accelerator) -> Task:
            autoencoder.to(accelerator.device)
            if accelerator.mixed_precision != "no":  # the frozen autoencoder runs in the compute dtype
                autoencoder.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
            return diffusion_task(cfg, dataset, autoencoder, unet, sampler, output_dir, accelerator.device, val_pairs)
    resume_from = resolve_resume(cfg, output_dir)
    if not getattr(cfg.run, "overwrite", False) and previous_work(output_dir, resume_from):
        claim_run_folder(cfg, output_dir, resume_from)  # refused before the folder is touched

    created = not output_dir.exists()
    # The run holds its folder from here to the end: a second run into it is refused, naming this one's PID.
    # Of a multi-process run, the main process holds it (the others meet it when Accelerate starts).
    main_process = os.environ.get("RANK", "0") == "0"
    with RunLock(output_dir) if main_process else contextlib.nullcontext():
        try:
            if main_process:
                claim_run_folder(cfg, output_dir, resume_from)  # again, now that no other run can write there
            return _train(cfg, make_task, output_dir, resume_from)
        except Exception as exc:
            if created and not isinstance(exc, NonFiniteLossError) and not list_checkpoints(output_dir):
                shutil.rmtree(output_dir, ignore_errors=True)
            raise


def _train(cfg: TrainConfig, make_task: Callable[[Any], Task], output_dir: Path,
           resume_from: Path | None) -> Path:
    from diffusers.optimization import get_scheduler

    accelerator = make_accelerator(cfg, output_dir)
    device = accelerator.device
    task = make_task(accelerator)
    task.model.to(device)
    params = task.params
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=cfg.run.max_steps)
    ema = None
    if cfg.optim.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.optim.ema_decay)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    state = TrainingState(model, optimizer, lr_scheduler, ema, accelerator.scaler)

    step = 0
    if resume_from is not None:
        step = load_training_state(resume_from, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, ema=ema, scaler=accelerator.scaler,
                                   process_index=accelerator.process_index, max_steps=cfg.run.max_steps)
        accelerator.print(f"lift3d: resumed from {resume_from} at step {step}")

    plan = BatchPlan(len(task.view), cfg.data.batch_size, accelerator.num_processes, accelerator.process_index,
                     cfg.run.seed)
    accum = cfg.optim.gradient_accumulation_steps
    remaining = max(cfg.run.max_steps - step, 0) * accum
    # Its own generator: a DataLoader's iterator otherwise draws its base seed from the global RNG,
    # which a resumed run restores before the iterator exists and an uninterrupted one after.
    loader = torch.utils.data.DataLoader(task.view, batch_sampler=_PlannedBatches(plan, step * accum, remaining),
                                         collate_fn=stack_items, num_workers=cfg.data.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.run.seed))

    log_file = output_dir / "logs" / "metrics.csv"
    if accelerator.is_main_process and log_file.is_file():
        # A fresh run in an old folder starts a fresh log; a resumed run drops the rows logged after
        # its checkpoint (they are logged again), then appends.
        drop_rows_after(log_file, step if resume_from is not None else -1)
    accelerator.init_trackers("logs", config={k: json.dumps(v) for k, v in cfg.to_dict().items()})
    if step == 0:
        scores = task.validate(accelerator.unwrap_model(model))
        accelerator.log(scores, step=0)
        accelerator.print(f"lift3d: stage {cfg.run.stage!r} on {accelerator.num_processes} process(es), "
                          f"{accelerator.device}; initial {_scores(scores)}")
    # Sampled validation runs on the main process only; the others wait at the next all-reduce.
    tracker = ValidationTracker(task.sampled, accelerator.unwrap_model(model), params, ema, cfg.run.validate_every) \
        if task.sampled is not None and accelerator.is_main_process else None
    state.validation = tracker
    if tracker is not None:
        if resume_from is not None:
            tracker.restore(resume_from)
        else:
            accelerator.log(tracker.score(step), step=step)
    progress = tqdm(total=cfg.run.max_steps, initial=step, desc=f"stage {cfg.run.stage}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    window: dict[str, list[float]] = {}
    last_logged: float | None = None
    tic = time.perf_counter()
    micro = step * accum
    for batch in loader:
        with accelerator.accumulate(model):
            loss, extra = task.loss(model, batch, micro)
            check_finite(accelerator, loss, step, output_dir)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        for key, value in {"loss": loss, **extra}.items():
            window.setdefault(key, []).append(float(accelerator.gather(value.detach().float()[None]).mean()))
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        if ema is not None:
            ema.step(params)
        step += 1
        progress.update(1)
        if step % cfg.run.log_every == 0 or step == cfg.run.max_steps:
            elapsed = time.perf_counter() - tic
            logs = {key: sum(values) / len(values) for key, values in window.items()}
            last_logged = logs["loss"]
            logs.update(lr=lr_scheduler.get_last_lr()[0],
                        steps_per_s=(len(window["loss"]) / accum) / max(elapsed, 1e-9))
            accelerator.log(logs, step=step)
            progress.set_postfix(loss=f"{last_logged:.4f}")
            window, tic = {}, time.perf_counter()
        if tracker is not None and (step % cfg.run.validate_every == 0 or step == cfg.run.max_steps):
            accelerator.log(tracker.score(step), step=step)
        if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
            check_weights_finite(params, step)
            save_checkpoint(accelerator, output_dir, step, cfg.run.checkpoints_keep, state, last_logged)
    progress.close()

    accelerator.wait_for_everyone()
    final = output_dir / "model"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with exported_weights(ema, params, tracker):  # the EMA, or the best validation step's weights
            scores = task.validate(unwrapped)
            accelerator.log(scores, step=step)
            accelerator.print(f"lift3d: final {_scores(scores)}")
            if tracker is not None:
                accelerator.print(f"lift3d: {tracker.summary(cfg.run.stage)}")
            final = task.export(unwrapped)
        accelerator.print(f"lift3d: exported {final}")
    accelerator.end_training()
    return final


class ValidationTracker:
    """Sampled validation during the loop (:mod:`lift3d.training.validation`): scores, and the best step kept."""

    def __init__(self, sampled, unet: nn.Module, params: list[nn.Parameter], ema, every: int) -> None:
        self.sampled, self.unet, self.params, self.ema, self.every = sampled, unet, params, ema, every
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad]
        self.best = None
        self.first: dict[str, float] | None = None

    def score(self, step: int) -> dict[str, float]:
        from lift3d.training.validation import Best, better, snapshot

        with exported_weights(self.ema, self.params):
            scores = self.sampled.score(self.unet)
            if better(scores, self.best):
                self.best = Best(step, scores, snapshot(self.params, self.names))
        if step == 0:
            self.first = scores
        return scores

    def summary(self, stage: str) -> str:
        from lift3d.training.validation import summary_line

        return summary_line(self.best, self.first, stage)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.best.weights, {"step": self.best.step, "scores": self.best.scores, "first": self.first}

    def restore(self, folder: Path) -> None:
        from lift3d.training.validation import SELECTION_METRIC, Best

        weights, info = load_validation_state(folder, dict(zip(self.names, self.params)))
        if info is None:
            raise CheckpointError(f"checkpoint {folder} holds no validation state, but this run has "
                                  f"run.validate_every = {self.every}; resume with the setting it was saved with")
        key = f"val_{SELECTION_METRIC}"
        if key not in info["scores"] or (info["first"] is not None and key not in info["first"]):
            raise CheckpointError(f"{folder / TRAINER_STATE}: its validation scores hold no {key}")
        self.best, self.first = Best(info["step"], info["scores"], weights), info["first"]


@contextlib.contextmanager
def exported_weights(ema, params: list[nn.Parameter], tracker: ValidationTracker | None = None):
    """Within: the weights that are scored and exported (EMA if on; the best validation step's if
    sampled validation ran). Afterwards the live training weights are back."""
    stored = [p.detach().clone() for p in params] if (ema is not None or tracker is not None) else None
    if ema is not None:
        ema.copy_to(params)
    if tracker is not None and tracker.best is not None:
        with torch.no_grad():
            for p, name in zip(params, tracker.names):
                p.copy_(tracker.best.weights[name].to(p.device, p.dtype))
    try:
        yield
    finally:
        if stored is not None:
            with torch.no_grad():
                for p, value in zip(params, stored):
                    p.copy_(value)


def _scores(scores: dict[str, float]) -> str:
    names = {"val_loss": "fixed-volume loss", "val_l1": "fixed-slice L1", "val_psnr": "fixed-slice PSNR (dB)"}
    return ", ".join(f"{names.get(k, k)} {v:.6f}" for k, v in scores.items())


def check_finite(accelerator, loss: Tensor, step: int, output_dir: Path) -> None:
    values = accelerator.gather(loss.detach()[None])
    if not torch.isfinite(values).all():
        found = list_checkpoints(output_dir)
        if found:
            saved = read_trainer_state(found[-1])
            last = saved.last_logged_loss
            kept = (f"the newest checkpoint is {found[-1]} (step {saved.step}, last logged loss "
                    f"{'unknown' if last is None else f'{last:.6g}'}; if that loss was already climbing, resume "
                    "from an older run or restart)")
        else:
            kept = "no checkpoint had been saved yet"
        raise NonFiniteLossError(f"training loss became {values.tolist()} at step {step + 1}; stopped. {kept}. "
                                 "Lower optim.learning_rate, check the data for NaN, or try mixed_precision = 'no'")
